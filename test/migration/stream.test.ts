// The migration stream format: header, checksummed sections, Pages encoding, the state codec, and
// the byte sources (memory, file, a real socket pair). Every malformed input must end in a
// MigrationError that says what is wrong, before anything is applied.
import { mkdtempSync, openSync, closeSync, writeFileSync, rmSync } from 'node:fs';
import { open } from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import nodePath from 'node:path';
import { PassThrough, Writable } from 'node:stream';
import t, { type Test } from 'tap';
import {
  HEADER_BYTES, MAX_SECTION_PAYLOAD_BYTES, SECTION_HEADER_BYTES, STREAM_VERSION, SectionType, checkHeader, decodeErrorSection, decodeHeader,
  decodeRamImage, encodeEnd, encodeErrorSection, encodeHeader, encodeRamImage, encodeSection, setU64, viewOf, type Section, type StreamHeader,
} from '../../lib/migration/format.js';
import { MAX_BATCH_PAGES, MAX_BATCH_SECTION_BYTES, decodePages, decodePagesInto, encodePageBatch, encodePages, forEachPageRun } from '../../lib/migration/pages.js';
import { SectionReader } from '../../lib/migration/section-reader.js';
import { FileSource, bufferSource, fileSource, socketSource, type ByteSource } from '../../lib/migration/sources.js';
import { writeChunks } from '../../lib/migration/writers.js';
import { PAGE_SIZE } from '../../lib/kvm/constants.js';
import { MAX_MEMORY_BYTES, MAX_VCPUS } from '../../lib/vmm/config.js';
import { decodeState, decodeStateSection, encodeState, encodeStateSection } from '../../lib/migration/state-codec.js';
import { crc32c } from '../../lib/migration/checksum.js';
import { expectMigrationError, migrationError } from '../helpers/migration-errors.js';

const MiB = 1024 * 1024;

/** Memory of `pageCount` pages; page p holds p+1 in its first byte and 0xEE at its end when in `nonZero`. */
function memoryWith(pageCount: number, nonZero: number[]): Uint8Array {
  const memory = new Uint8Array(pageCount * PAGE_SIZE);
  for (const page of nonZero) {
    memory[page * PAGE_SIZE] = (page % 255) + 1;
    memory[page * PAGE_SIZE + PAGE_SIZE - 1] = 0xee;
  }
  return memory;
}

const reader = (memory: Uint8Array) => (guestPhysAddr: number, byteLength: number) => memory.subarray(guestPhysAddr, guestPhysAddr + byteLength);

/** Every apply() call of decodePages(), as [guestPhysAddr, byteLength, first data byte or 'zero']. */
function applied(payload: Uint8Array, memoryBytes: number): [number, number, number | 'zero'][] {
  const calls: [number, number, number | 'zero'][] = [];
  decodePages(payload, memoryBytes, (guestPhysAddr, byteLength, data) => {
    if (data && data.length !== byteLength) throw new Error(`data of ${data.length} bytes for a range of ${byteLength}`);
    calls.push([guestPhysAddr, byteLength, data ? data[0] : 'zero']);
  });
  return calls;
}

/** Builds a Pages payload by hand: ranges [firstPage (bigint), pageCount, flags], then `dataBytes` bytes. */
function pagesPayload(ranges: [bigint, number, number][], dataBytes: number): Uint8Array {
  const payload = new Uint8Array(4 + ranges.length * 16 + dataBytes);
  const view = viewOf(payload);
  view.setUint32(0, ranges.length, true);
  ranges.forEach(([firstPage, pageCount, flags], i) => {
    view.setBigUint64(4 + i * 16, firstPage, true);
    view.setUint32(4 + i * 16 + 8, pageCount, true);
    view.setUint32(4 + i * 16 + 12, flags, true);
  });
  return payload;
}

/** Re-computes the header CRC after a test changed a field. */
function resealHeader(bytes: Uint8Array): Uint8Array {
  viewOf(bytes).setUint32(64, crc32c(bytes.subarray(0, 64)), true);
  return bytes;
}

const concat = (chunks: Uint8Array[]): Uint8Array => new Uint8Array(Buffer.concat(chunks));

async function readAll(source: ByteSource): Promise<{ header: StreamHeader; sections: Section[] }> {
  const sectionReader = new SectionReader(source);
  const header = await sectionReader.readHeader();
  const sections: Section[] = [];
  while (!sectionReader.ended) sections.push(await sectionReader.next());
  return { header, sections };
}

// ---------------------------------------------------------------------------------------------

t.test('the header and every section end in the CRC-32C of what precedes them', async (t) => {
  // Exact bytes: type End (7), flags 0, length 0, then CRC-32C 0x7671B78E (CRC-32 would be 0x6FE7D670).
  t.same([...encodeEnd()], [7, 0, 0, 0, 0, 0, 0, 0, 0x8e, 0xb7, 0x71, 0x76]);
  // Error section with payload 'stop!': CRC-32C 0x17F53901.
  t.same([...encodeErrorSection('stop!')], [8, 0, 0, 0, 5, 0, 0, 0, ...Buffer.from('stop!'), 0x01, 0x39, 0xf5, 0x17]);
  const header = encodeHeader({ kind: 'snapshot', memoryBytes: 4096, vcpuCount: 1 });
  t.equal(viewOf(header).getUint32(64, true), crc32c(header.subarray(0, 64)), 'the header CRC covers bytes 0..63');
  const section = encodeSection(SectionType.Config, new Uint8Array(1000).map((_, i) => i & 0xff));
  t.equal(viewOf(section).getUint32(section.length - 4, true), crc32c(section.subarray(0, section.length - 4)));
});

t.test('forEachPageRun finds the maximal zero and non-zero runs', async (t) => {
  const runs: [number, number, boolean][] = [];
  const nonZero = [3, 4, 5, 20, 40];
  forEachPageRun(memoryWith(64, nonZero), (first, count, zero) => runs.push([first, count, zero]));
  t.same(runs, [[0, 3, true], [3, 3, false], [6, 14, true], [20, 1, false], [21, 19, true], [40, 1, false], [41, 23, true]]);
  const none: unknown[] = [];
  forEachPageRun(new Uint8Array(0), (...run) => none.push(run));
  t.same(none, []);
});

t.test('forEachPageRun: a page whose first bytes are zero is still read whole, at any alignment', async (t) => {
  const runsOf = (bytes: Uint8Array) => {
    const runs: [number, number, boolean][] = [];
    forEachPageRun(bytes, (first, count, zero) => runs.push([first, count, zero]));
    return runs;
  };
  const memory = new Uint8Array(40 * PAGE_SIZE);
  memory[2 * PAGE_SIZE + 8] = 1; // just past the first two words
  memory[3 * PAGE_SIZE + PAGE_SIZE - 1] = 1; // the last byte
  memory[20 * PAGE_SIZE + 4] = 1; // the second word
  memory[21 * PAGE_SIZE] = 1;
  const expected = [[0, 2, true], [2, 2, false], [4, 16, true], [20, 2, false], [22, 18, true]];
  t.same(runsOf(memory), expected);
  // The same pages at an offset no word view can start at.
  const unaligned = new Uint8Array(memory.length + 1).subarray(1);
  unaligned.set(memory);
  t.same(runsOf(unaligned), expected);
});

