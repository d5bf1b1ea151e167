// The `disk` guest (guests/disk.c: a freestanding virtio-mmio block driver) against the VMM's
// virtio-blk: one and two disks, read-only disks, a sector the host prepared before boot, the
// guest's flushed writes in the host file, hostile chains the guest builds on purpose, and
// snapshot and live migration of a machine in the middle of its disk I/O.
import t from 'tap';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { GUEST_PARAMS_ADDR, Machine, type DiskConfig, type MachineExit } from '../../lib/index.js';
import { noKvm, repoRoot } from '../helpers/kvm.js';
import { lastRound, startDiskLoop, untilRound } from '../helpers/disk-loop.js';
import { boot, runToExit } from '../helpers/machine.js';
import { memoryHash } from '../helpers/migration.js';
import { startLocalDestination } from '../helpers/migration-peer.js';
import { sharedPool } from '../helpers/pool.js';
import type { VmState } from '../../lib/vmm/vm-state.js';

const MiB = 1 << 20;
const image = path.join(repoRoot, 'guests', 'build', 'disk.elf');
const SUCCESS = 0x10;
const Mode = { Check: 0, Loop: 1, Hostile: 2 } as const;
// vCPU threads for the file's machines (a migration has two at once), loaded once. Each disk's
// thread still starts with its machine.
const pool = noKvm ? undefined : sharedPool(2);

function tempDir(t: { teardown(fn: () => void): void }): string {
  const dir = mkdtempSync(path.join(tmpdir(), 'node-kvm-disk-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** An image of `sectors` sectors whose sector 0 starts with `text` and a newline, the rest a pattern. */
function makeImage(file: string, sectors: number, text: string): Buffer {
  const bytes = Buffer.alloc(sectors * 512);
  for (let i = 0; i < bytes.length; i++) bytes[i] = (i * 13 + 7) & 0xff;
  bytes.write(`${text}\n`, 0, 'latin1');
  writeFileSync(file, bytes);
  return bytes;
}

function params(mode: number, rounds = 0): Uint8Array {
  const view = new DataView(new ArrayBuffer(24));
  view.setUint32(0, mode, true);
  view.setUint32(4, rounds, true);
  return new Uint8Array(view.buffer);
}

async function runDiskGuest(disks: DiskConfig[], mode: number, logs: string[] = [], extra: { irqchip?: boolean } = {}): Promise<{ exit: MachineExit; output: string }> {
  const booted = await boot({ image, memoryBytes: 64 * MiB, disks, pool, ...extra }, logs);
  booted.machine.writeMemory(GUEST_PARAMS_ADDR, params(mode));
  booted.machine.start();
  const exit = await booted.machine.wait();
  await new Promise((resolve) => setImmediate(resolve));
  return { exit, output: booted.output() };
}

/** Byte k of sector s as the guest's check writes it on disk i. */
const written = (sector: number, k: number, disk: number) => (sector * 31 + k + disk) & 0xff;

t.test('one disk: the guest reads what the host prepared, writes, flushes, and the data is in the file', { skip: noKvm }, async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, 'one.img');
  const token = `prepared by the host ${randomBytes(6).toString('hex')}`;
  const before = makeImage(file, 2048, token);
  const { exit, output } = await runDiskGuest([{ path: file, id: 'node-kvm-test-0' }], Mode.Check);
  t.same(exit, { reason: 'debug-exit', code: SUCCESS, vcpu: 0 }, output);
  t.match(output, 'disk0: 2048 sectors, rw, id "node-kvm-test-0"\n');
  t.match(output, `disk0: sector 0 says "${token}"\n`);
  t.match(output, 'disk0: wrote sectors 8-15, flushed, read back ok\n');
  t.match(output, 'disk0: write-zeroes ok\n');
  t.match(output, 'disk0: discard ok\n');
  t.match(output, 'disk: 1 disks checked\n');
  const after = readFileSync(file);
  const expected = Buffer.from(before);
  for (let sector = 8; sector < 16; sector++) for (let k = 0; k < 512; k++) expected[sector * 512 + k] = written(sector, k, 0);
  expected.fill(0, 16 * 512, 32 * 512);
  t.ok(after.equals(expected), 'the file holds exactly the guest\'s writes, zeroes and discards, and nothing else changed');
});

t.test('two disks, the second read-only: each is checked, the read-only one refuses the write and stays as it was', { skip: noKvm }, async (t) => {
  const dir = tempDir(t);
  const rw = path.join(dir, 'rw.img');
  const ro = path.join(dir, 'ro.img');
  makeImage(rw, 1024, 'first disk');
  const roBytes = makeImage(ro, 4096, 'second disk, read-only');
  const { exit, output } = await runDiskGuest([{ path: rw }, { path: ro, readOnly: true }], Mode.Check);
  t.same(exit, { reason: 'debug-exit', code: SUCCESS, vcpu: 0 }, output);
  t.match(output, 'disk0: 1024 sectors, rw, id "rw.img"\n');
  t.match(output, 'disk1: 4096 sectors, ro, id "ro.img"\n');
  t.match(output, 'disk0: sector 0 says "first disk"\n');
  t.match(output, 'disk1: sector 0 says "second disk, read-only"\n');
  t.match(output, 'disk0: wrote sectors 8-15, flushed, read back ok\n');
  t.match(output, 'disk1: write refused (read-only)\n');
  t.notMatch(output, 'disk1: write-zeroes', 'write-zeroes is not offered on a read-only disk');
  t.match(output, 'disk: 2 disks checked\n');
  t.ok(readFileSync(ro).equals(roBytes), 'the read-only image is unchanged');
  const rwAfter = readFileSync(rw);
  t.equal(rwAfter[8 * 512 + 5], written(8, 5, 0));
});

t.test('with the in-kernel irqchip (interrupts through an irqfd) the guest works the same', { skip: noKvm }, async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, 'irq.img');
  makeImage(file, 256, 'irqchip');
  const { exit, output } = await runDiskGuest([{ path: file }], Mode.Check, [], { irqchip: true });
  t.same(exit, { reason: 'debug-exit', code: SUCCESS, vcpu: 0 }, output);
  t.match(output, 'disk0: wrote sectors 8-15, flushed, read back ok\n');
});

