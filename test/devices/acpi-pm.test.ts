// The ACPI PM block on the real /dev/kvm, as a kernel uses it (guests/pc-ports.c): the PM timer
// counted against the TSC, its 24-bit wrap and that it never goes back, power-off through PM1a
// control with the _S5 type (another sleep type does not end the machine), and the counter across
// a snapshot and restore and a live migration: after the guest resumes, it never goes back.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { PassThrough } from 'node:stream';
import t from 'tap';
import { GUEST_PARAMS_ADDR } from '../../lib/boot/index.js';
import { PM_TIMER_HZ } from '../../lib/devices/acpi-pm.js';
import { exitStatus } from '../../lib/cli/run.js';
import { Kvm, Machine, type MachineConfig } from '../../lib/index.js';
import { machineInternals } from '../../lib/vmm/machine.js';
import { noKvm, repoRoot } from '../helpers/kvm.js';
import { boot, type Booted } from '../helpers/machine.js';
import { startLocalDestination } from '../helpers/migration-peer.js';
import { sharedPool } from '../helpers/pool.js';

const image = path.join(repoRoot, 'guests', 'build', 'pc-ports.elf');
const pool = noKvm ? undefined : sharedPool(2);
const Mode = { Measure: 0, PowerOff: 1, Count: 2, Bench: 3 } as const;

function params(mode: number, ticks = 0): Uint8Array {
  const bytes = new Uint8Array(8);
  const view = new DataView(bytes.buffer);
  view.setUint32(0, mode, true);
  view.setUint32(4, ticks, true);
  return bytes;
}

function config(extra: Partial<MachineConfig> = {}): MachineConfig {
  return { image, memoryBytes: 8 << 20, pool, ...extra };
}

/** Boots the guest in `mode`; `before` may change the machine before it starts. */
async function start(mode: number, ticks = 0, before?: (booted: Booted) => Promise<void>, logs: string[] = []): Promise<Booted> {
  const booted = await boot(config(), logs);
  t.teardown(() => booted.machine.stop());
  booted.machine.writeMemory(GUEST_PARAMS_ADDR, params(mode, ticks));
  if (before) await before(booted);
  booted.machine.start();
  return booted;
}

interface Measured { pm: number; tsc: number; reads: number; wraps: number; back: number; high: number }

function parseMeasure(output: string): Measured {
  const match = /pm (\d+) tsc (\d+) reads (\d+) wraps (\d+) back (\d+) high (\d+)\n/.exec(output);
  if (!match) throw new Error(`no measurement in ${JSON.stringify(output)}`);
  const [pm, tsc, reads, wraps, back, high] = match.slice(1).map(Number) as [number, number, number, number, number, number];
  return { pm, tsc, reads, wraps, back, high };
}

/** The guest's TSC frequency as KVM gives it to a vCPU. */
function guestTscHz(): number {
  using kvm = Kvm.open();
  using vm = kvm.createVm();
  using vcpu = vm.createVcpu(0);
  return vcpu.getTscKhz() * 1000;
}

t.test('the PM timer counted against the TSC runs at 3.579545 MHz, never back, 24 bits', { skip: noKvm }, async (t) => {
  const booted = await start(Mode.Measure);
  const exit = await booted.machine.wait();
  t.same({ reason: exit.reason, code: exit.code }, { reason: 'debug-exit', code: 0 });
  const measured = parseMeasure(booted.output());
  const tscHz = guestTscHz();
  const pmHz = (measured.pm / measured.tsc) * tscHz;
  t.comment(`${measured.pm} PM ticks in ${measured.tsc} TSC cycles (${tscHz / 1e6} MHz): ${(pmHz / 1e6).toFixed(4)} MHz over ${measured.reads} reads`);
  t.ok(measured.pm >= 71591, 'counted about 20 ms');
  t.ok(Math.abs(pmHz / PM_TIMER_HZ - 1) < 0.03, `PM timer at ${pmHz.toFixed(0)} Hz by the TSC`);
  t.same({ back: measured.back, high: measured.high }, { back: 0, high: 0 }, 'no read went back; bits 24-31 read 0');
  t.match(booted.output(), /\nbytes 0x0 0x[0-9a-f]{1,2} sci 1\n$/, 'the top byte reads 0, the top word the counter\'s bits 16-23; SCI_EN reads 1');
});

t.test('the counter wraps at 2^24 and goes on', { skip: noKvm }, async (t) => {
  const ticksBeforeWrap = 0x40000; // about 73 ms: the machine starts well within it
  const booted = await start(Mode.Measure, 0x60000, async ({ machine }) => {
    const internals = machineInternals(machine);
    const state = await internals.saveState();
    state.devices.acpiPm = { ...state.devices.acpiPm!, counter: 0x1000000 - ticksBeforeWrap };
    await internals.applyState(state);
  });
  const exit = await booted.machine.wait();
  t.equal(exit.reason, 'debug-exit');
  const measured = parseMeasure(booted.output());
  t.same({ wraps: measured.wraps, back: measured.back, high: measured.high }, { wraps: 1, back: 0, high: 0 }, `one wrap in ${measured.reads} reads, none back`);
});