t.test('encodePageBatch makes the very section encodePages does', async (t) => {
  const pages = 3 * MAX_BATCH_PAGES;
  const ram = new Uint8Array(pages * PAGE_SIZE);
  let seed = 12345;
  const random = () => (seed = (seed * 1103515245 + 12345) >>> 0) / 2 ** 32;
  for (let page = 0; page < pages; page++) {
    const kind = random();
    if (kind < 0.4) continue; // zero
    if (kind < 0.5) ram[page * PAGE_SIZE + Math.floor(random() * PAGE_SIZE)] = 1 + Math.floor(random() * 255); // one byte anywhere
    else for (let i = 0; i < PAGE_SIZE; i += 64) ram[page * PAGE_SIZE + i] = Math.floor(random() * 256);
  }
  const out = new Uint8Array(MAX_BATCH_SECTION_BYTES);
  const read = (at: number, length: number) => ram.subarray(at, at + length);
  const batches = [
    [{ firstPage: 0, pageCount: MAX_BATCH_PAGES }],
    [{ firstPage: 7, pageCount: 100 }, { firstPage: 107, pageCount: 3 }, { firstPage: 300, pageCount: 200 }],
    [{ firstPage: 2 * MAX_BATCH_PAGES + 1, pageCount: 1 }],
    [{ firstPage: MAX_BATCH_PAGES, pageCount: 0 }, { firstPage: MAX_BATCH_PAGES + 5, pageCount: MAX_BATCH_PAGES - 5 }],
  ];
  for (const [index, batch] of batches.entries()) {
    for (const destinationZeroed of [true, false]) {
      const expected = encodePages(batch, read, { destinationZeroed, memoryBytes: ram.length });
      const made = encodePageBatch(ram, batch, destinationZeroed, out);
      t.same(Buffer.from(made.section), Buffer.concat(expected.sections), `batch ${index}, destinationZeroed ${destinationZeroed}`);
      t.same([made.pagesSent, made.zeroPages], [expected.pagesSent, expected.zeroPages]);
    }
  }
  // All zero, the destination zeroed: nothing to send.
  const empty = encodePageBatch(new Uint8Array(8 * PAGE_SIZE), [{ firstPage: 0, pageCount: 8 }], true, out);
  t.same([empty.section.length, empty.pagesSent, empty.zeroPages], [0, 0, 8]);
  t.throws(() => encodePageBatch(ram, [{ firstPage: pages - 1, pageCount: 2 }], true, out), { code: 'ERR_OUT_OF_RANGE' });
  t.throws(() => encodePageBatch(ram, [{ firstPage: 0, pageCount: MAX_BATCH_PAGES + 1 }], true, out), { code: 'ERR_OUT_OF_RANGE' });
  t.throws(() => encodePageBatch(ram, [{ firstPage: 0, pageCount: MAX_BATCH_PAGES }], false, new Uint8Array(PAGE_SIZE)), { code: 'ERR_OUT_OF_RANGE' });
});

t.test('header', async (t) => {
  t.test('round trip', async (t) => {
    const bytes = encodeHeader({ kind: 'migration', memoryBytes: MAX_MEMORY_BYTES, vcpuCount: MAX_VCPUS });
    t.equal(bytes.length, HEADER_BYTES);
    t.equal(Buffer.from(bytes.subarray(0, 8)).toString('latin1'), 'NODE-KVM');
    const header = decodeHeader(bytes);
    t.same({ ...header, streamId: undefined }, { version: 4, kind: 'migration', memoryBytes: 3 * 1024 * MiB, vcpuCount: 255, streamId: undefined, parentId: new Uint8Array(16) });
    t.equal(STREAM_VERSION, 4);
    t.equal(header.streamId.length, 16);
    t.notSame(decodeHeader(encodeHeader({ kind: 'migration', memoryBytes: 4096, vcpuCount: 1 })).streamId, header.streamId, 'stream ids are random');
    const parentId = new Uint8Array(16).fill(7);
    const streamId = new Uint8Array(16).fill(9);
    const diff = decodeHeader(encodeHeader({ kind: 'diff-snapshot', memoryBytes: 8192, vcpuCount: 1, streamId, parentId }));
    t.same(diff, { version: 4, kind: 'diff-snapshot', memoryBytes: 8192, vcpuCount: 1, streamId, parentId });
    t.equal(decodeHeader(encodeHeader({ kind: 'snapshot', memoryBytes: 8192, vcpuCount: 2 })).kind, 'snapshot');
  });

  t.test('encodeHeader rejects bad arguments', async (t) => {
    const good = { kind: 'migration' as const, memoryBytes: 4096, vcpuCount: 1 };
    t.throws(() => encodeHeader({ ...good, kind: 'toString' as 'migration' }), RangeError);
    t.throws(() => encodeHeader({ ...good, memoryBytes: 4095 }), RangeError);
    t.throws(() => encodeHeader({ ...good, memoryBytes: 0 }), RangeError);
    t.throws(() => encodeHeader({ ...good, vcpuCount: 0 }), RangeError);
    t.throws(() => encodeHeader({ ...good, vcpuCount: 256 }), { name: 'RangeError', code: 'ERR_OUT_OF_RANGE', message: 'vcpuCount must be an integer 1..255, got 256' });
    t.throws(() => encodeHeader({ ...good, memoryBytes: 3 * 1024 * MiB + 4096 }), {
      name: 'RangeError', code: 'ERR_OUT_OF_RANGE', message: 'memoryBytes must be a positive multiple of 4096 up to 3221225472, got 3221229568',
    });
    t.throws(() => encodeHeader({ ...good, streamId: new Uint8Array(15) }), RangeError);
    t.throws(() => encodeHeader({ ...good, streamId: [1] as unknown as Uint8Array }), TypeError);
    t.throws(() => encodeHeader({ ...good, parentId: new Uint8Array(16).fill(1) }), RangeError, 'a parent only for diffs');
    t.throws(() => encodeHeader({ ...good, kind: 'diff-snapshot' }), RangeError, 'a diff needs a parent');
    t.throws(() => encodeHeader(null as never), TypeError);
  });

  t.test('wrong magic, future version, every flipped byte', async (t) => {
    const good = encodeHeader({ kind: 'migration', memoryBytes: 1 * MiB, vcpuCount: 2 });
    const wrongMagic = good.slice();
    wrongMagic.set(Buffer.from('GARBAGE!'), 0);
    await expectMigrationError(t, () => decodeHeader(wrongMagic), 'EMAGIC',
      "not a node-kvm migration stream or snapshot: the first 8 bytes are 4741524241474521, expected 'NODE-KVM'");
    const future = good.slice();
    viewOf(future).setUint32(8, 7, true);
    await expectMigrationError(t, () => decodeHeader(future), 'EVERSION', 'stream version 7 is not supported (this build reads versions 2 to 4)');
    await expectMigrationError(t, () => decodeHeader(good.subarray(0, 67)), 'ETRUNCATED', 'migration stream truncated: expected 68 bytes of the stream header, got 67');
    for (let offset = 0; offset < HEADER_BYTES; offset++) {
      const flipped = good.slice();
      flipped[offset] ^= 0x10;
      const error = await migrationError(t, () => decodeHeader(flipped));
      t.equal(error.code, offset < 8 ? 'EMAGIC' : offset < 12 ? 'EVERSION' : 'ECHECKSUM', `byte ${offset} flipped`);
    }
    await expectMigrationError(t, () => decodeHeader(flipped(good, 40)), 'ECHECKSUM', 'checksum mismatch in the stream header');
  });

  t.test('fields that pass the checksum but make no sense', async (t) => {
    const base = () => encodeHeader({ kind: 'migration', memoryBytes: 1 * MiB, vcpuCount: 2 });
    const edit = (change: (view: DataView, bytes: Uint8Array) => void) => {
      const bytes = base();
      change(viewOf(bytes), bytes);
      return resealHeader(bytes);
    };
    await expectMigrationError(t, () => decodeHeader(edit((v) => v.setUint32(12, 9, true))), 'EFORMAT', 'unknown stream kind 9 in the stream header');
    await expectMigrationError(t, () => decodeHeader(edit((v) => setU64(v, 16, 4097))), 'EFORMAT',
      'the stream header gives a guest RAM size of 4097 bytes, not a positive multiple of 4096');
    await expectMigrationError(t, () => decodeHeader(edit((v) => v.setBigUint64(16, 2n ** 64n - 4096n, true))), 'EFORMAT',
      'the stream header gives a guest RAM size of more than 2^53 bytes, not a positive multiple of 4096');
    await expectMigrationError(t, () => decodeHeader(edit((v) => v.setUint32(24, 0, true))), 'EFORMAT', 'the stream header gives 0 vCPUs');
    await expectMigrationError(t, () => decodeHeader(edit((v) => v.setUint32(28, 1, true))), 'EFORMAT', 'the stream header has reserved field 1; expected 0');
    await expectMigrationError(t, () => decodeHeader(edit((_, b) => b.fill(1, 48, 64))), 'EFORMAT', 'a migration header has a parent id; only diff snapshots have one');
    await expectMigrationError(t, () => decodeHeader(edit((v) => v.setUint32(12, 3, true))), 'EFORMAT', 'a diff-snapshot header has no parent id');
  });

  t.test('a machine this host could never build is refused as the header is read', async (t) => {
    const base = () => encodeHeader({ kind: 'snapshot', memoryBytes: 1 * MiB, vcpuCount: 2 });
    const edit = (change: (view: DataView) => void) => {
      const bytes = base();
      change(viewOf(bytes));
      return resealHeader(bytes);
    };
    await expectMigrationError(t, () => decodeHeader(edit((v) => setU64(v, 16, 2 ** 40))), 'ETOOBIG',
      'the stream is for a machine with 1048576 MiB of RAM; this host builds machines of at most 3072 MiB');
    await expectMigrationError(t, () => decodeHeader(edit((v) => setU64(v, 16, MAX_MEMORY_BYTES + 4096))), 'ETOOBIG',
      'the stream is for a machine with 3072.00390625 MiB of RAM; this host builds machines of at most 3072 MiB');
    await expectMigrationError(t, () => decodeHeader(edit((v) => v.setUint32(24, 256, true))), 'ETOOBIG',
      'the stream is for a machine with 256 vCPUs; this host builds machines of at most 255');
    t.equal(decodeHeader(edit((v) => v.setUint32(24, MAX_VCPUS, true))).vcpuCount, 255, 'the limits themselves are fine');
  });

  t.test('checkHeader names what does not match', async (t) => {
    const header = decodeHeader(encodeHeader({ kind: 'migration', memoryBytes: 1 * MiB, vcpuCount: 2 }));
    t.doesNotThrow(() => checkHeader(header, { kind: 'migration', memoryBytes: 1 * MiB, vcpuCount: 2 }));
    await expectMigrationError(t, () => checkHeader(header, { kind: 'snapshot' }), 'EMISMATCH', 'expected a snapshot stream, got a migration stream');
    await expectMigrationError(t, () => checkHeader(header, { memoryBytes: 2 * MiB }), 'EMISMATCH', 'the stream carries 1048576 bytes of guest RAM; this machine has 2097152');
    await expectMigrationError(t, () => checkHeader(header, { vcpuCount: 1 }), 'EMISMATCH', 'the stream carries 2 vCPUs; this machine has 1');
  });
});

