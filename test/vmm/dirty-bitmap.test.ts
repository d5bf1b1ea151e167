// DirtyBitmap: the VMM's own dirty bitmap, shared by every vCPU thread.
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { Worker } from 'node:worker_threads';
import t from 'tap';
import { appendWordRuns, DirtyBitmap, MAX_BITMAP_PAGES, orLogWords, takeWordRanges } from '../../lib/vmm/dirty-bitmap.js';
import type { PageRange } from '../../lib/migration/types.js';
import { rangesOf } from '../helpers/dirty-pages.js';

const PAGE = 4096;

/** Sorted, merged ranges of a set of pages: what takeRanges() must return. */
t.test('create sizes the shared buffer in 32-bit words', async (t) => {
  t.equal(DirtyBitmap.create(1).shared.byteLength, 4);
  t.equal(DirtyBitmap.create(32).shared.byteLength, 4);
  t.equal(DirtyBitmap.create(33).shared.byteLength, 8);
  const bitmap = DirtyBitmap.create(262144);
  t.equal(bitmap.shared.byteLength, 32768, '1 GiB of pages in 8192 words');
  t.equal(bitmap.pageCount, 262144);
  t.ok(bitmap.shared instanceof SharedArrayBuffer);
  t.ok(bitmap.isEmpty());
  t.same(bitmap.takeRanges(), []);
  t.throws(() => DirtyBitmap.create(-1), RangeError);
  t.throws(() => DirtyBitmap.create(1.5), RangeError);
  t.throws(() => DirtyBitmap.create(MAX_BITMAP_PAGES + 1), RangeError);
  t.throws(() => DirtyBitmap.create('8' as unknown as number), { name: 'TypeError', message: 'pageCount must be a number, got string' });
});

t.test('mark covers every page the byte range touches', async (t) => {
  const bitmap = DirtyBitmap.create(128);
  bitmap.mark(0, 1);
  t.same(bitmap.takeRanges(), [{ firstPage: 0, pageCount: 1 }], 'one byte');
  bitmap.mark(PAGE - 1, 2);
  t.same(bitmap.takeRanges(), [{ firstPage: 0, pageCount: 2 }], 'two bytes across a page boundary');
  bitmap.mark(5 * PAGE, PAGE);
  t.same(bitmap.takeRanges(), [{ firstPage: 5, pageCount: 1 }], 'a whole page, exactly');
  bitmap.mark(5 * PAGE + 1, PAGE);
  t.same(bitmap.takeRanges(), [{ firstPage: 5, pageCount: 2 }], 'a page length starting off a boundary');
  bitmap.mark(30 * PAGE + 100, 3 * PAGE);
  t.same(bitmap.takeRanges(), [{ firstPage: 30, pageCount: 4 }], 'across a 32-bit word boundary');
  bitmap.mark(127 * PAGE + PAGE - 1, 1);
  t.same(bitmap.takeRanges(), [{ firstPage: 127, pageCount: 1 }], 'the last byte');
  bitmap.mark(0, 128 * PAGE);
  t.same(bitmap.takeRanges(), [{ firstPage: 0, pageCount: 128 }], 'everything');
  bitmap.mark(128 * PAGE, 0);
  bitmap.mark(3 * PAGE, 0);
  t.ok(bitmap.isEmpty(), 'length 0 marks nothing, even at the end');
});

t.test('mark and markPages refuse what lies outside the bitmap', async (t) => {
  const bitmap = DirtyBitmap.create(128);
  t.throws(() => bitmap.mark(128 * PAGE, 1), {
    name: 'RangeError', message: '[0x80000, 0x80001) is outside the dirty bitmap (128 pages, up to 0x80000)',
  });
  t.throws(() => bitmap.mark(127 * PAGE, PAGE + 1), RangeError, 'one byte past the end');
  t.throws(() => bitmap.mark(-1, 1), { name: 'RangeError', message: 'guestPhysAddr must be a non-negative integer, got -1' });
  t.throws(() => bitmap.mark(0, -1), RangeError);
  t.throws(() => bitmap.mark(0.5, 1), RangeError);
  t.throws(() => bitmap.mark(2 ** 60, 1), RangeError, 'beyond safe integers');
  t.throws(() => bitmap.mark(0n as unknown as number, 1), { name: 'TypeError', message: 'guestPhysAddr must be a number, got bigint' });
  t.throws(() => bitmap.markPages(128, 1), { name: 'RangeError', message: 'pages [128, 129) are outside the dirty bitmap (128 pages)' });
  t.throws(() => bitmap.markPages(100, 29), RangeError);
  t.throws(() => bitmap.markPages(-1, 1), RangeError);
  t.throws(() => bitmap.markPages(0, '1' as unknown as number), TypeError);
  bitmap.markPages(128, 0);
  t.ok(bitmap.isEmpty(), 'refused marks left nothing behind');
});