t.test('SLP_EN with the _S5 type powers the machine off; another sleep type does not', { skip: noKvm }, async (t) => {
  const logs: string[] = [];
  const booted = await start(Mode.PowerOff, 0, undefined, logs);
  const end = await booted.machine.wait();
  t.same({ reason: end.reason, vcpu: end.vcpu }, { reason: 'poweroff', vcpu: 0 });
  t.equal(exitStatus(end), 0, 'the command ends with status 0, as on a reset');
  t.equal(booted.output(), 'sci 1\nstill running\n', 'the guest went on after SLP_TYP 5, and not past SLP_TYP 0');
  t.same(logs.filter((line) => line.includes('acpi-pm')), ['vcpu0: acpi-pm: sleep type 5 is not supported; the guest keeps running']);
});

t.test('a PM timer read costs the guest what a read of a port the VMM answers trivially costs', { skip: noKvm }, async (t) => {
  const reads = 5000;
  const booted = await start(Mode.Bench, reads);
  t.equal((await booted.machine.wait()).reason, 'debug-exit');
  const match = /bench pm (\d+) post (\d+) reads (\d+)\n/.exec(booted.output());
  t.ok(match, booted.output());
  const nsPerRead = (cycles: number) => (cycles / reads / guestTscHz()) * 1e9;
  const pmNs = nsPerRead(Number(match![1]));
  const postNs = nsPerRead(Number(match![2]));
  t.comment(`per read from the guest's kernel mode: PM timer ${pmNs.toFixed(0)} ns, POST code port ${postNs.toFixed(0)} ns (${reads} each)`);
  // One exit each; the device's own share (the host clock, ~0.1 us) is lost in the exit's cost.
  t.ok(pmNs < postNs * 4, 'about one exit\'s cost, not several');
});

/** The last "tick N <counter>" line's N, or 0. */
function lastTick(output: string): number {
  const matches = [...output.matchAll(/tick (\d+) 0x[0-9a-f]+\n/g)];
  return matches.length ? Number(matches.at(-1)![1]) : 0;
}

/** Resolves once `output()` has a tick line past `tick`. */
async function waitForTick(output: () => string, tick: number, timeoutMs = 20_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (lastTick(output()) < tick) {
    if (Date.now() > deadline) throw new Error(`no tick ${tick} in ${timeoutMs} ms: ${JSON.stringify(output().slice(-200))}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

t.test('snapshot and restore of a guest counting PM timer ticks: the counter goes on from where it was', { skip: noKvm }, async (t) => {
  const dir = mkdtempSync(path.join(tmpdir(), 'node-kvm-pm-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const file = path.join(dir, 'pm.snap');
  const source = await start(Mode.Count, 0x4000);
  await waitForTick(source.output, 3);
  await source.machine.pause();
  await source.machine.snapshot(file);
  const before = source.output();
  await source.machine.stop();
  // The file waits a while, as a snapshot on disk does: a counter taken from the host's clock
  // alone would have moved on, or (from a new machine's start) gone back.
  await new Promise((resolve) => setTimeout(resolve, 50));

  let after = '';
  const sink = new PassThrough();
  sink.on('data', (chunk: Buffer) => (after += chunk.toString('latin1')));
  const restored = await Machine.restore(file, { serial: { output: sink }, log: () => {}, pool });
  t.teardown(() => restored.stop());
  restored.start();
  await waitForTick(() => before + after, lastTick(before) + 5);
  await restored.stop();
  t.notMatch(before + after, /BAD/, 'no read went back');
  t.ok(isUnbrokenTicks(before + after), 'one unbroken count of ticks across the restore');
});

t.test('live migration of a guest counting PM timer ticks: the counter goes on at the destination', { skip: noKvm }, async (t) => {
  const dir = mkdtempSync(path.join(tmpdir(), 'node-kvm-pm-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const destination = startLocalDestination(t, `unix:${path.join(dir, 'migrate.sock')}`, { pool });
  const address = await destination.listening;
  const source = await start(Mode.Count, 0x4000);
  await waitForTick(source.output, 3);
  const stats = await source.machine.migrate(address);
  t.equal(stats.phase, 'completed');
  t.equal((await source.machine.wait()).reason, 'migrated');
  const before = source.output();
  await waitForTick(() => before + destination.output(), lastTick(before) + 5);
  await (await destination.arrived).stop();
  t.notMatch(before + destination.output(), /BAD/, 'no read went back');
  t.ok(isUnbrokenTicks(before + destination.output()), 'one unbroken count of ticks across the move');
});

/** "tick 1 ..." to "tick N ..." with none missing or repeated (a part of the next line may follow). */
function isUnbrokenTicks(output: string): boolean {
  const ticks = [...output.matchAll(/tick (\d+) /g)].map((match) => Number(match[1]));
  return ticks.length > 0 && ticks.every((tick, i) => tick === i + 1);
}
