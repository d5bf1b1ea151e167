// virtio-rng (guests/rng.c) on the real /dev/kvm: the guest's buffers are filled with the host
// kernel's random bytes, the pages they land in are dirty for migrations, a request the device
// could only read puts it in NEEDS_RESET (logged, the machine runs on), and the device is part of
// the machine's shape: snapshots keep it, and a machine without one refuses such a state.
import t from 'tap';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { GUEST_PARAMS_ADDR, Machine, VIRTIO_MAX_DEVICES } from '../../lib/index.js';
import { RNG_MAX_BYTES_PER_REQUEST, rngModel, VirtioRngDevice } from '../../lib/devices/virtio-rng.js';
import { Status, VirtioMmio } from '../../lib/devices/virtio-mmio.js';
import { shapeMismatch } from '../../lib/vmm/builder.js';
import { machineInternals } from '../../lib/vmm/machine.js';
import { noKvm, repoRoot } from '../helpers/kvm.js';
import { boot, logCollector } from '../helpers/machine.js';
import { sharedPool } from '../helpers/pool.js';
import { DATA, F_WRITE, FakeVirtioDriver, FEATURE_VERSION_1 } from '../helpers/virtio-driver.js';

const MiB = 1 << 20;
const image = path.join(repoRoot, 'guests', 'build', 'rng.elf');
const pool = noKvm ? undefined : sharedPool(2);
const BUFFER_A = 0x600000;
const BUFFER_B = 0x601000;

t.test('the guest gets random bytes in every buffer it posts', { skip: noKvm }, async (t) => {
  const { lines: logs, log, logged } = logCollector();
  const refusal = /virtio-rng.*device-readable/;
  const booted = await boot({ image, memoryBytes: 16 * MiB, rng: true, pool, log });
  const { machine } = booted;
  t.teardown(() => void machine.stop());
  t.same(machine.shape.rng, true, 'the shape records the device');
  const tracker = machineInternals(machine).startDirtyTracking('test');
  // The guest holds before it exits, for us to look at its RAM.
  machine.writeMemory(GUEST_PARAMS_ADDR, new Uint8Array([1, 0, 0, 0]));
  machine.start();
  const output = await booted.waitForOutput('rng: holding\n');
  const lines = output.split('\n');
  t.equal(lines[0], 'rng: slot 0', 'found in the first slot (no disks)');
  const [a, b] = [lines[1]!.slice(5), lines[2]!.slice(5)];
  t.match(a, /^[0-9a-f]{32}$/);
  t.match(b, /^[0-9a-f]{32}$/);
  t.not(a, b, 'two requests, two different fills');
  t.not(a, '0'.repeat(32), 'not left zero');
  t.equal(lines[3], 'rng: filled 4096 4096', 'the device says it wrote every byte');
  t.equal(lines[4], 'rng: hostile: needs-reset', 'a device-readable buffer is refused');
  t.match(lines[5], /^rng: recovered [0-9a-f]{32}$/, 'works again after the driver reset it');
  await logged(refusal);
  t.equal(logs.filter((line) => refusal.test(line)).length, 1, `logged once: ${logs.join(' | ')}`);
  // What the guest sees is in RAM as the host reads it: the bytes were written into guest RAM.
  const ram = machine.memory.bytes().subarray(BUFFER_B, BUFFER_B + 16);
  t.equal(Buffer.from(ram).toString('hex'), b, 'the guest printed what is in its RAM');
  const ranges = tracker.harvest();
  const isDirty = (page: number) => ranges.some((range) => page >= range.firstPage && page < range.firstPage + range.pageCount);
  t.ok(isDirty(BUFFER_A / 4096) && isDirty(BUFFER_B / 4096), 'the pages only the device wrote are dirty for a migration');
  machine.writeMemory(GUEST_PARAMS_ADDR, new Uint8Array(4));
  t.match(await machine.wait(), { reason: 'debug-exit', code: 0x10 });
});

