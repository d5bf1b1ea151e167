// Snapshot files: full snapshots with a sparse, page-aligned RAM image; diff snapshots layered on
// a parent by id; every corrupt or truncated file refused with a clear error.
import { watch, mkdirSync, mkdtempSync, openSync, closeSync, readdirSync, readFileSync, readSync, renameSync, rmSync, statSync, truncateSync, utimesSync, writeFileSync, writeSync } from 'node:fs';
import os from 'node:os';
import nodePath from 'node:path';
import t, { type Test } from 'tap';
import { encodeState, encodeStateSection } from '../../lib/migration/state-codec.js';
import {
  HEADER_BYTES, SectionType, encodeEnd, encodeErrorSection, encodeHeader, encodeRamImage, encodeSection, viewOf,
} from '../../lib/migration/format.js';
import { encodePages } from '../../lib/migration/pages.js';
import { PAGE_SIZE } from '../../lib/kvm/constants.js';
import {
  MAX_SNAPSHOT_CHAIN, loadSnapshotMemory, openSameSnapshotFile, openSnapshotChain, readSnapshotFile, verifyRamImage, writeSnapshotFile, type WriteSnapshotOptions,
} from '../../lib/migration/snapshot-file.js';
import { crc32c } from '../../lib/migration/checksum.js';
import { expectMigrationError, migrationError } from '../helpers/migration-errors.js';

const MiB = 1024 * 1024;

