// The spare VM's vCPUs, made ahead and handed to the restore's vCPU threads: a restore into them
// gives every vCPU exactly the saved state (registers, MP state, CPUID) and the guest runs on; a
// spare made for another vCPU count is not used; the restore does not wait for its threads to
// take their vCPUs, and a machine paused, stopped or run at once behaves all the same; whatever
// happens, no vCPU fd is left once the machines stop and the pool closes.
import { mkdtempSync, readdirSync, readlinkSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import t, { type Test } from 'tap';
import { Machine, VcpuWorkerPool } from '../../lib/index.js';
import type { VcpuState } from '../../lib/vmm/vcpu-state.js';
import { noKvm } from '../helpers/kvm.js';
import { isUnbrokenCount, lastPass, MiB, startDirtier } from '../helpers/migration.js';
import { untilPool } from '../helpers/pool.js';
import { serialCollector } from '../helpers/serial-collector.js';

/** How many KVM fds of `kind` ('kvm-vm', 'kvm-vcpu') this process holds. */
function kvmFds(kind: string): number {
  let count = 0;
  for (const fd of readdirSync('/proc/self/fd')) {
    try {
      if (readlinkSync(`/proc/self/fd/${fd}`).startsWith(`anon_inode:${kind}`)) count++;
    } catch {
      // closed between the listing and the look
    }
  }
  return count;
}

/** A pool of `threads` keeping a spare VM (closed with the test), a scratch directory, and a dirtier of `vcpus` snapshotted paused there. */
async function setUp(t: Test, vcpus: number, threads: number) {
  const before = { vms: kvmFds('kvm-vm'), vcpus: kvmFds('kvm-vcpu') };
  const pool = await VcpuWorkerPool.create(threads, { spareVm: true });
  t.teardown(() => pool.close());
  const dir = mkdtempSync(path.join(tmpdir(), 'node-kvm-spare-vcpus-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const file = path.join(dir, 'a.snap');
  const source = await startDirtier({ memoryBytes: 32 * MiB, vcpus, config: { pool } });
  try {
    await source.waitForOutput('pass 2 ok\n');
    await source.machine.pause();
    const state = await source.machine.saveState();
    await source.machine.snapshot(file);
    return { before, pool, dir, snap: { path: file, output: source.output(), vcpus: state.vcpus as VcpuState[] } };
  } finally {
    await source.machine.stop();
  }
}

/** Runs a restored (not started) machine two passes on: the count must go on unbroken. */
async function runOn(t: Test, machine: Machine, serial: ReturnType<typeof serialCollector>, output: string): Promise<void> {
  machine.start();
  await serial.waitForPass(lastPass(output) + 2);
  const all = output + serial.output();
  t.ok(isUnbrokenCount(all), `the count continues with no gap, restart or BAD: ${JSON.stringify(all.slice(-80))}`);
  await machine.stop();
}

t.test('a restore into the spare\'s vCPUs gives each the saved state, and the guest runs on', { skip: noKvm }, async (t) => {
  const { before, pool, snap } = await setUp(t, 2, 2);
  pool.makeSpareVm({ memoryBytes: 32 * MiB, vcpus: 2 });
  t.same(pool.spareVmShape, { memoryBytes: 32 * MiB, irqchip: true, vcpus: 2 });
  t.equal(kvmFds('kvm-vcpu'), before.vcpus + 2, 'the spare holds its two vCPUs');
  const taken = pool.spareVmsTaken;
  const serial = serialCollector();
  const machine = await Machine.restore(snap.path, { pool, serial: { output: serial.sink }, log: () => {} });
  t.equal(pool.spareVmsTaken, taken + 1, 'the restore took the spare');
  const restored = (await machine.saveState()).vcpus as VcpuState[];
  t.equal(restored.length, 2);
  for (const [id, saved] of snap.vcpus.entries()) {
    const mine = restored[id]!;
    t.same(mine.regs, saved.regs, `vCPU ${id}: the saved registers`);
    t.same(mine.sregs, saved.sregs, `vCPU ${id}: the saved segment registers`);
    t.equal(mine.mpState, saved.mpState, `vCPU ${id}: the saved MP state`);
    t.same(mine.cpuid, saved.cpuid, `vCPU ${id}: the saved CPUID`);
    t.same(mine.xsave, saved.xsave, `vCPU ${id}: the saved XSAVE area`);
  }
  await runOn(t, machine, serial, snap.output);
  await pool.close();
  t.same({ vms: kvmFds('kvm-vm'), vcpus: kvmFds('kvm-vcpu') }, before, 'no VM or vCPU fd is left once the pool is closed');
});

t.test('a spare made for another vCPU count is not used', { skip: noKvm }, async (t) => {
  const { before, pool, snap } = await setUp(t, 1, 1);
  pool.makeSpareVm({ memoryBytes: 32 * MiB, vcpus: 2 });
  t.equal(pool.spareVmShape?.vcpus, 2);
  const taken = pool.spareVmsTaken;
  const serial = serialCollector();
  const machine = await Machine.restore(snap.path, { pool, serial: { output: serial.sink }, log: () => {} });
  t.equal(pool.spareVmsTaken, taken, 'the unfit spare was not taken');
  t.not(pool.spareVmShape?.vcpus, 2, 'the unfit spare was closed, not kept');
  t.same((await machine.saveState()).vcpus.map((state) => (state as VcpuState).regs), snap.vcpus.map((state) => state.regs), 'the saved registers');
  await runOn(t, machine, serial, snap.output);
  t.throws(() => pool.makeSpareVm({ memoryBytes: 32 * MiB, vcpus: 0 }), { code: 'ERR_OUT_OF_RANGE' });
  await pool.close();
  t.same({ vms: kvmFds('kvm-vm'), vcpus: kvmFds('kvm-vcpu') }, before, 'no VM or vCPU fd is left once the pool is closed');
});

t.test('a restore that fails after its vCPUs took their states closes them', { skip: noKvm }, async (t) => {
  const { before, pool, dir, snap } = await setUp(t, 1, 1);
  pool.makeSpareVm({ memoryBytes: 32 * MiB });
  const taken = pool.spareVmsTaken;
  // An exit trace file that cannot be made fails the build once the machine's parts are made.
  await t.rejects(Machine.restore(snap.path, { pool, traceExits: path.join(dir, 'no-such-dir', 'exits.trace'), log: () => {} }), { code: 'ENOENT' });
  t.equal(pool.spareVmsTaken, taken + 1, 'the spare was taken');
  await pool.close();
  t.same({ vms: kvmFds('kvm-vm'), vcpus: kvmFds('kvm-vcpu') }, before, 'the failed restore closed the VM and the vCPUs it took');
});

t.test('a restore into the spare does not wait for its threads: paused, stopped or run at once, it behaves', { skip: noKvm }, async (t) => {
  const { before, pool, snap } = await setUp(t, 1, 1);
  pool.makeSpareVm({ memoryBytes: 32 * MiB });
  // Paused at once: pause() waits for the thread to park, which it does once it has its vCPU.
  const serial = serialCollector();
  const machine = await Machine.restore(snap.path, { pool, serial: { output: serial.sink }, log: () => {} });
  machine.start();
  await machine.pause();
  t.equal(machine.state, 'paused');
  machine.resume();
  await serial.waitForPass(lastPass(snap.output) + 2);
  t.ok(isUnbrokenCount(snap.output + serial.output()), 'the count goes on after the pause');
  await machine.stop();
  // Stopped before it ever started.
  await untilPool(t, () => pool.spareVmReady, 'the next spare');
  const unstarted = await Machine.restore(snap.path, { pool, log: () => {} });
  const exit = await unstarted.stop();
  t.equal(exit.reason, 'stopped');
  // With CPU affinity to set, the build waits for the thread, and still takes the spare.
  await untilPool(t, () => pool.spareVmReady, 'the next spare');
  const taken = pool.spareVmsTaken;
  const pinned = serialCollector();
  const withAffinity = await Machine.restore(snap.path, { pool, affinity: [[0]], serial: { output: pinned.sink }, log: () => {} });
  t.equal(pool.spareVmsTaken, taken + 1);
  await runOn(t, withAffinity, pinned, snap.output);
  await pool.close();
  t.same({ vms: kvmFds('kvm-vm'), vcpus: kvmFds('kvm-vcpu') }, before, 'no VM or vCPU fd is left once the pool is closed');
});