function flipped(bytes: Uint8Array, offset: number): Uint8Array {
  const copy = bytes.slice();
  copy[offset] ^= 0x01;
  return copy;
}

// A small stream with one section of every type.
function sampleStream() {
  const memory = memoryWith(8, [1, 2, 6]);
  const pages = encodePages([{ firstPage: 0, pageCount: 8 }], reader(memory));
  const chunks = [
    encodeHeader({ kind: 'migration', memoryBytes: memory.length, vcpuCount: 2 }),
    encodeStateSection(SectionType.Config, { name: 'vm1', memoryBytes: memory.length }),
    ...pages.sections,
    encodeStateSection(SectionType.VcpuState, { index: 0, rip: 0xffff_fff0n }),
    encodeStateSection(SectionType.VcpuState, { index: 1, rip: 0x1000n }),
    encodeStateSection(SectionType.VmState, { pit: new Uint8Array([1, 2, 3]) }),
    encodeStateSection(SectionType.DeviceState, { serial: { lcr: 3 } }),
    encodeSection(SectionType.RamImage, new Uint8Array(24), 0),
    encodeErrorSection('destination out of memory'),
    encodeEnd(),
  ];
  return { memory, chunks, bytes: concat(chunks) };
}

t.test('sections', async (t) => {
  t.test('round trip of every section type', async (t) => {
    const { memory, bytes } = sampleStream();
    const { header, sections } = await readAll(bufferSource(bytes));
    t.equal(header.vcpuCount, 2);
    t.same(sections.map((s) => s.name), ['Config', 'Pages', 'VcpuState', 'VcpuState', 'VmState', 'DeviceState', 'RamImage', 'Error', 'End']);
    t.same(decodeStateSection(sections[0]), { name: 'vm1', memoryBytes: memory.length });
    const restored = new Uint8Array(memory.length).fill(0x55);
    t.same(decodePagesInto(sections[1].payload, restored), { pages: 3, zeroPages: 5 });
    t.ok(Buffer.from(restored).equals(memory), 'the Pages section restores memory exactly, zero pages included');
    t.same(decodeStateSection(sections[2]), { index: 0, rip: 0xffff_fff0n });
    t.same(decodeStateSection(sections[4]), { pit: new Uint8Array([1, 2, 3]) });
    t.same(decodeStateSection(sections[5]), { serial: { lcr: 3 } });
    t.equal(decodeErrorSection(sections[7].payload), 'destination out of memory');
    t.equal(sections[8].payload.length, 0);
    await expectMigrationError(t, () => decodeStateSection(sections[1]), 'EFORMAT', 'a Pages section does not hold state');
  });

  t.test('section flags are carried', async (t) => {
    const bytes = concat([encodeHeader({ kind: 'migration', memoryBytes: 4096, vcpuCount: 1 }), encodeSection(SectionType.Config, new Uint8Array([1]), 0xbeef)]);
    const sectionReader = new SectionReader(bufferSource(bytes));
    await sectionReader.readHeader();
    const section = await sectionReader.next();
    t.equal(section.flags, 0xbeef);
    t.same(section.payload, new Uint8Array([1]));
  });

  t.test('the reader is used in order', async (t) => {
    const { bytes } = sampleStream();
    const sectionReader = new SectionReader(bufferSource(bytes));
    await t.rejects(sectionReader.next(), { message: 'read the stream header (readHeader()) before its sections' });
    await sectionReader.readHeader();
    await t.rejects(sectionReader.readHeader(), { message: 'the stream header has already been read' });
    while (!sectionReader.ended) await sectionReader.next();
    await t.rejects(sectionReader.next(), { message: 'the stream has ended: no section follows End' });
    t.throws(() => new SectionReader({} as ByteSource), TypeError);
  });

  t.test('truncated at every byte', async (t) => {
    const { bytes } = sampleStream();
    const codes = new Set<string>();
    for (let length = 0; length < bytes.length; length++) {
      const error = await migrationError(t, () => readAll(bufferSource(bytes.subarray(0, length))));
      codes.add(error.code);
      if (error.code !== 'ETRUNCATED') t.fail(`cut at ${length}: ${error.code} ${error.message}`);
    }
    t.same([...codes], ['ETRUNCATED'], `all ${bytes.length} cuts are reported as truncation`);
    // Exact messages at the boundaries: in the header, in a section header, in a payload, in the CRC.
    const first = HEADER_BYTES;
    await expectMigrationError(t, () => readAll(bufferSource(bytes.subarray(0, 10))), 'ETRUNCATED', 'migration stream truncated: expected 68 bytes of the stream header, got 10');
    await expectMigrationError(t, () => readAll(bufferSource(bytes.subarray(0, first + 3))), 'ETRUNCATED', 'migration stream truncated: expected 8 bytes of a section header, got 3');
    const configLength = viewOf(bytes).getUint32(first + 4, true);
    await expectMigrationError(t, () => readAll(bufferSource(bytes.subarray(0, first + 8 + 5))), 'ETRUNCATED',
      `migration stream truncated: expected ${configLength + 4} bytes of a Config section, got 5`);
    await expectMigrationError(t, () => readAll(bufferSource(bytes.subarray(0, first + 8 + configLength + 2))), 'ETRUNCATED',
      `migration stream truncated: expected ${configLength + 4} bytes of a Config section, got ${configLength + 2}`);
  });

  t.test('a flipped byte anywhere in a section is caught', async (t) => {
    const { bytes } = sampleStream();
    // Section boundaries, to know whether a flip lands in a header field, a payload or a CRC.
    const sectionStarts: number[] = [];
    for (let at = HEADER_BYTES; at < bytes.length; at += 12 + viewOf(bytes).getUint32(at + 4, true)) sectionStarts.push(at);
    let checked = 0;
    for (let offset = HEADER_BYTES; offset < bytes.length; offset++) {
      const start = sectionStarts.filter((s) => s <= offset).at(-1)!;
      const inTypeOrLength = offset - start < 2 || (offset - start >= 4 && offset - start < 8);
      const error = await migrationError(t, () => readAll(bufferSource(flipped(bytes, offset))));
      if (!inTypeOrLength && error.code !== 'ECHECKSUM') t.fail(`flip at ${offset} (section at ${start}): ${error.code} ${error.message}`);
      if (inTypeOrLength && !['ECHECKSUM', 'EFORMAT', 'ETOOBIG', 'ETRUNCATED'].includes(error.code)) t.fail(`flip at ${offset}: ${error.code}`);
      checked++;
    }
    t.equal(checked, bytes.length - HEADER_BYTES, 'every byte after the header was flipped once, and every flip failed');
    const vcpuAt = sectionStarts[3];
    t.equal(viewOf(bytes).getUint16(vcpuAt, true), SectionType.VcpuState);
    await expectMigrationError(t, () => readAll(bufferSource(flipped(bytes, vcpuAt + 10))), 'ECHECKSUM', 'checksum mismatch in VcpuState section');
    await expectMigrationError(t, () => readAll(bufferSource(flipped(bytes, vcpuAt + 2))), 'ECHECKSUM', 'checksum mismatch in VcpuState section');
  });

  t.test('oversize lengths are refused before anything is allocated or read', async (t) => {
    const header = encodeHeader({ kind: 'migration', memoryBytes: 4096, vcpuCount: 1 });
    for (const [name, type] of [['Pages', SectionType.Pages], ['VcpuState', SectionType.VcpuState], ['Config', SectionType.Config], ['End', SectionType.End]] as const) {
      const max = MAX_SECTION_PAYLOAD_BYTES[name];
      const sectionHeader = new Uint8Array(SECTION_HEADER_BYTES);
      viewOf(sectionHeader).setUint16(0, type, true);
      viewOf(sectionHeader).setUint32(4, max + 1, true);
      const inner = bufferSource(concat([header, sectionHeader]));
      const requested: number[] = [];
      const source: ByteSource = { read: (length, what) => (requested.push(length), inner.read(length, what)) };
      await expectMigrationError(t, () => readAll(source), 'ETOOBIG', `a ${name} section of ${max + 1} bytes is over the ${max}-byte limit`);
      t.same(requested, [HEADER_BYTES, SECTION_HEADER_BYTES], 'only the header and the section header were read');
    }
    t.equal(MAX_SECTION_PAYLOAD_BYTES.Pages, 64 * MiB);
    t.equal(MAX_SECTION_PAYLOAD_BYTES.VcpuState, 16 * MiB);
    t.throws(() => encodeSection(SectionType.Config, new Uint8Array(MiB + 1)), RangeError, 'the writer keeps to the limits too');
  });

  t.test('unknown section types', async (t) => {
    const sectionHeader = new Uint8Array(SECTION_HEADER_BYTES);
    viewOf(sectionHeader).setUint16(0, 99, true);
    const bytes = concat([encodeHeader({ kind: 'migration', memoryBytes: 4096, vcpuCount: 1 }), sectionHeader, new Uint8Array(4)]);
    await expectMigrationError(t, () => readAll(bufferSource(bytes)), 'EFORMAT', 'unknown section type 99');
    t.throws(() => encodeSection(99 as never, new Uint8Array(0)), RangeError);
    t.throws(() => encodeSection(SectionType.Config, 'x' as never), TypeError);
    t.throws(() => encodeSection(SectionType.Config, new Uint8Array(0), 0x10000), RangeError);
  });

  t.test('RamImage payload', async (t) => {
    const section = encodeRamImage({ fileOffset: 8192, sizeBytes: 2 ** 33, crc32c: 0xdeadbeef });
    const payload = section.subarray(SECTION_HEADER_BYTES, section.length - 4);
    t.same(decodeRamImage(payload), { fileOffset: 8192, sizeBytes: 2 ** 33, crc32c: 0xdeadbeef });
    await expectMigrationError(t, () => decodeRamImage(new Uint8Array(23)), 'EFORMAT', 'a RamImage section holds 24 bytes, got 23');
    const edit = (change: (view: DataView) => void) => {
      const copy = payload.slice();
      change(viewOf(copy));
      return copy;
    };
    await expectMigrationError(t, () => decodeRamImage(edit((v) => setU64(v, 0, 100))), 'EFORMAT', 'the RAM image offset 100 is not a multiple of 4096');
    await expectMigrationError(t, () => decodeRamImage(edit((v) => v.setUint32(4, 0xffffffff, true))), 'EFORMAT', 'the RAM image offset beyond 2^53 is not a multiple of 4096');
    await expectMigrationError(t, () => decodeRamImage(edit((v) => setU64(v, 8, 0))), 'EFORMAT', 'the RAM image size 0 is not a positive multiple of 4096');
    await expectMigrationError(t, () => decodeRamImage(edit((v) => v.setUint32(20, 1, true))), 'EFORMAT', 'the RamImage section has a non-zero reserved field');
    t.throws(() => encodeRamImage({ fileOffset: 1, sizeBytes: 4096, crc32c: 0 }), RangeError);
    t.throws(() => encodeRamImage({ fileOffset: 0, sizeBytes: 0, crc32c: 0 }), RangeError);
    t.throws(() => encodeRamImage({ fileOffset: 0, sizeBytes: 4096, crc32c: -1 }), { name: 'RangeError', message: 'crc32c must be a u32, got -1' });
  });

  t.test('Error sections are cut to their limit', async (t) => {
    const section = encodeErrorSection('x'.repeat(70000));
    t.equal(section.length, 12 + MAX_SECTION_PAYLOAD_BYTES.Error);
  });
});