t.test('with the irqchip, a completion raises the disk\'s line: IRR bit 5 of the PIC (through the irqfd)', { skip: noKvm }, async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, 'line.img');
  makeImage(file, 1024, 'line');
  const booted = await boot({ image, memoryBytes: 64 * MiB, disks: [{ path: file }], irqchip: true, pool });
  t.teardown(() => void booted.machine.stop());
  const before = await booted.machine.saveState();
  t.equal((before.vm as VmState).irqchips![0]!.chip[1]! & (1 << 5), 0, 'no request yet: IRQ 5 not requested');
  booted.machine.writeMemory(GUEST_PARAMS_ADDR, params(Mode.Loop, 0));
  booted.machine.start();
  await booted.waitForOutput('round 1 ok\n');
  await booted.machine.pause();
  const after = await booted.machine.saveState();
  t.equal((after.vm as VmState).irqchips![0]!.chip[1]! & (1 << 5), 1 << 5, 'the PIC master latched IRQ 5 (the guest runs with interrupts off)');
  t.equal(after.devices.virtio![0]!.interruptStatus & 1, 1, 'InterruptStatus: used buffer');
  await booted.machine.stop();
});

t.test('no disk: the guest finds no device', { skip: noKvm }, async (t) => {
  const { exit, output } = await runToExit({ image, memoryBytes: 16 * MiB, serial: {}, pool });
  t.same(exit, { reason: 'debug-exit', code: 0x7e, vcpu: 0 });
  t.match(output, 'disk: no virtio-blk device found\n');
});

t.test('hostile chains from the guest: each fails alone, the VMM logs it once, the device recovers', { skip: noKvm }, async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, 'hostile.img');
  const bytes = makeImage(file, 64, 'hostile');
  const logs: string[] = [];
  const { exit, output } = await runDiskGuest([{ path: file }], Mode.Hostile, logs);
  t.same(exit, { reason: 'debug-exit', code: SUCCESS, vcpu: 0 }, output);
  const expected: [string, string][] = [
    ['desc-outside-ram', 'needs-reset'], ['length-overflow', 'needs-reset'], ['next-out-of-range', 'needs-reset'], ['loop', 'needs-reset'],
    ['indirect-outside-ram', 'needs-reset'], ['indirect-bad-length', 'needs-reset'], ['indirect-nested', 'needs-reset'],
    ['avail-too-far', 'needs-reset'], ['queue-size-3', 'needs-reset'], ['ring-outside-ram', 'needs-reset'],
    ['not-ready-notify', 'ignored'], ['bad-queue-notify', 'ignored'], ['past-capacity', 'status 1'], ['unknown-type', 'status 2'],
    ['wrong-direction', 'status 1'],
  ];
  for (const [name, outcome] of expected) {
    t.match(output, `hostile ${name}: ${outcome}\n`, name);
    if (outcome === 'needs-reset') t.match(output, `hostile ${name}: recovered\n`, `${name}: recovered`);
  }
  t.match(output, 'hostile: done\n');
  t.ok(readFileSync(file).equals(bytes), 'the image is unchanged');
  const deviceLogs = logs.filter((line) => line.includes('virtio-blk0: '));
  t.ok(deviceLogs.length >= expected.length - 2, `the device logged the failures: ${deviceLogs.length} lines`);
  t.equal(new Set(deviceLogs).size, deviceLogs.length, 'each once');
});

