// Machine.prepare() and Machine.restore(path, { prepared }): a machine built ahead takes a snapshot
// of its shape (the guest continues its count with the memory it had), refuses one of another
// shape and stays ready, serves one restore only, and frees everything when closed unused.
import { closeSync, mkdtempSync, openSync, rmSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import v8 from 'node:v8';
import vm from 'node:vm';
import t, { type Test } from 'tap';
import { GuestMemory, Machine, type PreparedMachine, type VcpuWorkerPool } from '../../lib/index.js';
import { fileDataRanges } from '../../lib/kvm/host.js';
import { noKvm } from '../helpers/kvm.js';
import { isUnbrokenCount, lastPass, memoryHash, MiB, startDirtier } from '../helpers/migration.js';
import { sharedPool } from '../helpers/pool.js';
import { serialCollector } from '../helpers/serial-collector.js';

v8.setFlagsFromString('--expose-gc');
/** Collects garbage: a stopped machine's guest RAM stays mapped while an ArrayBuffer over it lives. */
const collect = vm.runInNewContext('gc') as () => void;
/** Collects garbage, then lets the freed buffers' mappings go (they are released after the collection). */
async function gc(): Promise<void> {
  collect();
  await new Promise((resolve) => setImmediate(resolve));
}

const pool: VcpuWorkerPool | undefined = noKvm ? undefined : sharedPool(2);

function scratchDir(t: Test): string {
  const dir = mkdtempSync(path.join(tmpdir(), 'node-kvm-prepared-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** A running dirtier snapshotted paused: the file, its memory hash and what it had printed. */
async function dirtierSnapshot(file: string, options: { memoryBytes: number; vcpus?: number; rng?: boolean; diffAfterPasses?: number; hash?: boolean }) {
  const source = await startDirtier({ memoryBytes: options.memoryBytes, vcpus: options.vcpus, config: { pool, rng: options.rng } });
  try {
    await source.waitForOutput('pass 2 ok\n');
    await source.machine.pause();
    await source.machine.snapshot(file);
    let restoreFrom = file;
    if (options.diffAfterPasses) {
      const pass = lastPass(source.output());
      source.machine.resume();
      await source.waitForOutput(`pass ${pass + options.diffAfterPasses} ok\n`);
      await source.machine.pause();
      restoreFrom = `${file}.diff`;
      await source.machine.snapshot(restoreFrom, { diff: true });
    }
    // (Hashing makes an ArrayBuffer over guest RAM, which keeps it mapped until collected.)
    return { path: restoreFrom, hash: options.hash === false ? '' : memoryHash(source.machine.memory), output: source.output() };
  } finally {
    await source.machine.stop();
  }
}

t.test('a snapshot restored into a prepared machine: same memory, the count goes on; used once only', { skip: noKvm }, async (t) => {
  const dir = scratchDir(t);
  const snap = await dirtierSnapshot(path.join(dir, 'a.snap'), { memoryBytes: 32 * MiB, vcpus: 2 });
  const serial = serialCollector();
  const prepared = await Machine.prepare(snap.path, { pool, serial: { output: serial.sink }, log: () => {} });
  t.teardown(() => prepared.close());
  t.equal(prepared.state, 'ready');
  t.same([prepared.shape.memoryBytes, prepared.shape.vcpus, prepared.shape.irqchip], [32 * MiB, 2, true]);

  const machine = await Machine.restore(snap.path, { prepared });
  t.teardown(() => machine.stop());
  t.equal(prepared.state, 'used');
  t.equal(machine.state, 'created');
  t.equal(memoryHash(machine.memory), snap.hash, 'the restored memory hashes the same as at the snapshot');
  machine.start();
  await serial.waitForPass(lastPass(snap.output) + 2);
  const all = snap.output + serial.output();
  t.ok(isUnbrokenCount(all), `the count continues with no gap, restart or BAD: ${JSON.stringify(all.slice(-80))}`);

  await t.rejects(Machine.restore(snap.path, { prepared }), { code: 'ERR_MACHINE_STATE', message: /used it already/ }, 'a second restore into it is refused');
  await prepared.close();
  t.equal(machine.state, 'running', 'closing a used prepared machine leaves the restored one alone');
});

t.test('a diff snapshot restored into a prepared machine: base and diff in its memory', { skip: noKvm }, async (t) => {
  const dir = scratchDir(t);
  const snap = await dirtierSnapshot(path.join(dir, 'base.snap'), { memoryBytes: 32 * MiB, diffAfterPasses: 2 });
  const serial = serialCollector();
  const prepared = await Machine.prepare(snap.path, { pool, serial: { output: serial.sink }, log: () => {} });
  t.teardown(() => prepared.close());
  const machine = await Machine.restore(snap.path, { prepared });
  t.teardown(() => machine.stop());
  t.equal(memoryHash(machine.memory), snap.hash, 'base + diff = the memory at the diff snapshot');
  machine.start();
  await serial.waitForPass(lastPass(snap.output) + 2);
  t.ok(isUnbrokenCount(snap.output + serial.output()), 'the count continues from the diff snapshot');
});

t.test('a snapshot of another shape is refused and the prepared machine stays ready', { skip: noKvm }, async (t) => {
  const dir = scratchDir(t);
  const small = await dirtierSnapshot(path.join(dir, 'small.snap'), { memoryBytes: 16 * MiB });
  const twoVcpus = await dirtierSnapshot(path.join(dir, 'two.snap'), { memoryBytes: 32 * MiB, vcpus: 2 });
  const withRng = await dirtierSnapshot(path.join(dir, 'rng.snap'), { memoryBytes: 32 * MiB, rng: true });
  const fits = await dirtierSnapshot(path.join(dir, 'fits.snap'), { memoryBytes: 32 * MiB });
  const serial = serialCollector();
  const prepared = await Machine.prepare(fits.path, { pool, serial: { output: serial.sink }, log: () => {} });
  t.teardown(() => prepared.close());

  await t.rejects(Machine.restore(small.path, { prepared }), { code: 'EMISMATCH', message: /16 MiB, 1 vCPU.*prepared one has 32 MiB, 1 vCPU/ }, 'another RAM size');
  await t.rejects(Machine.restore(twoVcpus.path, { prepared }), { code: 'EMISMATCH', message: /32 MiB, 2 vCPUs.*prepared one has 32 MiB, 1 vCPU/ }, 'another vCPU count');
  await t.rejects(Machine.restore(withRng.path, { prepared }), { code: 'EMISMATCH', message: /devices do not fit/ }, 'another device set');
  await t.rejects(Machine.restore(path.join(dir, 'missing.snap'), { prepared }), { code: 'ENOENT' }, 'a file that is not there');
  await t.rejects(Machine.restore(fits.path, { prepared, serial: { output: null } }), { code: 'ERR_INVALID_ARG_VALUE', message: /Machine\.prepare\(\): serial given here/ }, 'runtime options belong to prepare()');
  await t.rejects(Machine.restore(fits.path, { prepared: {} as PreparedMachine }), { code: 'ERR_INVALID_ARG_TYPE' }, 'only what prepare() made');
  t.equal(prepared.state, 'ready', 'still ready after every refusal');

  // Nothing was lost: the snapshot that fits restores and runs.
  const machine = await Machine.restore(fits.path, { prepared });
  t.teardown(() => machine.stop());
  t.equal(memoryHash(machine.memory), fits.hash);
  machine.start();
  await serial.waitForPass(lastPass(fits.output) + 2);
  t.ok(isUnbrokenCount(fits.output + serial.output()), 'the count continues');
});

t.test('closing an unused prepared machine frees its memory and threads', { skip: noKvm }, async (t) => {
  const dir = scratchDir(t);
  const snap = await dirtierSnapshot(path.join(dir, 'a.snap'), { memoryBytes: 16 * MiB, hash: false });
  await gc();
  const before = GuestMemory.stats();
  const prepared = await Machine.prepare(snap.path, { pool, serial: { output: null }, log: () => {} });
  t.same(GuestMemory.stats(), { mappings: before.mappings + 1, bytes: before.bytes + 16 * MiB }, 'it holds guest RAM while it waits');
  await prepared.close();
  t.equal(prepared.state, 'closed');
  await gc();
  t.same(GuestMemory.stats(), before, 'its guest RAM is unmapped');
  t.equal(pool!.idleCount, 2, 'its vCPU thread is back in the pool');
  await t.rejects(Machine.restore(snap.path, { prepared }), { code: 'ERR_MACHINE_STATE', message: /closed/ });
  await prepared.close(); // again: nothing to do

  // Closed while a restore checks a snapshot that does not fit: closed once the restore gives it back.
  const other = await dirtierSnapshot(path.join(dir, 'other.snap'), { memoryBytes: 8 * MiB, hash: false });
  const second = await Machine.prepare(snap.path, { pool, serial: { output: null }, log: () => {} });
  const restoring = Machine.restore(other.path, { prepared: second });
  t.equal(second.state, 'restoring', 'a restore holds it from the call on');
  const closing = second.close();
  await t.rejects(restoring, { code: 'EMISMATCH' });
  await closing;
  t.equal(second.state, 'closed');
  await gc();
  t.same(GuestMemory.stats(), before, 'its guest RAM is unmapped too');
});

t.test('fileDataRanges() finds the data of a sparse file, page-rounded, within the range asked', async (t) => {
  const dir = scratchDir(t);
  const file = path.join(dir, 'sparse');
  const fd = openSync(file, 'w+');
  t.teardown(() => closeSync(fd));
  writeSync(fd, Buffer.from('a'), 0, 1, 100);
  writeSync(fd, Buffer.alloc(8192, 1), 0, 8192, 1 * MiB);
  writeSync(fd, Buffer.from('z'), 0, 1, 4 * MiB - 1);
  const ranges = fileDataRanges(fd, 0, 4 * MiB);
  // A file system may allocate more than was written (never less): each write lies in a range.
  for (const [offset, length] of [[100, 1], [1 * MiB, 8192], [4 * MiB - 1, 1]]) {
    t.ok(ranges.some(([start, bytes]) => start <= offset! && offset! + length! <= start + bytes), `byte ${offset} is in a data range`);
  }
  t.ok(ranges.every(([start, bytes]) => start % 4096 === 0 && bytes % 4096 === 0 && bytes > 0), 'page-aligned');
  t.ok(ranges.reduce((sum, [, bytes]) => sum + bytes, 0) < 2 * MiB, 'the holes are left out');
  t.same(fileDataRanges(fd, 2 * MiB, 3 * MiB), [], 'none in a hole');
  const clamped = fileDataRanges(fd, 1 * MiB + 4096, 1 * MiB + 8192);
  t.same(clamped, [[1 * MiB + 4096, 4096]], 'clamped to the range asked');
});