function tempDir(t: Test): string {
  const dir = mkdtempSync(nodePath.join(os.tmpdir(), 'node-kvm-snapshot-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** Writes a recognizable pattern into page `page`. */
function fillPage(memory: Uint8Array, page: number, seed: number): void {
  for (let i = 0; i < PAGE_SIZE; i += 64) memory[page * PAGE_SIZE + i] = ((seed + i / 64) % 255) + 1;
}

const STATE = {
  config: { name: 'vm1', memoryMiB: 64, devices: ['serial', 'virtio-blk'] },
  vcpus: [
    { index: 0, regs: { rip: 0xffff_fff0n, rsp: 0x7000n }, xsave: new Uint8Array([1, 2, 3]) },
    { index: 1, regs: { rip: 0n, rsp: 0n }, xsave: new Uint8Array(0) },
  ],
  vm: { clock: 123456789012345n, pit: { mode: 2 } },
  devices: { serial: { lcr: 3, fifo: new Uint8Array([0x41, 0x42]) } },
};

const NONZERO_PAGES = [0, 1, 2, 100, 4096, 16383];

function fullOptions(memory: Uint8Array): WriteSnapshotOptions {
  return { kind: 'snapshot', memoryBytes: memory.length, vcpuCount: 2, ...STATE, memory };
}

async function fullSnapshot(t: Test, memoryBytes = 64 * MiB) {
  const dir = tempDir(t);
  const memory = new Uint8Array(memoryBytes);
  for (const page of NONZERO_PAGES) if (page * PAGE_SIZE < memoryBytes) fillPage(memory, page, page);
  const path = nodePath.join(dir, 'base.snap');
  const result = await writeSnapshotFile(path, fullOptions(memory));
  return { dir, memory, path, result };
}

t.test('a full snapshot round trip: state, a sparse page-aligned RAM image, its checksum', async (t) => {
  const { dir, memory, path, result } = await fullSnapshot(t);
  const pages = memory.length / PAGE_SIZE;
  t.equal(result.id.length, 16);
  t.equal(result.pagesWritten, NONZERO_PAGES.length);
  t.equal(result.zeroPagesSkipped, pages - NONZERO_PAGES.length);
  t.same(readdirSync(dir), ['base.snap'], 'no temporary file is left');

  const stat = statSync(path);
  t.equal(stat.size, result.fileBytes);
  t.ok(stat.blocks * 512 < 1 * MiB, `64 MiB of almost-zero RAM takes ${stat.blocks * 512} bytes of disk, under 1 MiB`);

  const contents = await readSnapshotFile(path);
  t.equal(contents.path, path);
  t.same(contents.header.streamId, result.id);
  t.same({ kind: contents.header.kind, memoryBytes: contents.header.memoryBytes, vcpuCount: contents.header.vcpuCount }, { kind: 'snapshot', memoryBytes: 64 * MiB, vcpuCount: 2 });
  t.same(contents.config, STATE.config);
  t.same(contents.vcpus, STATE.vcpus);
  t.same(contents.vm, STATE.vm);
  t.same(contents.devices, STATE.devices);
  t.equal(contents.parent, undefined);
  t.equal(contents.applyPages, undefined);
  const image = contents.ramImage!;
  t.equal(image.fileOffset % 4096, 0, 'the RAM image is page-aligned, so it can be mmap-ed');
  t.equal(image.fileOffset, 4096, 'right after the sections');
  t.equal(image.sizeBytes, memory.length);
  t.equal(image.crc32c, crc32c(memory), 'the CRC-32C of the whole image');
  t.equal(result.fileBytes, image.fileOffset + memory.length);

  // The file region is the raw image, byte for byte.
  const fd = openSync(path, 'r');
  const raw = new Uint8Array(memory.length);
  t.equal(readSync(fd, raw, 0, raw.length, image.fileOffset), raw.length);
  closeSync(fd);
  t.ok(Buffer.from(raw).equals(memory), 'the file holds guest RAM at fileOffset');

  await verifyRamImage(path, contents);
  for (const memoryIsZeroed of [true, false]) {
    const restored = new Uint8Array(memory.length).fill(memoryIsZeroed ? 0 : 0x5a);
    const chain = await openSnapshotChain(path);
    t.equal(chain.length, 1);
    await loadSnapshotMemory(chain, restored, { memoryIsZeroed, verify: true });
    t.ok(Buffer.from(restored).equals(memory), `loadSnapshotMemory restores RAM exactly (memoryIsZeroed ${memoryIsZeroed})`);
  }
});

/** Device states of one encoded length: a few bytes, or a blob that takes the sections past the first read (16 KiB). */
function devicesOf(lcr: number, blobBytes: number) {
  return { serial: { lcr, fifo: new Uint8Array([0x41 + lcr, 0x42 + lcr]) }, ...(blobBytes > 0 ? { rom: new Uint8Array(blobBytes).fill(lcr) } : {}) };
}

for (const blobBytes of [0, 40_000]) {
  t.test(`a file read again (sections ${blobBytes ? 'past the first read' : 'of a few KiB'}): the same state, a copy of its own, every change to the file seen`, async (t) => {
    const dir = tempDir(t);
    const memory = new Uint8Array(1 * MiB);
    fillPage(memory, 1, 1);
    const path = nodePath.join(dir, 'base.snap');
    const devices = devicesOf(3, blobBytes);
    await writeSnapshotFile(path, { ...fullOptions(memory), devices });
    const first = await readSnapshotFile(path);
    if (blobBytes) t.ok(first.ramImage!.fileOffset > 16 * 1024, `the sections end past the first read (RAM image at ${first.ramImage!.fileOffset})`);
    const second = await readSnapshotFile(path);
    t.same(second, first, 'the same contents');
    t.same(second.vcpus, STATE.vcpus);
    t.same(second.devices, devices);
    const id = new Uint8Array(first.header.streamId);
    // What one reader does with its state reaches no other.
    for (const contents of [first, second]) {
      (contents.vcpus[0] as { xsave: Uint8Array }).xsave[0] = 99;
      (contents.devices as { serial: { lcr: number } }).serial.lcr = 7;
      if (blobBytes) (contents.devices as { rom: Uint8Array }).rom[100] = 99;
      contents.header.streamId[0] ^= 0xff;
      contents.ramImage!.sizeBytes = 1;
    }
    const third = await readSnapshotFile(path);
    t.same(third.vcpus, STATE.vcpus, 'vCPU state as written');
    t.same(third.devices, devices, 'device state as written');
    t.same(third.header.streamId, id);
    t.equal(third.ramImage!.sizeBytes, memory.length);

    // Rewritten in place with another snapshot of the same size, its times put back: the new state.
    const other = nodePath.join(dir, 'other.snap');
    await writeSnapshotFile(other, { ...fullOptions(memory), devices: devicesOf(4, blobBytes) });
    const before = statSync(path);
    const otherBytes = readFileSync(other);
    t.equal(otherBytes.length, before.size, 'the two files are the same size');
    const overwrite = (bytes: Uint8Array) => {
      const fd = openSync(path, 'r+');
      try {
        writeSync(fd, bytes, 0, bytes.length, 0);
      } finally {
        closeSync(fd);
      }
      utimesSync(path, before.atime, before.mtime);
    };
    const good = readFileSync(path);
    overwrite(otherBytes);
    const rewritten = await readSnapshotFile(path);
    t.same(rewritten.devices, devicesOf(4, blobBytes), 'the state the file holds now');
    t.notSame(rewritten.header.streamId, id);

    // A byte flipped in place, in the device state's payload (its last section before End).
    overwrite(good);
    t.same((await readSnapshotFile(path)).devices, devices);
    const flipped = Buffer.from(good);
    flipped[good.indexOf('"lcr"')] ^= 1;
    overwrite(flipped);
    await expectMigrationError(t, () => readSnapshotFile(path), 'ECHECKSUM', `${path}: checksum mismatch in DeviceState section`);
    overwrite(good);
    t.same((await readSnapshotFile(path)).devices, devices, 'read again once mended');

    // Cut short in its RAM image.
    truncateSync(path, before.size - PAGE_SIZE);
    await expectMigrationError(t, () => readSnapshotFile(path), 'ETRUNCATED',
      `${path}: snapshot file truncated: the RAM image ends at byte ${before.size} but the file has ${before.size - PAGE_SIZE} bytes`);
  });
}

t.test('a snapshot renamed over the path after its state was read: its RAM image is not used for that state', async (t) => {
  const { dir, memory, path } = await fullSnapshot(t, 1 * MiB);
  const contents = await readSnapshotFile(path);
  const { dev, ino } = statSync(path, { bigint: true });
  t.same(contents.file, { dev, ino }, 'the file read, by device and inode');
  const fd = openSameSnapshotFile(contents);
  closeSync(fd);

  const other = nodePath.join(dir, 'other.snap');
  fillPage(memory, 3, 77);
  await writeSnapshotFile(other, fullOptions(memory));
  renameSync(other, path);
  const replaced = `${path}: the file was replaced since its state was read (another snapshot renamed over it?)`;
  t.throws(() => openSameSnapshotFile(contents), { code: 'EMISMATCH', message: replaced });
  await expectMigrationError(t, () => verifyRamImage(path, contents), 'EMISMATCH', replaced);
  // Read again, the new file is the one: from the cache of decoded states too.
  const again = await readSnapshotFile(path);
  t.not(again.file!.ino, contents.file!.ino);
  await verifyRamImage(path, again);
});

t.test('bytesWritten counts sections and non-zero pages, not holes', async (t) => {
  const { memory, result } = await fullSnapshot(t, 1 * MiB);
  const sectionsBytes = HEADER_BYTES + [
    encodeStateSection(SectionType.Config, { machine: STATE.config }),
    ...STATE.vcpus.map((vcpu) => encodeStateSection(SectionType.VcpuState, vcpu)),
    encodeStateSection(SectionType.VmState, STATE.vm),
    encodeStateSection(SectionType.DeviceState, STATE.devices),
    encodeRamImage({ fileOffset: 4096, sizeBytes: memory.length, crc32c: 0 }),
    encodeEnd(),
  ].reduce((sum, section) => sum + section.length, 0);
  t.equal(result.pagesWritten, 4, 'pages 0, 1, 2 and 100 of 256');
  t.equal(result.bytesWritten, sectionsBytes + 4 * PAGE_SIZE);
});

t.test('the populated hint: only those ranges are read', async (t) => {
  const dir = tempDir(t);
  const memory = new Uint8Array(1 * MiB);
  fillPage(memory, 3, 3);
  fillPage(memory, 200, 200);
  const hinted = nodePath.join(dir, 'hinted.snap');
  const result = await writeSnapshotFile(hinted, { ...fullOptions(memory), populated: [[200 * PAGE_SIZE + 10, 5], [3 * PAGE_SIZE, 1], [0, 0], [3 * PAGE_SIZE, PAGE_SIZE]] });
  t.equal(result.pagesWritten, 2);
  const contents = await readSnapshotFile(hinted);
  t.equal(contents.ramImage!.crc32c, crc32c(memory));
  await verifyRamImage(hinted, contents);

  // What lies outside the hint is taken as zero, unread.
  const partial = nodePath.join(dir, 'partial.snap');
  const partialResult = await writeSnapshotFile(partial, { ...fullOptions(memory), populated: [[3 * PAGE_SIZE, PAGE_SIZE]] });
  t.equal(partialResult.pagesWritten, 1);
  const restored = new Uint8Array(memory.length);
  await loadSnapshotMemory(await openSnapshotChain(partial), restored, { verify: true });
  const expected = memory.slice();
  expected.fill(0, 200 * PAGE_SIZE, 201 * PAGE_SIZE);
  t.ok(Buffer.from(restored).equals(expected));

  for (const populated of [[[0, memory.length + 1]], [[-1, 10]], [[0.5, 10]], ['x']]) {
    await t.rejects(writeSnapshotFile(nodePath.join(dir, 'bad.snap'), { ...fullOptions(memory), populated: populated as never }));
  }
  await t.rejects(writeSnapshotFile(nodePath.join(dir, 'bad.snap'), { ...fullOptions(memory), populated: 'x' as never }), TypeError);
  t.same(readdirSync(dir).sort(), ['hinted.snap', 'partial.snap'], 'nothing written');
});

t.test('diff snapshots: only the written pages, layered on the parent by id', async (t) => {
  const { dir, memory, path: basePath, result: base } = await fullSnapshot(t, 4 * MiB);
  const current = memory.slice();
  fillPage(current, 5, 77); // was zero
  current.fill(0, 1 * PAGE_SIZE, 2 * PAGE_SIZE); // was non-zero, now zero: must be recorded
  fillPage(current, 100, 9); // overwritten
  const diffPath = nodePath.join(dir, 'diff1.snap');
  const diff = await writeSnapshotFile(diffPath, {
    kind: 'diff-snapshot', memoryBytes: current.length, vcpuCount: 2, ...STATE, vm: { clock: 2n }, memory: current,
    parent: { path: basePath, id: base.id },
    pages: [{ firstPage: 1, pageCount: 1 }, { firstPage: 5, pageCount: 1 }, { firstPage: 100, pageCount: 1 }],
  });
  t.same({ pagesWritten: diff.pagesWritten, zeroPagesSkipped: diff.zeroPagesSkipped }, { pagesWritten: 2, zeroPagesSkipped: 1 });
  t.ok(diff.fileBytes < 3 * PAGE_SIZE, 'a diff holds its pages, not RAM');
  t.equal(statSync(diffPath).size, diff.fileBytes);

  const contents = await readSnapshotFile(diffPath);
  t.equal(contents.header.kind, 'diff-snapshot');
  t.same(contents.header.parentId, base.id);
  t.same(contents.parent, { path: basePath, id: base.id });
  t.same(contents.vm, { clock: 2n });
  t.equal(contents.ramImage, undefined);
  t.same(contents.pageCounts, { pages: 2, zeroPages: 1 });
  t.equal(contents.pageSections!.length, 1);

  // A second diff on the first.
  const latest = current.slice();
  fillPage(latest, 1000, 5);
  const diff2Path = nodePath.join(dir, 'diff2.snap');
  await writeSnapshotFile(diff2Path, {
    kind: 'diff-snapshot', memoryBytes: latest.length, vcpuCount: 2, ...STATE, memory: latest,
    parent: { path: diffPath, id: diff.id }, pages: [{ firstPage: 1000, pageCount: 1 }],
  });

  const chain = await openSnapshotChain(diff2Path);
  t.same(chain.map((c) => nodePath.basename(c.path)), ['base.snap', 'diff1.snap', 'diff2.snap'], 'base first');
  const restored = new Uint8Array(latest.length);
  await loadSnapshotMemory(chain, restored, { memoryIsZeroed: true, verify: true });
  t.ok(Buffer.from(restored).equals(latest), 'base image + diff 1 + diff 2 = the latest RAM');

  const one = new Uint8Array(current.length);
  await loadSnapshotMemory(await openSnapshotChain(diffPath), one);
  t.ok(Buffer.from(one).equals(current), 'base image + diff 1 = RAM at diff 1');

  // applyPages() by hand, as a copy-on-write restore does over the mapped base image.
  const mapped = memory.slice();
  t.same(contents.applyPages!(mapped), { pages: 2, zeroPages: 1 });
  t.ok(Buffer.from(mapped).equals(current));
  t.throws(() => contents.applyPages!(new Uint8Array(4096)), RangeError);

  // The parent path is stored relative: the set of files can move together.
  const moved = nodePath.join(dir, 'moved');
  mkdirSync(moved);
  for (const name of ['base.snap', 'diff1.snap', 'diff2.snap']) renameSync(nodePath.join(dir, name), nodePath.join(moved, name));
  const movedChain = await openSnapshotChain(nodePath.join(moved, 'diff2.snap'));
  t.same(movedChain.map((c) => c.path), ['base.snap', 'diff1.snap', 'diff2.snap'].map((name) => nodePath.join(moved, name)));
});

t.test('a diff refuses a parent that is not the expected snapshot', async (t) => {
  const { dir, memory, path: basePath, result: base } = await fullSnapshot(t, 1 * MiB);
  const diffOptions = (parentPath: string, id: Uint8Array): WriteSnapshotOptions => ({
    kind: 'diff-snapshot', memoryBytes: memory.length, vcpuCount: 2, ...STATE, memory, parent: { path: parentPath, id }, pages: [{ firstPage: 0, pageCount: 1 }],
  });
  const diffPath = nodePath.join(dir, 'diff.snap');
  const otherId = new Uint8Array(16).fill(0xab);
  await expectMigrationError(t, () => writeSnapshotFile(diffPath, diffOptions(basePath, otherId)), 'EMISMATCH',
    `${basePath} is snapshot ${Buffer.from(base.id).toString('hex')}, not the parent expected (abababababababababababababababab)`);
  t.same(readdirSync(dir), ['base.snap'], 'nothing written');

  const smaller = new Uint8Array(512 * 1024);
  await expectMigrationError(t, () => writeSnapshotFile(diffPath, { ...diffOptions(basePath, base.id), memoryBytes: smaller.length, memory: smaller }), 'EMISMATCH',
    `${basePath} is a snapshot of a machine with 1048576 bytes of RAM and 2 vCPUs, not 524288 and 2`);

  // The parent file replaced by another snapshot after the diff was written.
  await writeSnapshotFile(diffPath, diffOptions(basePath, base.id));
  const replacement = await writeSnapshotFile(basePath, fullOptions(memory));
  await expectMigrationError(t, () => openSnapshotChain(diffPath), 'EMISMATCH',
    `${diffPath} is layered on snapshot ${Buffer.from(base.id).toString('hex')}, but ${basePath} is snapshot ${Buffer.from(replacement.id).toString('hex')}`);

  // A parent of another machine (written by hand: the writer refuses to make one).
  const other = await writeSnapshotFile(nodePath.join(dir, 'other.snap'), { ...fullOptions(smaller), memoryBytes: smaller.length });
  const header = encodeHeader({ kind: 'diff-snapshot', memoryBytes: memory.length, vcpuCount: 2, parentId: other.id });
  writeFileSync(diffPath, Buffer.concat([header, ...stateSections(memory.length, { parent: { path: 'other.snap' } }), encodeEnd()]));
  await expectMigrationError(t, () => openSnapshotChain(diffPath), 'EMISMATCH',
    `${diffPath} and its parent ${nodePath.join(dir, 'other.snap')} are snapshots of different machines (RAM size or vCPU count)`);
});

/** Config and state sections as writeSnapshotFile() lays them out (format version 2): VM before vCPUs. */
function stateSections(_memoryBytes: number, configExtra: object = {}): Uint8Array[] {
  return [
    encodeStateSection(SectionType.Config, { machine: STATE.config, ...configExtra }),
    encodeStateSection(SectionType.VmState, STATE.vm),
    ...STATE.vcpus.map((vcpu) => encodeStateSection(SectionType.VcpuState, vcpu)),
    encodeStateSection(SectionType.DeviceState, STATE.devices),
  ];
}

t.test('a chain longer than the limit, or looping on itself, is refused', async (t) => {
  const dir = tempDir(t);
  const id = new Uint8Array(16).fill(3);
  // A diff that names itself as its parent, with its own id as the parent id.
  const path = nodePath.join(dir, 'loop.snap');
  const header = encodeHeader({ kind: 'diff-snapshot', memoryBytes: 8192, vcpuCount: 2, streamId: id, parentId: id });
  writeFileSync(path, Buffer.concat([header, ...stateSections(8192, { parent: { path: 'loop.snap' } }), encodeEnd()]));
  await expectMigrationError(t, () => openSnapshotChain(path), 'EFORMAT', `${path}: more than ${MAX_SNAPSHOT_CHAIN} diff snapshots layered on each other`);
});

t.test('corrupt and truncated snapshot files', async (t) => {
  const { dir, path } = await fullSnapshot(t, 1 * MiB);
  const good = readFileSync(path);
  const contents = await readSnapshotFile(path);
  const sectionsEnd = HEADER_BYTES + stateSections(MiB).reduce((sum, s) => sum + s.length, 0) + 12 + 24 + 12;
  const broken = nodePath.join(dir, 'broken.snap');

  t.test('truncated anywhere in the sections', async (t) => {
    let failures = 0;
    for (let length = 0; length < sectionsEnd; length += 7) {
      writeFileSync(broken, good.subarray(0, length));
      const error = await migrationError(t, () => readSnapshotFile(broken));
      if (error.code !== 'ETRUNCATED') t.fail(`cut at ${length}: ${error.message}`);
      failures++;
    }
    t.equal(failures, Math.ceil(sectionsEnd / 7));
    writeFileSync(broken, good.subarray(0, 20));
    await expectMigrationError(t, () => readSnapshotFile(broken), 'ETRUNCATED', `${broken}: snapshot file truncated: expected 68 bytes of the stream header at offset 0, got 20`);
    writeFileSync(broken, good.subarray(0, HEADER_BYTES + 4));
    await expectMigrationError(t, () => readSnapshotFile(broken), 'ETRUNCATED', `${broken}: snapshot file truncated: expected 8 bytes of a section header at offset 68, got 4`);
  });

  t.test('truncated in the RAM image', async (t) => {
    const image = contents.ramImage!;
    writeFileSync(broken, good);
    truncateSync(broken, image.fileOffset + 1000);
    await expectMigrationError(t, () => readSnapshotFile(broken), 'ETRUNCATED',
      `${broken}: snapshot file truncated: the RAM image ends at byte ${image.fileOffset + image.sizeBytes} but the file has ${image.fileOffset + 1000} bytes`);
    await expectMigrationError(t, () => verifyRamImage(broken, contents), 'ETRUNCATED',
      `${broken}: snapshot file truncated: expected 1048576 bytes of the RAM image at offset 4096, got 1000`);
  });

  t.test('a flipped byte in the sections', async (t) => {
    for (let offset = HEADER_BYTES; offset < sectionsEnd; offset += 5) {
      const copy = Buffer.from(good);
      copy[offset] ^= 0x04;
      writeFileSync(broken, copy);
      const error = await migrationError(t, () => readSnapshotFile(broken));
      if (!['ECHECKSUM', 'EFORMAT', 'ETOOBIG', 'ETRUNCATED'].includes(error.code)) t.fail(`flip at ${offset}: ${error.message}`);
    }
    const copy = Buffer.from(good);
    copy[HEADER_BYTES + 8 + 3] ^= 1; // in the Config payload
    writeFileSync(broken, copy);
    await expectMigrationError(t, () => readSnapshotFile(broken), 'ECHECKSUM', `${broken}: checksum mismatch in Config section`);
  });

  t.test('a flipped byte in the RAM image is found by the checksum when asked', async (t) => {
    const image = contents.ramImage!;
    writeFileSync(broken, good);
    const fd = openSync(broken, 'r+');
    writeSync(fd, new Uint8Array([0x01]), 0, 1, image.fileOffset + 200 * PAGE_SIZE + 17); // a hole in the image
    closeSync(fd);
    const brokenContents = await readSnapshotFile(broken);
    await expectMigrationError(t, () => verifyRamImage(broken, brokenContents), 'ECHECKSUM', `${broken}: checksum mismatch in the RAM image`);
    await expectMigrationError(t, () => loadSnapshotMemory([brokenContents], new Uint8Array(image.sizeBytes), { verify: true }), 'ECHECKSUM',
      `${broken}: checksum mismatch in the RAM image`);
  });

  t.test('wrong magic, future version, a migration stream', async (t) => {
    const copy = Buffer.from(good);
    copy.write('GARBAGE!', 0, 'latin1');
    writeFileSync(broken, copy);
    await expectMigrationError(t, () => readSnapshotFile(broken), 'EMAGIC', `${broken}: not a node-kvm migration stream or snapshot: the first 8 bytes are 4741524241474521, expected 'NODE-KVM'`);
    for (const version of [1, 5]) {
      const other = Buffer.from(good);
      viewOf(other).setUint32(8, version, true);
      writeFileSync(broken, other);
      await expectMigrationError(t, () => readSnapshotFile(broken), 'EVERSION', `${broken}: stream version ${version} is not supported (this build reads versions 2 to 4)`);
    }
    writeFileSync(broken, Buffer.concat([encodeHeader({ kind: 'migration', memoryBytes: MiB, vcpuCount: 2 }), ...stateSections(MiB), encodeEnd()]));
    await expectMigrationError(t, () => readSnapshotFile(broken), 'EFORMAT', `${broken}: this is a migration stream, not a snapshot file`);
  });
});

t.test('sections out of place are refused', async (t) => {
  const dir = tempDir(t);
  const path = nodePath.join(dir, 'odd.snap');
  const memoryBytes = 2 * PAGE_SIZE;
  const fullHeader = () => encodeHeader({ kind: 'snapshot', memoryBytes, vcpuCount: 2 });
  const diffHeader = () => encodeHeader({ kind: 'diff-snapshot', memoryBytes, vcpuCount: 2, parentId: new Uint8Array(16).fill(1) });
  const [config, vm, vcpu0, vcpu1, devices] = stateSections(memoryBytes);
  const ram = encodeRamImage({ fileOffset: 4096, sizeBytes: memoryBytes, crc32c: 0 });
  const diffConfig = encodeStateSection(SectionType.Config, { machine: {}, parent: { path: 'p.snap' } });
  const hostilePages = (() => {
    // A range past the end of guest RAM, sealed with a valid CRC.
    const payload = new Uint8Array(4 + 16);
    viewOf(payload).setUint32(0, 1, true);
    viewOf(payload).setUint32(4, 2, true);
    viewOf(payload).setUint32(12, 1, true);
    viewOf(payload).setUint32(16, 1, true);
    return encodeSection(SectionType.Pages, payload);
  })();
  const validPages = encodePages([{ firstPage: 0, pageCount: 1 }], () => new Uint8Array(PAGE_SIZE).fill(1)).sections[0];
  const ORDER = 'the state comes as Config, VmState, 2 VcpuState, DeviceState';
  const cases: [string, Uint8Array[], string, string][] = [
    ['state before Config', [fullHeader(), vcpu0, config], 'EFORMAT',
      `a snapshot file: misplaced VcpuState section before its Config section (${ORDER})`],
    ['two Configs', [fullHeader(), config, config], 'EFORMAT', 'a snapshot file: misplaced Config section (a second Config section)'],
    ['the vCPUs before VmState (the order of version 1)', [fullHeader(), config, vcpu0, vcpu1, vm], 'EFORMAT',
      `a snapshot file: misplaced VcpuState section after its Config section (${ORDER})`],
    ['VmState twice', [fullHeader(), config, vm, vm], 'EFORMAT', `a snapshot file: misplaced VmState section after its VmState section (${ORDER})`],
    ['three vCPUs', [fullHeader(), config, vm, vcpu0, vcpu1, vcpu1], 'EFORMAT',
      `a snapshot file: misplaced VcpuState section after VmState and 2 of 2 VcpuState sections (${ORDER})`],
    ['DeviceState too early', [fullHeader(), config, vm, vcpu0, devices], 'EFORMAT',
      `a snapshot file: misplaced DeviceState section after VmState and 1 of 2 VcpuState sections (${ORDER})`],
    ['DeviceState twice', [fullHeader(), config, vm, vcpu0, vcpu1, devices, devices], 'EFORMAT',
      `a snapshot file: misplaced DeviceState section after its DeviceState section (${ORDER})`],
    ['no DeviceState', [fullHeader(), config, vm, vcpu0, vcpu1, encodeEnd()], 'EFORMAT',
      'a snapshot file ends after VmState and 2 of 2 VcpuState sections, before its state is complete'],
    ['no state', [fullHeader(), config, encodeEnd()], 'EFORMAT', 'a snapshot file ends after its Config section, before its state is complete'],
    ['nothing', [fullHeader(), encodeEnd()], 'EFORMAT', 'a snapshot file ends before its Config section, before its state is complete'],
    ['RamImage before the state', [fullHeader(), config, vm, ram], 'EFORMAT', `a snapshot file: misplaced RamImage section after its VmState section (${ORDER})`],
    ['no RamImage', [fullHeader(), config, vm, vcpu0, vcpu1, devices, encodeEnd()], 'EFORMAT', 'a full snapshot without a RamImage section'],
    ['two RamImages', [fullHeader(), config, vm, vcpu0, vcpu1, devices, ram, ram], 'EFORMAT', 'a snapshot file: misplaced RamImage section'],
    ['Pages in a full snapshot', [fullHeader(), config, vm, vcpu0, vcpu1, devices, validPages], 'EFORMAT', 'a snapshot file: misplaced Pages section'],
    ['a Sync section', [fullHeader(), config, vm, vcpu0, vcpu1, devices, encodeSection(SectionType.Sync, new Uint8Array(0))], 'EFORMAT',
      'a snapshot file: misplaced Sync section'],
    ['RamImage in a diff', [diffHeader(), diffConfig, vm, vcpu0, vcpu1, devices, ram], 'EFORMAT', 'a diff-snapshot file: misplaced RamImage section'],
    ['Pages beyond RAM in a diff', [diffHeader(), diffConfig, vm, vcpu0, vcpu1, devices, hostilePages], 'EFORMAT',
      'Pages range 0 (1 pages from page 0x2) lies outside guest RAM (0x2 pages)'],
    ['a diff without a parent path', [diffHeader(), config], 'EFORMAT', 'the Config section of a diff snapshot does not name its parent'],
    ['a full snapshot with a parent path', [fullHeader(), diffConfig], 'EFORMAT', 'the Config section of a full snapshot names a parent'],
    ['a Config of another shape', [fullHeader(), encodeStateSection(SectionType.Config, [1])], 'EFORMAT',
      'a snapshot file: the Config section does not hold a machine configuration'],
    ['a bad running flag', [fullHeader(), encodeStateSection(SectionType.Config, { machine: {}, running: 1 })], 'EFORMAT', 'a snapshot file: bad running flag'],
    ['a bad parent', [diffHeader(), encodeStateSection(SectionType.Config, { machine: {}, parent: { path: '' } })], 'EFORMAT',
      'a diff-snapshot file: the Config section names its parent badly'],
    ['an Error section', [fullHeader(), config, encodeErrorSection('disk full')], 'EFORMAT', 'the file holds an Error section: disk full'],
    ['RAM image of the wrong size', [fullHeader(), config, vm, vcpu0, vcpu1, devices, encodeRamImage({ fileOffset: 4096, sizeBytes: 4096, crc32c: 0 }), encodeEnd()],
      'EFORMAT', 'the RAM image holds 4096 bytes but the header gives 8192 bytes of RAM'],
    ['RAM image over the sections', [fullHeader(), config, vm, vcpu0, vcpu1, devices, encodeRamImage({ fileOffset: 0, sizeBytes: memoryBytes, crc32c: 0 }), encodeEnd()],
      'EFORMAT', /^the RAM image at offset 0 overlaps the sections, which end at \d+$/.source],
    ['bad state JSON', [fullHeader(), config, vm, encodeSection(SectionType.VcpuState, Buffer.from('{"__proto__":1}'))], 'EFORMAT',
      "the VcpuState section of vCPU 0 is not valid state: state has the key '__proto__'"],
  ];
  for (const [name, sections, code, message] of cases) {
    writeFileSync(path, Buffer.concat(sections));
    const error = await migrationError(t, () => readSnapshotFile(path));
    t.equal(error.code, code, name);
    if (message.startsWith('^')) t.match(error.message, new RegExp(`^${path.replace(/[.*+?^${}()|[\]\\/]/g, '\\$&')}: ${message.slice(1)}`), name);
    else t.equal(error.message, `${path}: ${message}`, name);
  }
  // A valid hand-made diff reads back, its Pages checked in full.
  writeFileSync(path, Buffer.concat([diffHeader(), diffConfig, vm, vcpu0, vcpu1, devices, validPages, encodeEnd()]));
  const diff = await readSnapshotFile(path);
  t.same(diff.pageCounts, { pages: 1, zeroPages: 0 });
  t.same(diff.config, {});
});

t.test('writeSnapshotFile rejects bad options before touching the file', async (t) => {
  const dir = tempDir(t);
  const path = nodePath.join(dir, 'x.snap');
  const memory = new Uint8Array(2 * PAGE_SIZE);
  const good = fullOptions(memory);
  const bad: [string, unknown, ErrorConstructor][] = [
    ['kind', { ...good, kind: 'migration' }, RangeError],
    ['memory not bytes', { ...good, memory: [] }, TypeError],
    ['memory of another size', { ...good, memoryBytes: 3 * PAGE_SIZE }, RangeError],
    ['vcpus not an array', { ...good, vcpus: {} }, TypeError],
    ['vcpus of another count', { ...good, vcpuCount: 3 }, RangeError],
    ['a full snapshot with a parent', { ...good, parent: { path: 'p', id: new Uint8Array(16) } }, TypeError],
    ['a full snapshot with pages', { ...good, pages: [] }, TypeError],
    ['a diff without a parent', { ...good, kind: 'diff-snapshot', pages: [] }, TypeError],
    ['a diff without pages', { ...good, kind: 'diff-snapshot', parent: { path: 'p', id: new Uint8Array(16) } }, TypeError],
    ['a diff with populated', { ...good, kind: 'diff-snapshot', parent: { path: 'p', id: new Uint8Array(16) }, pages: [], populated: [] }, TypeError],
    ['state that cannot be encoded', { ...good, vm: { f: () => 1 } }, TypeError],
    ['options', null, TypeError],
  ];
  for (const [name, options, type] of bad) {
    await t.rejects(writeSnapshotFile(path, options as WriteSnapshotOptions), type, name);
  }
  await t.rejects(writeSnapshotFile('', good), TypeError);
  t.same(readdirSync(dir), [], 'nothing created');
  await t.rejects(writeSnapshotFile(nodePath.join(dir, 'missing', 'x.snap'), good), { code: 'ENOENT' });
  await t.rejects(readSnapshotFile(''), TypeError);
  await t.rejects(verifyRamImage(path, { header: {} } as never), TypeError);
  await t.rejects(loadSnapshotMemory([], memory), TypeError);
  await t.rejects(loadSnapshotMemory([{ header: {} } as never], memory), TypeError);
  await writeSnapshotFile(path, good);
  const contents = await readSnapshotFile(path);
  await t.rejects(loadSnapshotMemory([contents], new Uint8Array(4096)), RangeError);
  await t.rejects(loadSnapshotMemory([contents, contents], memory), TypeError, 'chain[1] must be a diff');
  t.equal(encodeState(null).length, 4);
});

t.test('a failed write leaves neither the snapshot nor its temporary file', async (t) => {
  const dir = tempDir(t);
  const path = nodePath.join(dir, 'x.snap');
  // A directory that does not exist: the new file cannot be created.
  const missing = nodePath.join(dir, 'missing', 'x.snap');
  await t.rejects(writeSnapshotFile(missing, fullOptions(new Uint8Array(PAGE_SIZE * 2))), {
    code: 'ENOENT', message: `cannot write the snapshot ${missing}: creating a new file beside it: ENOENT: no such file or directory`,
  });
  t.same(readdirSync(dir), []);
  // An existing snapshot is replaced whole.
  const first = await writeSnapshotFile(path, fullOptions(new Uint8Array(PAGE_SIZE * 2).fill(1)));
  const second = await writeSnapshotFile(path, fullOptions(new Uint8Array(PAGE_SIZE * 2)));
  t.notSame(first.id, second.id);
  t.same((await readSnapshotFile(path)).header.streamId, second.id);
  t.equal(statSync(path).size, second.fileBytes);
});

t.test('an aborted write leaves neither the snapshot nor its temporary file', async (t) => {
  const dir = tempDir(t);
  const path = nodePath.join(dir, 'x.snap');
  const memory = new Uint8Array(64 * MiB).fill(0x3c);
  const already = AbortSignal.abort();
  await t.rejects(writeSnapshotFile(path, { ...fullOptions(memory), signal: already }), {
    name: 'MigrationError', code: 'ABORT_ERR', message: `writing the snapshot ${path}: aborted`,
  });
  t.same(readdirSync(dir), [], 'an aborted signal: nothing created');
  // Aborted once the temporary file appears, while 64 MiB of RAM image are being written.
  const controller = new AbortController();
  const watcher = watch(dir, () => controller.abort());
  t.teardown(() => watcher.close());
  await t.rejects(writeSnapshotFile(path, { ...fullOptions(memory), signal: controller.signal }), { name: 'MigrationError', code: 'ABORT_ERR' });
  t.ok(controller.signal.aborted, 'aborted by the temporary file showing up');
  t.same(readdirSync(dir), [], 'the temporary file is gone, no snapshot was made');
  await t.rejects(writeSnapshotFile(path, { ...fullOptions(memory), signal: 'no' as never }), { name: 'TypeError', code: 'ERR_INVALID_ARG_TYPE' });
});
