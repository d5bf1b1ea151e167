// Disk images are locked as QEMU locks them (open file description locks): a writable disk
// exclusively, a read-only one shared, for the machine's life. Two machines never write one image,
// whether in two processes or in one; a live migration on one host hands the images over.
import t from 'tap';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { Machine, type MachineConfig } from '../../lib/index.js';
import { guestImage, noKvm } from '../helpers/kvm.js';
import { sharedPool } from '../helpers/pool.js';

const MiB = 1 << 20;
// vCPU threads are borrowed: these tests are about disks, and a new thread each would cost more.
const pool = sharedPool(2);

function tempDir(t: { teardown(fn: () => void): void }): string {
  const dir = mkdtempSync(path.join(tmpdir(), 'node-kvm-lock-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

function makeImage(dir: string, name: string, sectors = 64): string {
  const file = path.join(dir, name);
  writeFileSync(file, Buffer.alloc(sectors * 512, 0x5a));
  return file;
}

/** A machine that is built but never runs: enough to hold its disks. */
function machineWith(disks: MachineConfig['disks'], extra: Partial<MachineConfig> = {}): Promise<Machine> {
  return Machine.create({ image: guestImage('spin'), memoryBytes: MiB, disks, serial: { output: null }, log: () => {}, pool, ...extra });
}

const inUse = (file: string) => `disk 0: ${file} is in use by another machine (it holds a lock on the image)`;
const openForWriting = (file: string) => `disk 0: ${file} is open for writing by another machine (it holds a lock on the image)`;

t.test('a writable image is one machine\'s alone until that machine ends', { skip: noKvm }, async (t) => {
  const file = makeImage(tempDir(t), 'rw.img');
  const first = await machineWith([{ path: file }]);
  await t.rejects(machineWith([{ path: file }]), { message: inUse(file), code: 'EBUSY' }, 'a second writer is refused');
  await t.rejects(machineWith([{ path: file, readOnly: true }]), { message: openForWriting(file), code: 'EBUSY' }, 'and a reader');
  t.equal(first.state, 'created', 'the first machine is untouched');
  // A machine refused for one image keeps none of the others it had locked.
  const other = makeImage(path.dirname(file), 'other.img');
  await t.rejects(machineWith([{ path: other }, { path: file }]), { message: `disk 1: ${file} is in use by another machine (it holds a lock on the image)` });
  await first.stop();
  const second = await machineWith([{ path: file }, { path: other }]);
  t.same(second.shape.disks?.map((disk) => disk.path), [file, other], 'free again once the first machine ended');
  await second.stop();
});

t.test('read-only disks share an image; a writer waits for all of them to end', { skip: noKvm }, async (t) => {
  const file = makeImage(tempDir(t), 'ro.img');
  const readers = [await machineWith([{ path: file, readOnly: true }]), await machineWith([{ path: file, readOnly: true }])];
  await t.rejects(machineWith([{ path: file }]), { message: inUse(file), code: 'EBUSY' });
  await readers[0]!.stop();
  await t.rejects(machineWith([{ path: file }]), { message: inUse(file) }, 'one reader still holds it');
  await readers[1]!.stop();
  const writer = await machineWith([{ path: file }]);
  await writer.stop();
});

t.test('two restores of one snapshot: the second is refused while the first runs', { skip: noKvm }, async (t) => {
  const dir = tempDir(t);
  const file = makeImage(dir, 'snap.img');
  const source = await machineWith([{ path: file }]);
  const snapshot = path.join(dir, 'm.snap');
  await source.snapshot(snapshot);
  await source.stop();
  const restore = () => Machine.restore(snapshot, { serial: { output: null }, log: () => {}, pool });
  const first = await restore();
  await t.rejects(restore(), { message: inUse(file), code: 'EBUSY' });
  await first.stop();
  const again = await restore();
  await again.stop();
});

t.test('a live migration on one host hands the image over: the destination holds it afterwards', { skip: noKvm }, async (t) => {
  const dir = tempDir(t);
  const file = makeImage(dir, 'move.img');
  const source = await machineWith([{ path: file }], { irqchip: true });
  source.start();
  const address = `unix:${path.join(dir, 'm.sock')}`;
  let listening!: () => void;
  const ready = new Promise<void>((resolve) => (listening = resolve));
  // Built (and its image opened) before the source lets go, as `run --incoming --memory --vcpus` does.
  const incoming = Machine.incoming(address, { memoryBytes: MiB, vcpus: 1, irqchip: true, onListening: () => listening(), serial: { output: null }, log: () => {}, pool });
  await ready;
  await source.migrate(address);
  const destination = await incoming;
  t.equal((await source.wait()).reason, 'migrated');
  t.equal(destination.state, 'running');
  await t.rejects(machineWith([{ path: file }]), { message: inUse(file) }, 'the destination holds the image');
  await destination.stop();
  const after = await machineWith([{ path: file }]);
  await after.stop();
});

t.test('a destination that cannot lock its image fails the migration; the source runs on and keeps its own', { skip: noKvm }, async (t) => {
  const dir = tempDir(t);
  const file = makeImage(dir, 'source.img');
  const elsewhere = makeImage(dir, 'elsewhere.img');
  const holder = await machineWith([{ path: elsewhere }]);
  const source = await machineWith([{ path: file }], { irqchip: true });
  source.start();
  const address = `unix:${path.join(dir, 'm.sock')}`;
  let listening!: () => void;
  const ready = new Promise<void>((resolve) => (listening = resolve));
  // This host keeps the guest's disk at a path another machine uses.
  const incoming = Machine.incoming(address, { disks: [{ path: elsewhere }], onListening: () => listening(), serial: { output: null }, log: () => {}, pool });
  incoming.catch(() => {});
  await ready;
  await t.rejects(source.migrate(address), { message: new RegExp(`the destination refused: .*${elsewhere.replace(/[.]/g, '\\.')} is in use by another machine.*; the guest runs on here$`) });
  await t.rejects(incoming, { message: inUse(elsewhere) });
  t.equal(source.state, 'running', 'the source runs on');
  await t.rejects(machineWith([{ path: file }]), { message: inUse(file) }, 'and holds its image again');
  await source.stop();
  await holder.stop();
});