t.test('a snapshot in the middle of disk I/O restores to a guest whose checks go on passing', { skip: noKvm }, async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, 'snap.img');
  makeImage(file, 1024, 'snapshot');
  const source = await startDiskLoop(t, file, { pool }, 3);
  await source.machine.pause();
  const paused = lastRound(source.output());
  const snapshot = path.join(dir, 'm.snap');
  await source.machine.snapshot(snapshot);
  const sourceHash = memoryHash(source.machine.memory);
  await source.machine.stop();
  t.notMatch(source.output(), 'BAD');

  let output = '';
  const { PassThrough } = await import('node:stream');
  const sink = new PassThrough();
  sink.on('data', (chunk: Buffer) => (output += chunk.toString('latin1')));
  const restored = await Machine.restore(snapshot, { serial: { output: sink }, log: () => {}, pool });
  t.teardown(() => void restored.stop());
  t.same(restored.shape.disks?.map((disk) => disk.path), [file], 'the restored machine opened the same image');
  t.equal(memoryHash(restored.memory), sourceHash, 'RAM as it was');
  restored.start();
  await untilRound(() => output, paused + 3);
  t.notMatch(output, 'BAD', output.slice(-200));
  t.ok(lastRound(output) >= paused + 3, `rounds go on after the restore (to ${lastRound(output)})`);
  await restored.stop();

  // The disks may live elsewhere on the restoring host, but must be the same size.
  const moved = path.join(dir, 'moved.img');
  writeFileSync(moved, readFileSync(file));
  const elsewhere = await Machine.restore(snapshot, { disks: [{ path: moved }], serial: { output: null }, log: () => {}, pool });
  t.same(elsewhere.shape.disks, [{ path: moved, readOnly: false, sectors: 1024, id: 'snap.img' }], 'opened where it was told, with the saved id');
  await elsewhere.stop();
  writeFileSync(moved, Buffer.alloc(512 * 1000));
  await t.rejects(Machine.restore(snapshot, { disks: [{ path: moved }], log: () => {}, pool }), /disk 0 had 1024 sectors, .*moved\.img has 1000/);
  await t.rejects(Machine.restore(snapshot, { disks: [], log: () => {}, pool }), /the saved machine had 1 disk, 0 given/);
});

t.test('a live migration in the middle of disk I/O: the destination finishes the guest\'s rounds', { skip: noKvm }, async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, 'migrate.img');
  makeImage(file, 1024, 'migration');
  const source = await startDiskLoop(t, file, { pool });
  const address = `unix:${path.join(dir, 'm.sock')}`;
  const incoming = startLocalDestination(t, address, { pool });
  await incoming.listening;
  const stats = await source.machine.migrate(address);
  const destination = await incoming.arrived;
  t.equal((await source.machine.wait()).reason, 'migrated');
  t.ok(stats.downtimeMs >= 0);
  t.same(destination.shape.disks?.map((disk) => [disk.path, disk.sectors]), [[file, 1024]]);
  const from = lastRound(source.output());
  await untilRound(incoming.output, from + 3);
  t.notMatch(source.output() + incoming.output(), 'BAD');
  t.ok(lastRound(incoming.output()) >= from + 3, `the destination runs on: rounds ${from} -> ${lastRound(incoming.output())}`);
  await destination.stop();
});

t.test('bad disk configurations fail before anything runs, with one clear message', { skip: noKvm }, async (t) => {
  const dir = tempDir(t);
  const tiny = path.join(dir, 'tiny.img');
  writeFileSync(tiny, Buffer.alloc(100));
  // Without the pool: the thread the machine started for itself is ended with it.
  await t.rejects(Machine.create({ image, disks: [{ path: path.join(dir, 'missing.img') }] }), /disk 0: cannot open .*missing\.img for writing: ENOENT/);
  await t.rejects(Machine.create({ image, pool, disks: [{ path: tiny }] }), /smaller than one 512-byte sector/);
  await t.rejects(Machine.create({ image, pool, disks: 'x' as never }), /disks must be an array/);
  await t.rejects(Machine.create({ image, pool, disks: [{ path: tiny, readOnly: 'yes' as never }] }), /readOnly must be a boolean/);
  await t.rejects(Machine.create({ image, pool, disks: [{ path: tiny, id: 'x'.repeat(21) }] }), /at most 20 bytes/);
  await t.rejects(Machine.create({ image, pool, disks: Array.from({ length: 9 }, () => ({ path: tiny })) }), /at most 8 disks/);
});
