// VcpuWorkerPool's spare VM (spareVm option): a restore from a snapshot with the pool takes it
// (guest RAM mapped over its placeholder, the guest's count going on), the next one is made in
// the background, one that does not fit is closed and the restore builds its own VM, and no VM
// fd is left once the machines stop and the pool closes.
import { mkdtempSync, readdirSync, readlinkSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import t, { type Test } from 'tap';
import { Machine, VcpuWorkerPool } from '../../lib/index.js';
import { noKvm } from '../helpers/kvm.js';
import { isUnbrokenCount, lastPass, memoryHash, MiB, startDirtier } from '../helpers/migration.js';
import { untilPool } from '../helpers/pool.js';
import { serialCollector } from '../helpers/serial-collector.js';

/** How many KVM VM fds this process holds. */
function vmFds(): number {
  let count = 0;
  for (const fd of readdirSync('/proc/self/fd')) {
    try {
      if (readlinkSync(`/proc/self/fd/${fd}`) === 'anon_inode:kvm-vm') count++;
    } catch {
      // closed between the listing and the look
    }
  }
  return count;
}

function scratchDir(t: Test): string {
  const dir = mkdtempSync(path.join(tmpdir(), 'node-kvm-spare-vm-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** A dirtier of `memoryBytes` snapshotted paused (pool: the one given): the file, its memory hash, what it had printed. */
async function dirtierSnapshot(file: string, memoryBytes: number, pool: VcpuWorkerPool) {
  const source = await startDirtier({ memoryBytes, config: { pool } });
  try {
    await source.waitForOutput('pass 2 ok\n');
    await source.machine.pause();
    await source.machine.snapshot(file);
    return { path: file, hash: memoryHash(source.machine.memory), output: source.output() };
  } finally {
    await source.machine.stop();
  }
}

/** Restores `snap` with `pool` and runs it two passes on: the count must go on unbroken. */
async function restoreAndRun(t: Test, snap: { path: string; hash: string; output: string }, pool: VcpuWorkerPool, onRestored = async (_machine: Machine) => {}): Promise<Machine> {
  const serial = serialCollector();
  const machine = await Machine.restore(snap.path, { pool, serial: { output: serial.sink }, log: () => {} });
  await onRestored(machine);
  t.equal(memoryHash(machine.memory), snap.hash, 'the restored memory hashes the same as at the snapshot');
  machine.start();
  await serial.waitForPass(lastPass(snap.output) + 2);
  const all = snap.output + serial.output();
  t.ok(isUnbrokenCount(all), `the count continues with no gap, restart or BAD: ${JSON.stringify(all.slice(-80))}`);
  await machine.stop();
  return machine;
}

t.test('a restore takes the spare VM; the next is made in the background; close() frees it', { skip: noKvm }, async (t) => {
  const before = vmFds();
  const pool = await VcpuWorkerPool.create(1, { spareVm: true });
  t.teardown(() => pool.close());
  const dir = scratchDir(t);
  t.equal(pool.spareVmReady, false, 'none before any machine was built');
  const snap = await dirtierSnapshot(path.join(dir, 'a.snap'), 32 * MiB, pool);
  await untilPool(t, () => pool.spareVmReady, 'the spare VM in the shape of the machine built');
  t.equal(vmFds(), before + 1, 'the spare VM holds one VM fd');

  const serial = serialCollector();
  const machine = await Machine.restore(snap.path, { pool, serial: { output: serial.sink }, log: () => {} });
  // (The next spare may be made by now: the pool makes it on a timer once the build is over.)
  t.equal(pool.spareVmsTaken, 1, 'the restore took the spare');
  t.equal(machine.memory.backing, 'file', 'guest RAM is the snapshot file mapped over the spare\'s placeholder');
  t.equal(memoryHash(machine.memory), snap.hash, 'the restored memory hashes the same as at the snapshot');
  machine.start();
  await serial.waitForPass(lastPass(snap.output) + 2);
  const all = snap.output + serial.output();
  t.ok(isUnbrokenCount(all), `the count continues with no gap, restart or BAD: ${JSON.stringify(all.slice(-80))}`);
  await untilPool(t, () => pool.spareVmReady, 'the next spare VM');
  t.equal(vmFds(), before + 2, 'the running machine\'s VM and the new spare');
  await machine.stop();
  t.equal(vmFds(), before + 1, 'the stopped machine gave its VM back');

  // A second restore takes the spare made in the background.
  await restoreAndRun(t, snap, pool);
  await pool.close();
  t.equal(pool.spareVmReady, false);
  t.equal(vmFds(), before, 'no VM fd is left once the pool is closed');
});

/**
 * The VM fds open before, a pool keeping a spare VM (closed at the test's end), a scratch
 * directory, and a dirtier of `memoryBytes` snapshotted there with the pool, its spare then made
 * for `spareBytes` of RAM.
 */
async function spareAndSnapshot(t: Test, name: string, memoryBytes: number, spareBytes: number) {
  const before = vmFds();
  const pool = await VcpuWorkerPool.create(1, { spareVm: true });
  t.teardown(() => pool.close());
  const dir = scratchDir(t);
  const snap = await dirtierSnapshot(path.join(dir, name), memoryBytes, pool);
  pool.makeSpareVm({ memoryBytes: spareBytes });
  // The spare the build left, if one was made by now, is closed in the background.
  await pool.spareVmsClosed();
  return { before, pool, dir, snap };
}

t.test('a spare VM that does not fit is closed; the restore builds its own, the next spare fits', { skip: noKvm }, async (t) => {
  const { before, pool, snap } = await spareAndSnapshot(t, 'b.snap', 48 * MiB, 32 * MiB);
  t.equal(pool.spareVmReady, true, 'made at once');
  t.equal(vmFds(), before + 1);

  // (The next spare may be made by now: the pool makes it on a timer once the build is over.)
  const restored = await restoreAndRun(t, snap, pool, async (machine) => {
    t.equal(machine.memory.backing, 'file', 'guest RAM mapped from the snapshot');
    t.equal(pool.spareVmsTaken, 0, 'the unfit spare was not taken');
    t.not(pool.spareVmShape?.memoryBytes, 32 * MiB, 'the unfit spare was given up, not kept');
    // Its close (KVM's teardown of a VM) runs off the event loop.
    await pool.spareVmsClosed();
    t.equal(vmFds(), before + 1 + (pool.spareVmReady ? 1 : 0), 'the machine\'s own VM, and a new spare if there is one');
  });
  t.equal(restored.memoryBytes, 48 * MiB);
  await untilPool(t, () => pool.spareVmReady, 'a spare VM of the restored shape');
  t.equal(vmFds(), before + 1, 'only the new spare VM is open');
  await restoreAndRun(t, snap, pool, async () => {
    t.equal(pool.spareVmsTaken, 1, 'taken by the second restore');
    t.equal(vmFds(), before + 1 + (pool.spareVmReady ? 1 : 0), 'the machine\'s VM, which was the spare, and a new spare if there is one');
  });

  // One that fits already is kept as it is; a pool closed or without the option refuses.
  await untilPool(t, () => pool.spareVmReady, 'the spare after the second restore');
  pool.makeSpareVm({ memoryBytes: 48 * MiB });
  t.equal(vmFds(), before + 1, 'makeSpareVm() of the shape there makes no second VM');
  t.throws(() => pool.makeSpareVm({ memoryBytes: 3 }), { code: 'ERR_OUT_OF_RANGE' });
  await pool.close();
  t.equal(vmFds(), before, 'no VM fd is left once the pool is closed');
  t.throws(() => pool.makeSpareVm({ memoryBytes: 32 * MiB }), { code: 'ERR_INVALID_STATE', message: /closed/ });
  const plain = VcpuWorkerPool.start(0);
  t.throws(() => plain.makeSpareVm({ memoryBytes: 32 * MiB }), { code: 'ERR_INVALID_STATE', message: /spareVm/ });
  t.throws(() => VcpuWorkerPool.start(0, [], { spareVm: 'yes' as unknown as boolean }), { code: 'ERR_INVALID_ARG_TYPE' });
  await plain.close();
});

t.test('a diff snapshot restored into the spare VM: its pages over the base image', { skip: noKvm }, async (t) => {
  const pool = await VcpuWorkerPool.create(1, { spareVm: true });
  t.teardown(() => pool.close());
  const dir = scratchDir(t);
  const source = await startDirtier({ memoryBytes: 32 * MiB, config: { pool } });
  let snap: { path: string; hash: string; output: string };
  try {
    await source.waitForOutput('pass 2 ok\n');
    await source.machine.pause();
    await source.machine.snapshot(path.join(dir, 'base.snap'));
    source.machine.resume();
    await source.waitForOutput(`pass ${lastPass(source.output()) + 2} ok\n`);
    await source.machine.pause();
    await source.machine.snapshot(path.join(dir, 'diff.snap'), { diff: true });
    snap = { path: path.join(dir, 'diff.snap'), hash: memoryHash(source.machine.memory), output: source.output() };
  } finally {
    await source.machine.stop();
  }
  pool.makeSpareVm({ memoryBytes: 32 * MiB });
  const taken = pool.spareVmsTaken;
  await restoreAndRun(t, snap, pool, async () => {
    t.equal(pool.spareVmsTaken, taken + 1, 'the restore took the spare');
  });
});

t.test('a restore that fails after taking the spare VM closes it', { skip: noKvm }, async (t) => {
  const { before, pool, dir, snap } = await spareAndSnapshot(t, 'c.snap', 32 * MiB, 32 * MiB);
  // An exit trace file that cannot be made fails the build once the machine's parts are made.
  await t.rejects(Machine.restore(snap.path, { pool, traceExits: path.join(dir, 'no-such-dir', 'exits.trace'), log: () => {} }), { code: 'ENOENT' });
  t.equal(pool.spareVmsTaken, 1, 'the spare was taken');
  await pool.close();
  t.equal(vmFds(), before, 'the failed restore closed the VM it took');
});