t.test('Pages', async (t) => {
  t.test('zero pages become zero ranges; non-zero runs carry data', async (t) => {
    const memory = memoryWith(64, [3, 4, 5, 10, 41, 63]);
    const result = encodePages([{ firstPage: 0, pageCount: 16 }, { firstPage: 20, pageCount: 4 }, { firstPage: 40, pageCount: 24 }], reader(memory), { memoryBytes: memory.length });
    t.equal(result.sections.length, 1);
    t.same({ pagesSent: result.pagesSent, zeroPages: result.zeroPages }, { pagesSent: 6, zeroPages: 38 });
    t.equal(result.bytes, result.sections[0].length);
    const section = result.sections[0];
    const payload = section.subarray(SECTION_HEADER_BYTES, section.length - 4);
    t.equal(payload.length, 4 + 16 * 10 + 6 * PAGE_SIZE, '10 ranges and 6 pages of data');
    const P = PAGE_SIZE;
    t.same(applied(payload, memory.length), [
      [0, 3 * P, 'zero'], [3 * P, 3 * P, 4], [6 * P, 4 * P, 'zero'], [10 * P, P, 11], [11 * P, 5 * P, 'zero'],
      [20 * P, 4 * P, 'zero'],
      [40 * P, P, 'zero'], [41 * P, P, 42], [42 * P, 21 * P, 'zero'], [63 * P, P, 64],
    ]);
    const restored = new Uint8Array(memory.length).fill(0x77);
    t.same(decodePagesInto(payload, restored), { pages: 6, zeroPages: 38 });
    for (const [first, count] of [[0, 16], [20, 4], [40, 24]]) {
      t.ok(Buffer.from(restored.subarray(first * P, (first + count) * P)).equals(memory.subarray(first * P, (first + count) * P)), `pages ${first}+${count} restored`);
    }
    t.ok(restored.subarray(16 * P, 20 * P).every((b) => b === 0x77), 'pages outside the ranges untouched');
  });

  t.test('destinationZeroed leaves zero pages out', async (t) => {
    const memory = memoryWith(32, [1, 30]);
    const result = encodePages([{ firstPage: 0, pageCount: 32 }], reader(memory), { destinationZeroed: true });
    t.same({ pagesSent: result.pagesSent, zeroPages: result.zeroPages }, { pagesSent: 2, zeroPages: 30 });
    const payload = result.sections[0].subarray(SECTION_HEADER_BYTES, -4);
    t.same(applied(payload, memory.length), [[PAGE_SIZE, PAGE_SIZE, 2], [30 * PAGE_SIZE, PAGE_SIZE, 31]]);
    const empty = encodePages([{ firstPage: 0, pageCount: 4 }], reader(new Uint8Array(4 * PAGE_SIZE)), { destinationZeroed: true });
    t.same(empty, { sections: [], pagesSent: 0, zeroPages: 4, bytes: 0 }, 'all-zero memory makes no section');
  });

  t.test('data is split into sections of at most maxDataBytesPerSection', async (t) => {
    const all = Array.from({ length: 9 }, (_, i) => i);
    const memory = memoryWith(9, all);
    const result = encodePages([{ firstPage: 0, pageCount: 9 }], reader(memory), { maxDataBytesPerSection: 2 * PAGE_SIZE });
    t.equal(result.sections.length, 5);
    t.equal(result.bytes, result.sections.reduce((sum, s) => sum + s.length, 0));
    const restored = new Uint8Array(memory.length);
    const source = bufferSource(concat([encodeHeader({ kind: 'migration', memoryBytes: memory.length, vcpuCount: 1 }), ...result.sections, encodeEnd()]));
    const { sections } = await readAll(source);
    const perSection = sections.filter((s) => s.name === 'Pages').map((s) => decodePagesInto(s.payload, restored).pages);
    t.same(perSection, [2, 2, 2, 2, 1]);
    t.ok(Buffer.from(restored).equals(memory));
  });

  t.test('a run across read blocks stays one range; reads are at most 1 MiB', async (t) => {
    const all = Array.from({ length: 600 }, (_, i) => i);
    const memory = memoryWith(600, all);
    const reads: number[] = [];
    const result = encodePages([{ firstPage: 0, pageCount: 600 }], (addr, length) => (reads.push(length), memory.subarray(addr, addr + length)),
      { maxDataBytesPerSection: 4 * MiB });
    t.same(reads, [256 * PAGE_SIZE, 256 * PAGE_SIZE, 88 * PAGE_SIZE]);
    t.equal(result.sections.length, 1);
    const payload = result.sections[0].subarray(SECTION_HEADER_BYTES, -4);
    t.equal(viewOf(payload).getUint32(0, true), 1, 'one range');
    t.same(applied(payload, memory.length), [[0, 600 * PAGE_SIZE, 1]]);
  });

  t.test('page data is copied before the checksum: later guest writes do not change the section', async (t) => {
    const memory = memoryWith(4, [0, 1, 2, 3]);
    const original = memory.slice();
    const result = encodePages([{ firstPage: 0, pageCount: 4 }], reader(memory));
    memory.fill(0x99);
    const { sections } = await readAll(bufferSource(concat([encodeHeader({ kind: 'migration', memoryBytes: memory.length, vcpuCount: 1 }), ...result.sections, encodeEnd()])));
    const restored = new Uint8Array(memory.length);
    decodePagesInto(sections[0].payload, restored);
    t.ok(Buffer.from(restored).equals(original), 'the section holds the pages as they were when encoded');
  });

  t.test('encodePages rejects bad arguments', async (t) => {
    const memory = new Uint8Array(4 * PAGE_SIZE);
    t.throws(() => encodePages('x' as never, reader(memory)), TypeError);
    t.throws(() => encodePages([], 'x' as never), TypeError);
    t.throws(() => encodePages([null as never], reader(memory)), TypeError);
    t.throws(() => encodePages([{ firstPage: -1, pageCount: 1 }], reader(memory)), RangeError);
    t.throws(() => encodePages([{ firstPage: 0, pageCount: 1.5 }], reader(memory)), RangeError);
    t.throws(() => encodePages([{ firstPage: 2, pageCount: 3 }], reader(memory), { memoryBytes: memory.length }),
      { name: 'RangeError', message: 'ranges[0] (pages 2..4) lies beyond guest RAM (4 pages)' });
    t.throws(() => encodePages([{ firstPage: 0, pageCount: 1 }], reader(memory), { maxDataBytesPerSection: 100 }), RangeError);
    t.throws(() => encodePages([{ firstPage: 0, pageCount: 1 }], reader(memory), { memoryBytes: 100 }), RangeError);
    t.throws(() => encodePages([{ firstPage: 0, pageCount: 2 }], () => new Uint8Array(10)), RangeError, 'read returned the wrong length');
    t.same(encodePages([{ firstPage: 0, pageCount: 0 }], reader(memory)).sections, [], 'an empty range sends nothing');
  });

  t.test('decodePages checks every range before applying any', async (t) => {
    const memoryBytes = 16 * PAGE_SIZE;
    const cases: [string, Uint8Array, string][] = [
      ['beyond RAM', pagesPayload([[0n, 1, 1], [15n, 2, 1]], 0), 'Pages range 1 (2 pages from page 0xf) lies outside guest RAM (0x10 pages)'],
      ['starts at the end', pagesPayload([[16n, 1, 1]], 0), 'Pages range 0 (1 pages from page 0x10) lies outside guest RAM (0x10 pages)'],
      ['firstPage near 2^64', pagesPayload([[2n ** 64n - 1n, 1, 1]], 0), 'Pages range 0 (1 pages from page 0xffffffffffffffff) lies outside guest RAM (0x10 pages)'],
      ['firstPage 2^53', pagesPayload([[2n ** 53n, 1, 1]], 0), 'Pages range 0 (1 pages from page 0x20000000000000) lies outside guest RAM (0x10 pages)'],
      ['pageCount wraps', pagesPayload([[1n, 0xffffffff, 1]], 0), 'Pages range 0 (4294967295 pages from page 0x1) lies outside guest RAM (0x10 pages)'],
      ['empty range', pagesPayload([[1n, 0, 1]], 0), 'Pages range 0 is empty'],
      ['unknown flags', pagesPayload([[1n, 1, 3]], 0), 'Pages range 0 has unknown flags 0x3'],
      ['data short', pagesPayload([[0n, 1, 1], [1n, 2, 0]], PAGE_SIZE), "a Pages section's ranges announce 8192 bytes of page data but it holds 4096"],
      ['data long', pagesPayload([[1n, 1, 0]], PAGE_SIZE + 1), "a Pages section's ranges announce 4096 bytes of page data but it holds 4097"],
      ['zero range with data', pagesPayload([[1n, 1, 1]], PAGE_SIZE), "a Pages section's ranges announce 0 bytes of page data but it holds 4096"],
      ['too many ranges', (() => { const p = pagesPayload([[1n, 1, 1]], 0); viewOf(p).setUint32(0, 0xffffffff, true); return p; })(),
        'a Pages section announces 4294967295 ranges (68719476724 bytes of table) but holds 20 bytes'],
      ['no range count', new Uint8Array(3), 'a Pages section of 3 bytes is too short for its range count'],
    ];
    for (const [name, payload, message] of cases) {
      let calls = 0;
      await expectMigrationError(t, () => decodePages(payload, memoryBytes, () => calls++), 'EFORMAT', message);
      t.equal(calls, 0, `${name}: nothing applied`);
    }
    t.same(decodePages(pagesPayload([], 0), memoryBytes, () => t.fail('no ranges')), { pages: 0, zeroPages: 0 });
    t.same(applied(pagesPayload([[15n, 1, 1]], 0), memoryBytes), [[15 * PAGE_SIZE, PAGE_SIZE, 'zero']], 'the last page is inside');
    t.throws(() => decodePages(new Uint8Array(4), 100, () => {}), RangeError);
    t.throws(() => decodePages('x' as never, 4096, () => {}), TypeError);
    t.throws(() => decodePages(new Uint8Array(4), 4096, null as never), TypeError);
    t.throws(() => decodePagesInto(new Uint8Array(4), [] as never), TypeError);
  });
});