t.test('takeRanges returns sorted, merged ranges and empties the bitmap', async (t) => {
  const bitmap = DirtyBitmap.create(256);
  bitmap.markPages(40, 3);
  bitmap.markPages(1, 2);
  bitmap.markPages(3, 1);
  bitmap.markPages(31, 1);
  bitmap.markPages(32, 1);
  bitmap.markPages(200, 56);
  bitmap.markPages(41, 10);
  t.notOk(bitmap.isEmpty());
  t.same(bitmap.takeRanges(), [
    { firstPage: 1, pageCount: 3 },
    { firstPage: 31, pageCount: 2 },
    { firstPage: 40, pageCount: 11 },
    { firstPage: 200, pageCount: 56 },
  ]);
  t.ok(bitmap.isEmpty());
  t.same(bitmap.takeRanges(), [], 'taken pages are gone');
  bitmap.markPages(0, 256);
  t.same(bitmap.takeRanges(), [{ firstPage: 0, pageCount: 256 }], 'full words merge into one range');
  bitmap.markPages(31, 1);
  bitmap.markPages(63, 2);
  t.same(bitmap.takeRanges(), [{ firstPage: 31, pageCount: 1 }, { firstPage: 63, pageCount: 2 }], 'bit 31 (the sign bit) of a word');
});

t.test('takeRanges matches a reference set over a big sparse bitmap', async (t) => {
  const pageCount = 262144 + 17;
  const bitmap = DirtyBitmap.create(pageCount);
  let seed = 0x12345678;
  const random = () => {
    seed ^= seed << 13;
    seed ^= seed >>> 17;
    seed ^= seed << 5;
    return (seed >>> 0) / 2 ** 32;
  };
  const expected = new Set<number>();
  for (let i = 0; i < 2000; i++) {
    const first = Math.floor(random() * pageCount);
    const count = Math.min(pageCount - first, 1 + Math.floor(random() * (random() < 0.1 ? 200 : 3)));
    bitmap.markPages(first, count);
    for (let page = first; page < first + count; page++) expected.add(page);
  }
  bitmap.markPages(pageCount - 1, 1);
  expected.add(pageCount - 1);
  t.same(bitmap.takeRanges(), rangesOf(expected));
  t.ok(bitmap.isEmpty());
});

t.test('clear unmarks everything', async (t) => {
  const bitmap = DirtyBitmap.create(100);
  bitmap.markPages(0, 100);
  bitmap.clear();
  t.ok(bitmap.isEmpty());
  t.same(bitmap.takeRanges(), []);
});

t.test('takeInto ORs into a word array and empties the bitmap', async (t) => {
  const bitmap = DirtyBitmap.create(64);
  const target = new Int32Array(2);
  t.equal(bitmap.takeInto(target), false, 'nothing marked');
  target[0] = 1;
  bitmap.markPages(31, 2);
  t.equal(bitmap.takeInto(target), true);
  t.same([...target], [1 | (1 << 31), 1], 'page 0 kept, pages 31 and 32 added');
  t.ok(bitmap.isEmpty());
  t.throws(() => bitmap.takeInto(new Int32Array(1)), TypeError);
  t.throws(() => bitmap.takeInto(new Uint32Array(2) as unknown as Int32Array), TypeError);
});

t.test('word helpers: runs across words, and reading a private bitmap', async (t) => {
  const ranges: PageRange[] = [];
  appendWordRuns(ranges, 0, 0b1011 | (1 << 31));
  appendWordRuns(ranges, 32, -1);
  appendWordRuns(ranges, 64, 0b1);
  appendWordRuns(ranges, 128, 0x7ffffffe);
  t.same(ranges, [{ firstPage: 0, pageCount: 2 }, { firstPage: 3, pageCount: 1 }, { firstPage: 31, pageCount: 34 }, { firstPage: 129, pageCount: 30 }]);
  const words = new Int32Array([0, 0x80000000 | 0, 1, 0]);
  t.same(takeWordRanges(words), [{ firstPage: 63, pageCount: 2 }]);
  t.same([...words], [0, 0, 0, 0], 'read and zeroed');
});