t.test('an rng device after the disks takes the next slot; the shape and config are checked', { skip: noKvm }, async (t) => {
  const dir = mkdtempSync(path.join(tmpdir(), 'node-kvm-rng-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const disk = path.join(dir, 'disk.img');
  const { writeFileSync } = await import('node:fs');
  writeFileSync(disk, Buffer.alloc(4096));
  const booted = await boot({ image, memoryBytes: 16 * MiB, rng: true, disks: [{ path: disk }], pool });
  t.teardown(() => void booted.machine.stop());
  booted.machine.start();
  await booted.waitForOutput('rng: slot');
  await booted.waitForOutput('\n');
  t.equal(booted.output().split('\n')[0], 'rng: slot 1');
  await t.rejects(Machine.create({ image, rng: 'yes' as unknown as boolean }), { code: 'ERR_INVALID_ARG_TYPE' });
  const disks = Array.from({ length: VIRTIO_MAX_DEVICES }, () => ({ path: disk, readOnly: true }));
  await t.rejects(Machine.create({ image, rng: true, disks }), { code: 'ERR_OUT_OF_RANGE', message: /at most 8 virtio devices/ });
});

t.test('a snapshot keeps the device, which serves the restored guest', { skip: noKvm }, async (t) => {
  const dir = mkdtempSync(path.join(tmpdir(), 'node-kvm-rng-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const file = path.join(dir, 'rng.snap');
  // Saved before the guest ran: the restored machine runs all of it on the restored device.
  const source = await boot({ image, memoryBytes: 16 * MiB, rng: true, pool });
  await source.machine.snapshot(file);
  await source.machine.stop();
  let output = '';
  const { PassThrough } = await import('node:stream');
  const sink = new PassThrough();
  sink.on('data', (chunk: Buffer) => (output += chunk.toString('latin1')));
  const restored = await Machine.restore(file, { log: () => {}, pool, serial: { output: sink } });
  t.teardown(() => void restored.stop());
  t.same(restored.shape.rng, true, 'restored with its rng');
  restored.start();
  const exit = await restored.wait();
  await new Promise((resolve) => setImmediate(resolve));
  t.match(exit, { reason: 'debug-exit', code: 0x10 }, output);
  t.match(output, /^rng: slot 0\nrng: [0-9a-f]{32}\n/);
});

t.test('a saved machine fits only a machine with the same devices', async (t) => {
  const base = { memoryBytes: 16 * MiB, vcpus: 1, irqchip: true };
  t.equal(shapeMismatch({ ...base, rng: true }, { ...base, rng: true }), null);
  t.match(shapeMismatch({ ...base, rng: true }, base), /had virtio-rng, this machine has none/);
  t.match(shapeMismatch(base, { ...base, rng: true }), /had no virtio-rng/);
});

t.test('device model: fills each writable chain, marks the pages it wrote, caps a request, refuses readable buffers', async (t) => {
  const driver = new FakeVirtioDriver(rngModel(), 'virtio-rng');
  t.teardown(() => driver.close());
  const device = new VirtioRngDevice({
    mmio: new VirtioMmio(driver.shared, 'virtio-rng', driver.log), ram: driver.ram, dirty: driver.dirty, log: driver.log,
    watch: () => ({ close() {} }),
  });
  t.teardown(() => device.close());
  t.ok(driver.init({ features: 1n << FEATURE_VERSION_1 }), 'the queue is ready');
  // Two buffers in one chain, on two pages; then one longer than a request's cap.
  driver.submit([{ addr: DATA, len: 100, flags: F_WRITE }, { addr: DATA + 0x3000, len: 50, flags: F_WRITE }], 0);
  driver.submit([{ addr: DATA + 0x10000, len: RNG_MAX_BYTES_PER_REQUEST + 4096, flags: F_WRITE }], 2);
  device.notified();
  t.same(driver.takeUsed(), [[0, 150], [2, RNG_MAX_BYTES_PER_REQUEST]], 'every byte of the first, the cap of the second');
  const zero = (at: number, length: number) => driver.ram.subarray(at, at + length).every((byte) => byte === 0);
  t.notOk(zero(DATA, 100) || zero(DATA + 0x3000, 50), 'both buffers filled');
  t.ok(zero(DATA + 100, 0x3000 - 100), 'nothing past the first buffer');
  t.ok(zero(DATA + 0x10000 + RNG_MAX_BYTES_PER_REQUEST, 4096), 'nothing past the cap');
  const ranges = driver.dirty.takeRanges();
  const marked = (page: number) => ranges.some((range) => page >= range.firstPage && page < range.firstPage + range.pageCount);
  t.ok(marked(DATA / 4096) && marked((DATA + 0x3000) / 4096), 'the pages written are marked');
  t.notOk(marked((DATA + 0x1000) / 4096), 'a page between them is not');
  // A parked device does nothing until resumed.
  driver.submit([{ addr: DATA, len: 16, flags: F_WRITE }], 4);
  device.parking();
  device.notified();
  t.same(driver.takeUsed(), [], 'parked: nothing served');
  device.resumed(false);
  device.notified();
  t.same(driver.takeUsed(), [[4, 16]]);
  driver.submit([{ addr: DATA, len: 16, flags: 0 }], 5);
  device.notified();
  t.ok(driver.status & Status.NeedsReset, 'a device-readable buffer: NEEDS_RESET');
  t.match(driver.logs, [/virtio-rng: queue 0: a request with a device-readable buffer/]);
});
