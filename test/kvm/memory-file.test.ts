// GuestMemory.mapFile (a file mapped copy-on-write, as guest RAM), memory.backing,
// memory.populatedRanges() (which pages may hold data, found without reading them) and
// memory.dontneed().
import { closeSync, ftruncateSync, mkdtempSync, openSync, readdirSync, readFileSync, readSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { Worker } from 'node:worker_threads';
import t, { type Test } from 'tap';
import { GuestMemory, Kvm, KvmError } from '../../lib/index.js';
import { enterRealMode, guestImage, LOAD_ADDR, noKvm, runToHalt, thrown } from '../helpers/kvm.js';
import { PAGE_BYTES, runTouch, TOUCH_TABLE_ADDR, touchValue } from '../helpers/touch.js';

const KiB = 1024;
const MiB = 1 << 20;
// napi runs the finalizer of a detached external ArrayBuffer on a later turn of the event loop;
// that is when the view's reference to the mapping goes.
const nextTurn = () => new Promise<void>((resolve) => setImmediate(resolve));

// Anonymous and memfd RAM are shmem: where the host makes shmem transparent huge pages, a
// touched page allocates (and reports) its whole 2 MiB.
const shmemSetting = readFileSync('/sys/kernel/mm/transparent_hugepage/shmem_enabled', 'utf8').match(/\[(\w+)\]/)?.[1];
const SHMEM_GRANULE_BYTES = shmemSetting === 'always' || shmemSetting === 'force' || shmemSetting === 'within_size' ? 2 * MiB : PAGE_BYTES;

/** The ranges a write to each of `offsets` leaves populated, in `granuleBytes` units. */
function rangesOf(offsets: readonly number[], granuleBytes = PAGE_BYTES): Array<[number, number]> {
  const ranges: Array<[number, number]> = [];
  for (const start of [...new Set(offsets.map((offset) => offset - (offset % granuleBytes)))].sort((a, b) => a - b)) {
    const last = ranges[ranges.length - 1];
    if (last && last[0] + last[1] === start) last[1] += granuleBytes;
    else ranges.push([start, granuleBytes]);
  }
  return ranges;
}

function tempDir(t: Test): string {
  const dir = mkdtempSync(path.join(tmpdir(), 'node-kvm-memory-file-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** A file of `sizeBytes` (sparse) holding `chunks` at their offsets. */
function sparseFile(t: Test, sizeBytes: number, chunks: Array<[offset: number, bytes: Uint8Array]>): string {
  const file = path.join(tempDir(t), 'ram.bin');
  const fd = openSync(file, 'w');
  try {
    ftruncateSync(fd, sizeBytes);
    for (const [offset, bytes] of chunks) writeSync(fd, bytes, 0, bytes.length, offset);
  } finally {
    closeSync(fd);
  }
  return file;
}

/** Asserts that `fn` throws an error of exactly `expected`'s class and message. */
function throwsExactly(t: Test, fn: () => unknown, expected: Error): void {
  const error = thrown(fn) as Error;
  t.same({ type: error.constructor.name, message: error.message }, { type: expected.constructor.name, message: expected.message }, expected.message);
}

/** Bytes 0..255 repeated, shifted by `seed`. */
const pattern = (length: number, seed = 0) => Uint8Array.from({ length }, (_, i) => (i + seed) & 0xff);

t.test('mapFile maps the bytes of the file, copy-on-write', async (t) => {
  const content = pattern(64 * KiB, 3);
  const file = path.join(tempDir(t), 'ram.bin');
  writeFileSync(file, content);
  const memory = GuestMemory.mapFile(file, { size: 64 * KiB });
  t.teardown(() => memory.close());
  t.equal(memory.backing, 'file');
  t.equal(memory.fd, -1, 'a file mapping exposes no fd');
  t.equal(memory.size, 64 * KiB);
  t.equal(memory.buffer.byteLength, 64 * KiB);
  t.ok(Buffer.from(memory.buffer).equals(content), 'the memory holds the file\'s bytes');

  memory.write(5, Uint8Array.of(0xaa, 0xbb));
  memory.write(60 * KiB, Uint8Array.of(0xcc));
  t.same([...memory.bytes(4, 4)], [content[4], 0xaa, 0xbb, content[7]], 'writes land in the memory');
  t.equal(memory.bytes(60 * KiB, 1)[0], 0xcc);
  t.ok(readFileSync(file).equals(content), 'and never in the file');
  const again = GuestMemory.mapFile(file, { size: 64 * KiB });
  t.teardown(() => again.close());
  t.ok(Buffer.from(again.buffer).equals(content), 'another mapping of the file sees the file\'s bytes');
});

t.test('mapFile maps a window from an offset, and takes an open fd', async (t) => {
  const content = pattern(16 * PAGE_BYTES, 1);
  const file = path.join(tempDir(t), 'ram.bin');
  writeFileSync(file, content);
  const windowed = GuestMemory.mapFile(file, { offset: 4 * PAGE_BYTES, size: 8 * PAGE_BYTES });
  t.teardown(() => windowed.close());
  t.equal(windowed.size, 8 * PAGE_BYTES);
  t.ok(Buffer.from(windowed.buffer).equals(content.subarray(4 * PAGE_BYTES, 12 * PAGE_BYTES)), 'pages 4..11 of the file');

  const fd = openSync(file, 'r');
  const byFd = GuestMemory.mapFile(fd, { offset: 15 * PAGE_BYTES, size: PAGE_BYTES });
  t.teardown(() => byFd.close());
  const position = Buffer.alloc(2);
  t.equal(readSync(fd, position, 0, 2, null), 2);
  t.same([...position], [content[0], content[1]], 'the fd\'s own position is untouched');
  byFd.populatedRanges();
  t.equal(readSync(fd, position, 0, 2, null), 2);
  t.same([...position], [content[2], content[3]], 'and populatedRanges() does not move it');
  closeSync(fd);
  t.ok(Buffer.from(byFd.buffer).equals(content.subarray(15 * PAGE_BYTES)), 'the mapping outlives the caller\'s fd');
});

t.test('mapFile of a memfd memory\'s fd is a copy-on-write clone of that memory', async (t) => {
  const source = GuestMemory.create(4 * MiB, { backing: 'memfd' });
  t.teardown(() => source.close());
  source.write(MiB, Uint8Array.of(1, 2, 3));
  const clone = GuestMemory.mapFile(source.fd, { size: 4 * MiB });
  t.teardown(() => clone.close());
  clone.write(2 * MiB, Uint8Array.of(9));
  const expected = SHMEM_GRANULE_BYTES === PAGE_BYTES ? [[MiB, PAGE_BYTES], [2 * MiB, PAGE_BYTES]] : [[0, 2 * MiB + PAGE_BYTES]];
  t.same(clone.populatedRanges(), expected, 'the source\'s data plus the clone\'s own copy');
  // A copy-on-write fault on a hole of a memfd first fills the hole with zeros (shmem allocates
  // on every fault): a superset, still.
  t.same(source.populatedRanges(), rangesOf([MiB, 2 * MiB], SHMEM_GRANULE_BYTES), 'the source gains a zero page there');
  t.same([...clone.bytes(MiB, 3)], [1, 2, 3], 'the clone reads the source\'s bytes');
  t.equal(source.bytes(2 * MiB, 1)[0], 0, 'the clone\'s write stays in the clone');
});

t.test('mapFile validates its arguments', async (t) => {
  const file = path.join(tempDir(t), 'ram.bin');
  writeFileSync(file, pattern(4 * PAGE_BYTES));
  throwsExactly(t, () => GuestMemory.mapFile(file, { offset: 100, size: PAGE_BYTES }), new RangeError('offset must be a non-negative multiple of 4096, got 100'));
  throwsExactly(t, () => GuestMemory.mapFile(file, { offset: -4096, size: PAGE_BYTES }), new RangeError('offset must be a non-negative multiple of 4096, got -4096'));
  throwsExactly(t, () => GuestMemory.mapFile(file, { offset: '0' as unknown as number, size: PAGE_BYTES }), new TypeError('offset must be a number, got string'));
  throwsExactly(t, () => GuestMemory.mapFile(file, { size: 0 }), new RangeError('size must be a positive multiple of 4096, got 0'));
  throwsExactly(t, () => GuestMemory.mapFile(file, { size: 4095 }), new RangeError('size must be a positive multiple of 4096, got 4095'));
  throwsExactly(t, () => GuestMemory.mapFile(file, { size: 2 ** 33 }),
    new RangeError('size must be at most 4294967296 bytes (one ArrayBuffer on Node 20), got 8589934592; map more RAM as more regions'));
  throwsExactly(t, () => GuestMemory.mapFile(file, { size: '4096' as unknown as number }), new TypeError('size must be a number, got string'));
  throwsExactly(t, () => GuestMemory.mapFile(file, {} as never), new TypeError('size must be a number, got undefined'));
  throwsExactly(t, () => GuestMemory.mapFile(file, undefined as never), new TypeError('options must be an object with a size'));
  throwsExactly(t, () => GuestMemory.mapFile(file, { size: 5 * PAGE_BYTES }),
    new RangeError(`offset + size (20480) is beyond the end of '${file}' (16384 bytes)`));
  throwsExactly(t, () => GuestMemory.mapFile(file, { offset: 2 * PAGE_BYTES, size: 3 * PAGE_BYTES }),
    new RangeError(`offset + size (20480) is beyond the end of '${file}' (16384 bytes)`));
  const missing = path.join(path.dirname(file), 'missing.bin');
  const notFound = thrown(() => GuestMemory.mapFile(missing, { size: PAGE_BYTES })) as NodeJS.ErrnoException;
  t.same({ code: notFound.code, syscall: notFound.syscall, path: notFound.path, message: notFound.message },
    { code: 'ENOENT', syscall: 'open', path: missing, message: `ENOENT: no such file or directory, open '${missing}'` }, 'Node\'s own error, naming the path');
  throwsExactly(t, () => GuestMemory.mapFile(path.dirname(file), { size: PAGE_BYTES }),
    new TypeError(`file must be a regular file; '${path.dirname(file)}' is not`));
  throwsExactly(t, () => GuestMemory.mapFile({} as never, { size: PAGE_BYTES }), new TypeError('file must be a path (string) or an open fd (number), got object'));
  throwsExactly(t, () => GuestMemory.mapFile(null as never, { size: PAGE_BYTES }), new TypeError('file must be a path (string) or an open fd (number), got null'));
  throwsExactly(t, () => GuestMemory.mapFile(-1, { size: PAGE_BYTES }), new RangeError('file must be a path or an fd 0..2^31-1, got -1'));
  throwsExactly(t, () => GuestMemory.mapFile(1.5, { size: PAGE_BYTES }), new RangeError('file must be a path or an fd 0..2^31-1, got 1.5'));
  const notOpen = 0x7ffffff0;
  const badFd = thrown(() => GuestMemory.mapFile(notOpen, { size: PAGE_BYTES })) as NodeJS.ErrnoException;
  t.same({ code: badFd.code, syscall: badFd.syscall }, { code: 'EBADF', syscall: 'fstat' }, 'an fd that is not open');
});

t.test('a file mapping is guest RAM: hello runs from it, and guest writes stay private', { skip: noKvm }, async (t) => {
  // Slot 0 is 1 MiB of the file from offset 64 KiB; the guest sees file offset 64 KiB + x at x.
  const fileOffset = 64 * KiB;
  const targets = [0x20000, 0x30010, 0xf0000];
  const table = new DataView(new ArrayBuffer(2 + 2 * targets.length));
  table.setUint16(0, targets.length, true);
  targets.forEach((target, i) => table.setUint16(2 + 2 * i, target >> 4, true));
  const file = sparseFile(t, fileOffset + MiB, [
    [fileOffset + LOAD_ADDR, guestImage('hello')],
    [fileOffset + 0x20000, Uint8Array.of(0x11, 0x22)],
  ]);
  const before = readFileSync(file);

  const kvm = Kvm.open();
  const vm = kvm.createVm();
  const memory = GuestMemory.mapFile(file, { offset: fileOffset, size: MiB });
  t.teardown(() => {
    vm.close();
    memory.close();
    kvm.close();
  });
  vm.setUserMemoryRegion({ slot: 0, guestPhysAddr: 0, memory });
  const vcpu = vm.createVcpu(0);
  t.teardown(() => vcpu.close());
  enterRealMode(vcpu, LOAD_ADDR);
  t.equal(runToHalt(vcpu), 'Hello from node-kvm!\n', 'hello runs from the file\'s bytes');
  t.same(memory.populatedRanges(), [[LOAD_ADDR & ~0xfff, PAGE_BYTES], [0x20000, PAGE_BYTES]], 'the file\'s data pages; running copied nothing');

  // Now the touch guest: its table and code written by the VMM, its stores by the guest.
  memory.write(TOUCH_TABLE_ADDR, new Uint8Array(table.buffer));
  memory.write(LOAD_ADDR, guestImage('touch'));
  enterRealMode(vcpu, LOAD_ADDR);
  t.same(runTouch(vcpu), { doneMarkers: 1 });
  const view = new DataView(memory.buffer);
  t.same(targets.map((target) => view.getUint16(target, true)), targets.map((_, i) => touchValue(i)), 'the guest\'s stores are in the memory');
  t.ok(readFileSync(file).equals(before), 'the file is unchanged');
  t.same(memory.populatedRanges(), [[0, PAGE_BYTES], [LOAD_ADDR & ~0xfff, PAGE_BYTES], [0x20000, PAGE_BYTES], [0x30000, PAGE_BYTES], [0xf0000, PAGE_BYTES]],
    'the file\'s data pages plus the pages copied on write');
});

t.test('populatedRanges on memfd memory: the pages written, nothing else', async (t) => {
  const memory = GuestMemory.create(64 * MiB, { backing: 'memfd' });
  t.teardown(() => memory.close());
  t.equal(memory.backing, 'memfd');
  t.same(memory.populatedRanges(), [], 'untouched memory has no data');
  const offsets = [0, 5 * PAGE_BYTES + 7, 10 * PAGE_BYTES, 11 * PAGE_BYTES + 4095, 40 * MiB + 100, 64 * MiB - 1];
  for (const offset of offsets) memory.write(offset, Uint8Array.of(1));
  t.same(memory.populatedRanges(), rangesOf(offsets, SHMEM_GRANULE_BYTES), 'sorted, coalesced, page-aligned');

  const viaFd = Buffer.alloc(1);
  t.equal(readSync(memory.fd, viaFd, 0, 1, null), 1);
  t.equal(viaFd[0], 1, 'memory.fd still reads from its own position 0');
  const attached = GuestMemory.attach(memory.handle);
  t.teardown(() => attached.close());
  t.equal(attached.backing, 'memfd');
  t.same(attached.populatedRanges(), rangesOf(offsets, SHMEM_GRANULE_BYTES), 'the same through another view');
});

t.test('populatedRanges on anonymous memory', async (t) => {
  const memory = GuestMemory.create(16 * MiB);
  t.teardown(() => memory.close());
  t.equal(memory.backing, 'anonymous');
  t.equal(memory.fd, -1);
  t.same(memory.populatedRanges(), []);
  const offsets = [3 * PAGE_BYTES, 8 * MiB + 1, 8 * MiB + PAGE_BYTES];
  for (const offset of offsets) memory.write(offset, Uint8Array.of(0xff));
  t.same(memory.populatedRanges(), rangesOf(offsets, SHMEM_GRANULE_BYTES));
});

t.test('populatedRanges on a file mapping: the file\'s data in the window plus copied pages', async (t) => {
  const file = sparseFile(t, 4 * MiB, [
    [0x3000 + 10, pattern(5)],
    [0x80000, pattern(2 * PAGE_BYTES)],
    [MiB + PAGE_BYTES - 1, pattern(2)],
    [3 * MiB, pattern(1)],
  ]);
  const whole = GuestMemory.mapFile(file, { size: 4 * MiB });
  t.teardown(() => whole.close());
  t.same(whole.populatedRanges(), [[0x3000, PAGE_BYTES], [0x80000, 2 * PAGE_BYTES], [MiB, 2 * PAGE_BYTES], [3 * MiB, PAGE_BYTES]], 'the file\'s data pages');
  t.equal(whole.bytes(2 * MiB, PAGE_BYTES).reduce((a, b) => a | b, 0), 0, 'a hole reads as zero');
  t.same(whole.populatedRanges(), [[0x3000, PAGE_BYTES], [0x80000, 2 * PAGE_BYTES], [MiB, 2 * PAGE_BYTES], [3 * MiB, PAGE_BYTES]], 'reading copies nothing');
  whole.write(0x4000, Uint8Array.of(9));
  whole.write(0x80000, Uint8Array.of(9));
  whole.write(2 * MiB + 5, Uint8Array.of(9));
  t.same(whole.populatedRanges(), [[0x3000, 2 * PAGE_BYTES], [0x80000, 2 * PAGE_BYTES], [MiB, 2 * PAGE_BYTES], [2 * MiB, PAGE_BYTES], [3 * MiB, PAGE_BYTES]],
    'plus the pages written through the mapping, coalesced');

  const windowed = GuestMemory.mapFile(file, { offset: 0x80000 + PAGE_BYTES, size: MiB });
  t.teardown(() => windowed.close());
  t.same(windowed.populatedRanges(), [[0, PAGE_BYTES], [MiB - 0x80000 - PAGE_BYTES, 2 * PAGE_BYTES]], 'relative to the window, clipped to it');
});

t.test('dontneed (and dontneedAsync) empties memfd and anonymous pages, and reverts copied file pages', async (t) => {
  const ways = [
    ['dontneed', (memory: GuestMemory, offset: number, length: number) => memory.dontneed(offset, length)],
    ['dontneedAsync', (memory: GuestMemory, offset: number, length: number) => memory.dontneedAsync(offset, length)],
  ] as const;
  for (const [way, drop] of ways) {
    for (const backing of ['memfd', 'anonymous'] as const) {
      const memory = GuestMemory.create(MiB, { backing });
      t.teardown(() => memory.close());
      memory.write(PAGE_BYTES, Uint8Array.of(1));
      memory.write(3 * PAGE_BYTES, Uint8Array.of(2));
      await drop(memory, PAGE_BYTES, PAGE_BYTES);
      t.same(memory.populatedRanges(), rangesOf([3 * PAGE_BYTES], SHMEM_GRANULE_BYTES), `${way}, ${backing}: the page is gone`);
      t.equal(memory.bytes(PAGE_BYTES, 1)[0], 0, `${way}, ${backing}: and reads as zero`);
      t.equal(memory.bytes(3 * PAGE_BYTES, 1)[0], 2, `${way}, ${backing}: the other page keeps its data`);
    }
  }
  const file = sparseFile(t, MiB, [[0, pattern(PAGE_BYTES, 7)]]);
  const memory = GuestMemory.mapFile(file, { size: MiB });
  t.teardown(() => memory.close());
  memory.write(0, Uint8Array.of(0xee));
  memory.write(5 * PAGE_BYTES, Uint8Array.of(0xee));
  memory.dontneed(0, 8 * PAGE_BYTES);
  t.equal(memory.bytes(0, 1)[0], 7, 'the file\'s byte is back');
  t.equal(memory.bytes(5 * PAGE_BYTES, 1)[0], 0, 'and the hole is zero again');
  t.same(memory.populatedRanges(), [[0, PAGE_BYTES]]);
  t.doesNotThrow(() => memory.dontneed(MiB, 0), 'an empty range at the end');
  throwsExactly(t, () => memory.dontneed(100, PAGE_BYTES), new RangeError('offset must be a non-negative multiple of 4096, got 100'));
  throwsExactly(t, () => memory.dontneed(0, 1), new RangeError('length must be a non-negative multiple of 4096, got 1'));
  throwsExactly(t, () => memory.dontneed(MiB - PAGE_BYTES, 2 * PAGE_BYTES), new RangeError(`[${MiB - PAGE_BYTES}, ${MiB + PAGE_BYTES}) is outside guest memory of ${MiB} bytes`));
  throwsExactly(t, () => memory.dontneed('0' as never, PAGE_BYTES), new TypeError('offset must be a number, got string'));
});

t.test('dontneedAsync(): file pages reverted; bad input throws at once; a close meanwhile waits for it', async (t) => {
  const file = sparseFile(t, MiB, [[0, pattern(PAGE_BYTES, 7)]]);
  const memory = GuestMemory.mapFile(file, { size: MiB });
  memory.write(0, Uint8Array.of(0xee));
  await memory.dontneedAsync(0, 8 * PAGE_BYTES);
  t.equal(memory.bytes(0, 1)[0], 7, 'the file\'s byte is back');
  await t.resolves(memory.dontneedAsync(MiB, 0), 'an empty range at the end');
  throwsExactly(t, () => memory.dontneedAsync(100, PAGE_BYTES), new RangeError('offset must be a non-negative multiple of 4096, got 100'));
  throwsExactly(t, () => memory.dontneedAsync(MiB - PAGE_BYTES, 2 * PAGE_BYTES), new RangeError(`[${MiB - PAGE_BYTES}, ${MiB + PAGE_BYTES}) is outside guest memory of ${MiB} bytes`));
  throwsExactly(t, () => memory.dontneedAsync('0' as never, PAGE_BYTES), new TypeError('offset must be a number, got string'));
  memory.close();
  t.throws(() => memory.dontneedAsync(0, PAGE_BYTES), { name: 'KvmError', code: 'EBADF' }, 'closed: EBADF at once');

  // Closed while the pages are being given back: the mapping stays until that is done.
  await nextTurn();
  const before = GuestMemory.stats();
  const busy = GuestMemory.create(32 * MiB, { backing: 'memfd' });
  busy.fill(0, 32 * MiB, 0x11);
  const dropped = busy.dontneedAsync(0, 32 * MiB);
  busy.close();
  await dropped;
  await nextTurn();
  t.same(GuestMemory.stats(), before, 'released once the work let go of it');
});

t.test('closed memory: populatedRanges and dontneed throw EBADF; the file mapping and its fd go', async (t) => {
  await nextTurn();
  const before = { ...GuestMemory.stats(), fds: readdirSync('/proc/self/fd').length };
  const file = sparseFile(t, MiB, [[0, pattern(16)]]);
  const memory = GuestMemory.mapFile(file, { size: MiB });
  t.same(GuestMemory.stats(), { mappings: before.mappings + 1, bytes: before.bytes + MiB });
  const attached = GuestMemory.attach(memory.handle);
  t.equal(attached.backing, 'file');
  t.equal(attached.fd, -1);
  memory.close();
  const closedError = { name: 'KvmError', code: 'EBADF', errno: -9, message: 'GuestMemory handle is closed' };
  const pick = (error: unknown) => {
    const { name, code, errno, message } = error as KvmError;
    return { name, code, errno, message };
  };
  t.same(pick(thrown(() => memory.populatedRanges())), closedError);
  t.same(pick(thrown(() => memory.dontneed(0, PAGE_BYTES))), closedError);
  t.same(attached.populatedRanges(), [[0, PAGE_BYTES]], 'another view still works');
  attached.close();
  t.same(pick(thrown(() => attached.populatedRanges())), closedError);
  await nextTurn();
  t.same({ ...GuestMemory.stats(), fds: readdirSync('/proc/self/fd').length }, before, 'no mapping and no fd left');
});

t.test('another thread closing its view while this one asks for ranges', async (t) => {
  const memory = GuestMemory.create(8 * MiB, { backing: 'memfd' });
  t.teardown(() => memory.close());
  memory.write(2 * MiB, Uint8Array.of(1));
  const lib = new URL('../../lib/kvm/index.js', import.meta.url).href;
  // The worker attaches, asks for ranges, punches and writes pages, and closes, many times over.
  const code = `
    import { parentPort, workerData } from 'node:worker_threads';
    const { GuestMemory } = await import(${JSON.stringify(lib)});
    for (let i = 0; i < 200; i++) {
      const view = GuestMemory.attach(workerData.handle);
      view.populatedRanges();
      view.write(4 * 1024 * 1024 + (i % 16) * 4096, Uint8Array.of(1));
      view.dontneed(4 * 1024 * 1024 + ((i + 8) % 16) * 4096, 4096);
      view.close();
    }
    parentPort.postMessage('done');`;
  const execArgv = process.execArgv.filter((arg) => !arg.includes('@tapjs/processinfo') && !arg.includes('@tapjs/mock'));
  const worker = new Worker(new URL(`data:text/javascript,${encodeURIComponent(code)}`), { workerData: { handle: memory.handle }, execArgv });
  const done = new Promise((resolve, reject) => {
    worker.once('message', resolve);
    worker.once('error', reject);
  });
  let settled = false;
  void done.finally(() => (settled = true));
  const firstRanges = new Set<string>();
  while (!settled) {
    firstRanges.add(JSON.stringify(memory.populatedRanges()[0]));
    await nextTurn();
  }
  t.equal(await done, 'done');
  t.same([...firstRanges], [JSON.stringify(rangesOf([2 * MiB], SHMEM_GRANULE_BYTES)[0])], 'every call here saw the main thread\'s page first');
});

t.test('populate maps pages for writing in one call and changes nothing', { skip: noKvm }, async (t) => {
  const memory = GuestMemory.create(8 * 4096, { backing: 'memfd' });
  t.teardown(() => memory.close());
  memory.write(4096, new Uint8Array([7, 8, 9]));
  const supported = memory.populate(0, 4 * 4096);
  t.type(supported, 'boolean');
  t.same([...memory.bytes(4096, 3)], [7, 8, 9], 'contents are unchanged');
  t.equal(memory.bytes(0, 4 * 4096).filter((byte) => byte !== 0).length, 3, 'populated pages read as zero');
  if (supported) t.same(memory.populatedRanges(), [[0, 4 * 4096]], 'the memfd now holds those pages');
  t.throws(() => memory.populate(1, 4096), RangeError);
  t.throws(() => memory.populate(0, 9 * 4096), RangeError);
  memory.close();
  t.throws(() => memory.populate(0, 4096), { code: 'EBADF' });
});