t.test('a slot\'s dirty log read into a bitmap by guest frame, at a word boundary or within a word', async (t) => {
  const log = new Int32Array([0, 0b101, 0, 0x80000000 | 0, -1]);
  const aligned = new Int32Array(8);
  t.equal(orLogWords(log, 0, log.length, aligned, 64), true);
  t.same([...aligned], [0, 0, 0, 0b101, 0, 0x80000000 | 0, -1, 0], 'the slot\'s page 32 is frame 96');
  const within = new Int32Array(8);
  within[0] = 1;
  t.equal(orLogWords(log, 1, 4, within, 20), true);
  // Slot page 32 is frame 52 (word 1, bit 20); slot page 127 is frame 147 (word 4, bit 19).
  t.same([...within], [1, 0b101 << 20, 0, 0, 1 << 19, 0, 0, 0], 'what was set stays; a word of the log spans two of the bitmap');
  const carried = new Int32Array(3);
  orLogWords(new Int32Array([-1]), 0, 1, carried, 40);
  t.same([...carried], [0, -256, 0xff], 'a full word from frame 40: frames 40-71');
  t.equal(orLogWords(log, 0, 1, aligned, 0), false, 'a range of clean words');
  t.equal(orLogWords(log, 2, 5, null, 0), true, 'without a target it only looks');
  t.same([...log], [0, 0b101, 0, 0x80000000 | 0, -1], 'the log is left as it was');
});

t.test('attach shares the bits, checking the size', async (t) => {
  const bitmap = DirtyBitmap.create(100);
  const view = DirtyBitmap.attach(bitmap.shared, 100);
  view.mark(7 * PAGE, 1);
  t.same(bitmap.takeRanges(), [{ firstPage: 7, pageCount: 1 }]);
  t.ok(view.isEmpty(), 'taken through the other view too');
  t.throws(() => DirtyBitmap.attach(bitmap.shared, 200), { name: 'RangeError', message: 'shared must be 28 bytes for 200 pages, got 16' });
  t.throws(() => DirtyBitmap.attach(new ArrayBuffer(16) as unknown as SharedArrayBuffer, 100), TypeError);
});

t.test('workers mark the same words at once, while this thread takes, and lose no bit', async (t) => {
  // Each worker marks every page of its own residue class once: neighbouring pages of a word come
  // from different threads, so a non-atomic read-modify-write would lose bits, and a take racing
  // a mark must leave the bit for a later take. Each page is marked once, so it appears in
  // exactly one take.
  const pageCount = 1 << 20;
  const workers = 2;
  const bitmap = DirtyBitmap.create(pageCount);
  const go = new Int32Array(new SharedArrayBuffer(8));
  const moduleUrl = new URL('../../lib/vmm/dirty-bitmap.ts', import.meta.url).href;
  // A worker file of our own (test/fixtures belongs to the shared helpers), written for this run.
  const directory = mkdtempSync(path.join(tmpdir(), 'dirty-bitmap-'));
  t.teardown(() => rmSync(directory, { recursive: true, force: true }));
  const script = path.join(directory, 'marker.mjs');
  writeFileSync(script, `
    import { workerData, parentPort } from 'node:worker_threads';
    const { DirtyBitmap } = await import(workerData.moduleUrl);
    const bitmap = DirtyBitmap.attach(workerData.shared, workerData.pageCount);
    const go = new Int32Array(workerData.go);
    Atomics.add(go, 1, 1);
    Atomics.wait(go, 0, 0);
    for (let page = workerData.index; page < workerData.pageCount; page += workerData.workers) bitmap.markPages(page, 1);
    parentPort.postMessage('done');
  `);
  // The test's own loader (TypeScript) without tap's per-process preloads.
  const execArgv = process.execArgv.filter((arg) => !arg.includes('@tapjs/processinfo') && !arg.includes('@tapjs/mock'));
  const finished = Array.from({ length: workers }, (_, index) => new Promise<void>((resolve, reject) => {
    const worker = new Worker(script, {
      execArgv, workerData: { moduleUrl, shared: bitmap.shared, pageCount, index, workers, go: go.buffer },
    });
    worker.on('message', () => resolve());
    worker.on('error', reject);
    worker.on('exit', (code) => (code === 0 ? resolve() : reject(new Error(`worker exited with ${code}`))));
  }));
  while (Atomics.load(go, 1) < workers) await new Promise((resolve) => setTimeout(resolve, 1));
  Atomics.store(go, 0, 1);
  Atomics.notify(go, 0);
  let done = false;
  const all = Promise.all(finished).then(() => {
    done = true;
  });
  const taken: PageRange[][] = [];
  while (!done) {
    taken.push(bitmap.takeRanges());
    await new Promise((resolve) => setImmediate(resolve));
  }
  await all;
  taken.push(bitmap.takeRanges());
  const pages = new Set<number>();
  let reported = 0;
  for (const ranges of taken) {
    for (const { firstPage, pageCount: count } of ranges) {
      reported += count;
      for (let page = firstPage; page < firstPage + count; page++) pages.add(page);
    }
  }
  t.equal(pages.size, pageCount, 'every page was taken');
  t.equal(reported, pageCount, 'and none twice');
  t.ok(bitmap.isEmpty());
});