t.test('state codec', async (t) => {
  t.test('round trips exactly', async (t) => {
    const state = {
      regs: { rax: 0n, rip: 0xffff_ffff_ffff_fff0n, negative: -0x1234n, big: 2n ** 200n },
      xsave: new Uint8Array([0, 1, 2, 254, 255]),
      empty: new Uint8Array(0),
      msrs: [{ index: 0x10, value: 123456789012345678n }, { index: 0xc0000080, value: 0x500n }],
      flags: [true, false, null],
      numbers: [0, -1, 1.5, Number.MAX_SAFE_INTEGER, NaN, Infinity, -Infinity, -0],
      text: 'ünïcødé ✓ \u0000 "quoted"',
      dollar: { $bigint: 'not a tag', $$x: 1, $: 2 },
      nested: { a: { b: { c: [[[]]] } } },
    };
    const bytes = encodeState(state);
    t.type(bytes, Uint8Array);
    const decoded = decodeState(bytes) as typeof state;
    t.same(decoded, state);
    t.ok(Object.is(decoded.numbers[7], -0), '-0 stays -0');
    t.ok(Number.isNaN(decoded.numbers[4]));
    t.equal(decoded.regs.rip, 0xffff_ffff_ffff_fff0n);
    t.equal(decoded.regs.negative, -0x1234n);
    t.equal(Object.getPrototypeOf(decoded.xsave), Uint8Array.prototype, 'bytes come back as a Uint8Array');
    t.equal(decoded.xsave.byteOffset, 0, 'with a buffer of its own');
    t.same(Object.keys(decoded.dollar), ['$bigint', '$$x', '$'], 'keys starting with $ are data, not tags');
    t.equal(Buffer.from(encodeState({ a: 1n })).toString(), '{"a":{"$bigint":"0x1"}}');
    t.same(decodeState(encodeState({ a: undefined, b: 1 })), { b: 1 }, 'undefined properties are left out');
    t.same(decodeState(encodeState(Buffer.from([1, 2]))), new Uint8Array([1, 2]));
    t.equal(decodeState(encodeState(null)), null);
  });

  t.test('encodeState names what it cannot encode', async (t) => {
    t.throws(() => encodeState({ a: { b: () => 1 } }), { name: 'TypeError', message: 'cannot encode state.a.b: function is not a state value' });
    t.throws(() => encodeState({ when: new Date() }), { name: 'TypeError', message: 'cannot encode state.when: Date is not a plain object, array, bigint or Uint8Array' });
    t.throws(() => encodeState({ words: new Uint32Array(2) }), TypeError);
    t.throws(() => encodeState([1, undefined]), { name: 'TypeError', message: 'cannot encode state[1]: undefined in an array' });
    t.throws(() => encodeState(Symbol('x')), TypeError);
    const cycle: Record<string, unknown> = {};
    cycle.self = cycle;
    t.throws(() => encodeState(cycle), { name: 'TypeError', message: 'cannot encode state.self: it refers back to itself' });
    const shared = { x: 1 };
    t.same(decodeState(encodeState({ a: shared, b: shared })), { a: { x: 1 }, b: { x: 1 } }, 'a shared object is not a cycle');
    t.throws(() => encodeState({ a: [shared, { b: () => 1 }] }), TypeError);
    t.same(decodeState(encodeState([shared, [shared]])), [{ x: 1 }, [{ x: 1 }]], 'nor after an encoding that failed inside it');
    t.throws(() => encodeState(JSON.parse('{"__proto__": 1}')), TypeError);
    t.throws(() => encodeState({ constructor: 1 }), TypeError);
    let deep: unknown = 1;
    for (let i = 0; i < 70; i++) deep = [deep];
    t.throws(() => encodeState(deep), TypeError);
  });

  t.test('decodeState throws only EFORMAT on bad input', async (t) => {
    const bad: [string, string | Uint8Array, string][] = [
      ['invalid UTF-8', new Uint8Array([0x7b, 0xff, 0x7d]), 'the VcpuState section is not valid state: not UTF-8'],
      ['not JSON', '{"a":', ''],
      ['__proto__', '{"__proto__":{"polluted":true}}', "the VcpuState section is not valid state: state has the key '__proto__'"],
      ['nested constructor', '{"a":{"constructor":{"prototype":1}}}', "the VcpuState section is not valid state: state.a has the key 'constructor'"],
      ['prototype', '[{"prototype":1}]', "the VcpuState section is not valid state: state[0] has the key 'prototype'"],
      ['unknown tag', '{"$date":"x"}', "the VcpuState section is not valid state: state has the unknown tag '$date'"],
      ['tag mixed with keys', '{"$bigint":"0x1","b":2}', "the VcpuState section is not valid state: state mixes the tag '$bigint' with other keys"],
      ['tag not a string', '{"$bigint":12}', 'the VcpuState section is not valid state: state: the $bigint tag needs a string'],
      ['decimal bigint', '{"$bigint":"12"}', "the VcpuState section is not valid state: state: '12' is not a hexadecimal bigint"],
      ['bad base64', '{"$bytes":"a*=="}', 'the VcpuState section is not valid state: state: the bytes are not valid base64'],
      ['base64 bad length', '{"$bytes":"abc"}', 'the VcpuState section is not valid state: state: the bytes are not valid base64'],
      ['bad number tag', '{"$number":"1e999"}', "the VcpuState section is not valid state: state: '1e999' is not NaN, Infinity, -Infinity or -0"],
      ['too deep', '['.repeat(100) + ']'.repeat(100), 'the VcpuState section is not valid state: state' + '[0]'.repeat(64) + ' is nested more than 64 levels'],
      ['very deep', '['.repeat(1e6) + ']'.repeat(1e6), ''],
    ];
    for (const [name, input, message] of bad) {
      const bytes = typeof input === 'string' ? Buffer.from(input) : input;
      const error = await migrationError(t, () => decodeState(bytes, 'the VcpuState section'));
      t.equal(error.code, 'EFORMAT', name);
      if (message) t.equal(error.message, message, name);
      else t.match(error.message, /^the VcpuState section is not valid state: /, name);
    }
    t.equal(({} as Record<string, unknown>).polluted, undefined, 'Object.prototype untouched');
    t.same(decodeState(Buffer.from('{"$bytes":""}')), new Uint8Array(0));
    t.throws(() => decodeState('x' as never), TypeError);
  });

  t.test('state sections', async (t) => {
    t.throws(() => encodeStateSection(SectionType.Pages as never, {}), RangeError);
    t.throws(() => encodeStateSection(SectionType.Config, { a: new Uint8Array(MiB) }), RangeError, 'over the Config limit');
  });
});

// ---------------------------------------------------------------------------------------------
// Byte sources

t.test('fileSource reads from an fd or a FileHandle, and reports truncation with the offset', async (t) => {
  const dir = mkdtempSync(nodePath.join(os.tmpdir(), 'node-kvm-stream-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const { bytes } = sampleStream();
  const file = nodePath.join(dir, 'stream.bin');
  writeFileSync(file, bytes);
  const fd = openSync(file, 'r');
  t.teardown(() => closeSync(fd));
  const fromFd = await readAll(fileSource(fd));
  t.equal(fromFd.sections.length, 9);
  const handle = await open(file, 'r');
  t.teardown(() => handle.close());
  const fromHandle = await readAll(fileSource(handle));
  t.same(fromHandle.sections.map((s) => s.payload), fromFd.sections.map((s) => s.payload));
  const source = fileSource(handle, bytes.length - 4);
  t.equal(source.position, bytes.length - 4);
  await expectMigrationError(t, () => source.read(10, 'a Pages section'), 'ETRUNCATED',
    `snapshot file truncated: expected 10 bytes of a Pages section at offset ${bytes.length - 4}, got 4`);
  t.same(await fileSource(fd, 0).read(0), new Uint8Array(0));
  t.throws(() => fileSource(-1), RangeError);
  t.throws(() => fileSource({} as never), TypeError);
  await t.rejects(fileSource(fd).read(-1), RangeError);

  // Bytes read already (ahead) come first; a read past them goes to the file.
  const ahead = new FileSource(fd, 8, { sync: true, ahead: Uint8Array.from(bytes.subarray(8, 24)) });
  t.same(await ahead.read(10), bytes.subarray(8, 18), 'from the bytes given');
  t.same(await ahead.read(10), bytes.subarray(18, 28), 'past them: from the file');
  t.equal(ahead.position, 28);
  const marked = new FileSource(fd, 0, { sync: true, ahead: new Uint8Array(16).fill(0xee) });
  t.same(await marked.read(16), new Uint8Array(16).fill(0xee), 'the bytes given are taken as the file\'s');
  t.throws(() => new FileSource(fd, 0, { ahead: [1, 2] as never }), { code: 'ERR_INVALID_ARG_TYPE' });
});

/** A connected pair of TCP sockets on the loopback interface. */
async function socketPair(t: Test): Promise<{ client: net.Socket; server: net.Socket }> {
  const listener = net.createServer();
  await new Promise<void>((resolve) => listener.listen(0, '127.0.0.1', resolve));
  const accepted = new Promise<net.Socket>((resolve) => listener.once('connection', resolve));
  const client = net.connect((listener.address() as net.AddressInfo).port, '127.0.0.1');
  const server = await accepted;
  await new Promise<void>((resolve) => (client.connecting ? client.once('connect', resolve) : resolve()));
  listener.close();
  t.teardown(() => {
    client.destroy();
    server.destroy();
  });
  return { client, server };
}

t.test('socketSource over a real socket pair', async (t) => {
  t.test('a whole stream with 12 MiB of pages, written with writeChunks', async (t) => {
    const { client, server } = await socketPair(t);
    const pageCount = 3072;
    const memory = memoryWith(pageCount, Array.from({ length: pageCount }, (_, i) => i).filter((i) => i % 3 !== 0));
    const pages = encodePages([{ firstPage: 0, pageCount }], reader(memory), { maxDataBytesPerSection: 4 * MiB });
    const chunks = [encodeHeader({ kind: 'migration', memoryBytes: memory.length, vcpuCount: 1 }), ...pages.sections, encodeStateSection(SectionType.VcpuState, { rip: 1n }), encodeEnd()];
    const source = socketSource(server, 10_000);
    const [received] = await Promise.all([readAll(source), writeChunks(client, chunks)]);
    const restored = new Uint8Array(memory.length);
    for (const section of received.sections) if (section.name === 'Pages') decodePagesInto(section.payload, restored);
    t.ok(Buffer.from(restored).equals(memory), 'memory arrives intact');
    t.same(decodeStateSection(received.sections.at(-2)!), { rip: 1n });
    t.equal(source.bytesReceived, chunks.reduce((sum, c) => sum + c.length, 0));
    t.equal(source.bytesBuffered, 0);
    source.close();
  });

  t.test('the peer closes in the middle of a section', async (t) => {
    const { client, server } = await socketPair(t);
    const memory = memoryWith(256, Array.from({ length: 256 }, (_, i) => i));
    const [section] = encodePages([{ firstPage: 0, pageCount: 256 }], reader(memory), { maxDataBytesPerSection: MiB }).sections;
    const header = encodeHeader({ kind: 'migration', memoryBytes: memory.length, vcpuCount: 1 });
    const source = socketSource(server, 10_000);
    const sectionReader = new SectionReader(source);
    const sent = HEADER_BYTES + 1000;
    await writeChunks(client, [header, section.subarray(0, 1000)]);
    client.end();
    await sectionReader.readHeader();
    await expectMigrationError(t, () => sectionReader.next(), 'ETRUNCATED',
      `migration stream truncated: peer closed the migration stream after ${sent} bytes (expected ${section.length - 8} bytes of a Pages section, got 992)`);
    t.equal(source.bytesBuffered, 992, 'the failed read consumed nothing');
    await expectMigrationError(t, () => source.read(993, 'a section header'), 'ETRUNCATED',
      `migration stream truncated: peer closed the migration stream after ${sent} bytes (expected 993 bytes of a section header, got 992)`);
  });

  t.test('a stall longer than timeoutMs', async (t) => {
    const { client, server } = await socketPair(t);
    const source = socketSource(server, 200);
    await writeChunks(client, [new Uint8Array(30)]);
    await expectMigrationError(t, () => source.read(100, 'the stream header'), 'ETIMEDOUT',
      'migration stream stalled: no data for 200 ms after 30 bytes (expected 100 bytes of the stream header, got 30)');
    await expectMigrationError(t, () => source.read(100, 'the stream header'), 'ETIMEDOUT',
      'migration stream stalled: no data for 200 ms after 30 bytes (expected 100 bytes of the stream header, got 30)');
    t.same(await source.read(30), new Uint8Array(30), 'what arrived can still be read');
  });

  t.test('a socket error fails the waiting read', async (t) => {
    const stream = new PassThrough();
    const source = socketSource(stream, 10_000);
    const reading = source.read(8, 'a section header');
    stream.destroy(new Error('connection reset'));
    await expectMigrationError(t, () => reading, 'ETRUNCATED', 'migration stream failed after 0 bytes: connection reset (expected 8 bytes of a section header, got 0)');
  });

  t.test('one read at a time; close() fails the waiting read', async (t) => {
    const stream = new PassThrough();
    const source = socketSource(stream, 10_000);
    const first = source.read(4, 'a section header');
    await t.rejects(source.read(4), { message: 'a read is already waiting: read one thing at a time' });
    source.close();
    await expectMigrationError(t, () => first, 'ETRUNCATED', 'migration stream closed locally while waiting for 4 bytes of a section header');
    await t.rejects(source.read(1), { message: 'the SocketSource is closed' });
    t.equal(stream.listenerCount('data'), 0, 'detached from the stream');
    source.close();
  });

  t.test('detach() hands over what the stream holds unread too, once the source paused it', async (t) => {
    const stream = new PassThrough({ highWaterMark: 64 * 1024 });
    const source = socketSource(stream, 10_000);
    const sent = Buffer.alloc(17 * MiB + 100_000);
    for (let i = 0; i < sent.length; i += 4) sent.writeUInt32LE(i, i);
    t.same(await Promise.all([source.read(4, 'a first word'), stream.write(sent.subarray(0, 17 * MiB))]).then(([word]) => word), sent.subarray(0, 4));
    // Past 16 MiB the source pauses the stream: what comes next waits in the stream's own buffer.
    t.ok(stream.isPaused(), 'paused by the source');
    stream.write(sent.subarray(17 * MiB));
    t.equal(stream.readableLength, 100_000, 'the stream holds the last bytes unread');
    const rest = source.detach();
    t.equal(stream.readableLength, 0, 'nothing left unread in the stream');
    t.ok(Buffer.concat(rest).equals(sent.subarray(4)), 'every byte after the first word, in order');
  });

  t.test('reads spanning chunks, views within one chunk, and pausing above 16 MiB unread', async (t) => {
    const stream = new PassThrough({ highWaterMark: 64 * 1024 });
    const source = socketSource(stream, 10_000);
    stream.write(Buffer.from([1, 2, 3]));
    stream.write(Buffer.from([4, 5]));
    stream.write(Buffer.from([6, 7, 8, 9]));
    t.same(await source.read(4), new Uint8Array([1, 2, 3, 4]));
    t.same(await source.read(1), new Uint8Array([5]));
    t.same(await source.read(4), new Uint8Array([6, 7, 8, 9]));
    const big = Buffer.alloc(17 * MiB, 0xab);
    stream.write(big);
    await new Promise((resolve) => setImmediate(resolve));
    t.equal(stream.isPaused(), true, 'paused with 17 MiB unread');
    const whole = source.read(17 * MiB + 1);
    stream.write(Buffer.from([0xcd]));
    const bytes = await whole;
    t.equal(bytes.length, 17 * MiB + 1);
    t.equal(bytes[17 * MiB - 1], 0xab);
    t.equal(bytes[17 * MiB], 0xcd);
    t.equal(stream.isPaused(), false, 'resumed by the read');
    stream.end();
    await expectMigrationError(t, () => source.read(1), 'ETRUNCATED', `migration stream truncated: peer closed the migration stream after ${17 * MiB + 10} bytes (expected 1 bytes of data, got 0)`);
  });

  t.test('a source on a stream that has already ended', async (t) => {
    const stream = new PassThrough();
    stream.destroy();
    await new Promise((resolve) => setImmediate(resolve));
    const source = socketSource(stream, 1000);
    await expectMigrationError(t, () => source.read(1), 'ETRUNCATED', 'migration stream truncated: peer closed the migration stream after 0 bytes (expected 1 bytes of data, got 0)');
  });

  t.test('socketSource rejects bad arguments', async (t) => {
    t.throws(() => socketSource({} as never, 1000), TypeError);
    t.throws(() => socketSource(new PassThrough(), 0), RangeError);
    t.throws(() => socketSource(new PassThrough(), 2 ** 31), RangeError);
    t.doesNotThrow(() => socketSource(new PassThrough(), Infinity).close(), 'Infinity: no stall timeout');
  });
});

t.test('writeChunks', async (t) => {
  t.test('waits for drain and keeps the order', async (t) => {
    const received: number[] = [];
    let drains = 0;
    const slow = new Writable({
      highWaterMark: 16,
      write(chunk: Buffer, _encoding, callback) {
        received.push(...chunk);
        setImmediate(callback);
      },
    });
    slow.on('drain', () => drains++);
    const chunks = Array.from({ length: 50 }, (_, i) => new Uint8Array([i, i, i, i, i, i, i, i, i, i]));
    await writeChunks(slow, chunks);
    t.same(received, chunks.flatMap((c) => [...c]), 'every byte, in order');
    t.ok(drains > 0, 'the buffer filled and drained');
    await writeChunks(slow, []);
  });

  t.test('rejects when the socket is closed or fails', async (t) => {
    const { client, server } = await socketPair(t);
    server.destroy();
    const huge = Array.from({ length: 64 }, () => new Uint8Array(MiB));
    await expectMigrationError(t, () => writeChunks(client, huge), 'ECLOSED', /^(writing the migration stream failed: |the connection closed while the migration stream was being written)/);
    client.destroy();
    await expectMigrationError(t, () => writeChunks(client, [new Uint8Array(1)]), 'ECLOSED', 'cannot write the migration stream: the connection is closed');
    await t.rejects(writeChunks({} as never, []), { name: 'TypeError', code: 'ERR_INVALID_ARG_TYPE' });
    await t.rejects(writeChunks(new PassThrough(), ['x'] as never), { name: 'TypeError', code: 'ERR_INVALID_ARG_TYPE' });
  });
});
