// The CMOS RTC from a guest on the real /dev/kvm (guests/rtc.c): the time in every format register
// B offers against the host's UTC time, one second apart; the clock set with SET; the periodic and
// update-ended interrupts through the IOAPIC; the memory-size bytes; the cost of a read; and a
// guest taking the periodic interrupt that goes through a snapshot and a live migration, its clock
// never going back.
import t from 'tap';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { PassThrough } from 'node:stream';
import { GUEST_PARAMS_ADDR, Machine, type MachineConfig, type MachineExit } from '../../lib/index.js';
import { cmosMemoryBytes } from '../../lib/devices/cmos-rtc.js';
import { noKvm, repoRoot } from '../helpers/kvm.js';
import { boot, type Booted } from '../helpers/machine.js';
import { sharedPool } from '../helpers/pool.js';

const MiB = 1 << 20;
const image = path.join(repoRoot, 'guests', 'build', 'rtc.elf');
const SUCCESS = 0x10;
const Mode = { Clock: 0, Set: 1, Periodic: 2, Ticks: 3, Bench: 4, Update: 5 } as const;
/** What the guest's set mode writes: 2001-02-03 04:05:06 UTC. */
const SET_TIME_MS = Date.UTC(2001, 1, 3, 4, 5, 6);
// A migration has two machines at once.
const pool = noKvm ? undefined : sharedPool(2);

function params(p: { mode: number; rate?: number; count?: number; iterations?: number; setFirst?: boolean }): Uint8Array {
  const view = new DataView(new ArrayBuffer(20));
  view.setUint32(0, p.mode, true);
  view.setUint32(4, p.rate ?? 0, true);
  view.setUint32(8, p.count ?? 0, true);
  view.setUint32(12, p.iterations ?? 0, true);
  view.setUint32(16, p.setFirst ? 1 : 0, true);
  return new Uint8Array(view.buffer);
}

async function startGuest(p: Parameters<typeof params>[0], config: Partial<MachineConfig> = {}): Promise<Booted> {
  const booted = await boot({ image, memoryBytes: 64 * MiB, irqchip: true, pool, ...config });
  booted.machine.writeMemory(GUEST_PARAMS_ADDR, params(p));
  booted.machine.start();
  return booted;
}

async function runGuest(p: Parameters<typeof params>[0], config: Partial<MachineConfig> = {}) {
  const hostBefore = Date.now();
  const booted = await startGuest(p, config);
  const exit: MachineExit = await booted.machine.wait();
  const hostAfter = Date.now();
  await new Promise((resolve) => setImmediate(resolve));
  return { exit, output: booted.output(), hostBefore, hostAfter };
}

/** The "cmos ..." line the guest prints for a machine of this RAM and vCPU count. */
function expectedCmosLine(memoryBytes: number, vcpus: number): string {
  const bytes = cmosMemoryBytes({ lowMemoryBytes: memoryBytes, highMemoryBytes: 0, vcpus });
  return `cmos ${[...bytes].sort(([a], [b]) => a - b).map(([i, v]) => `${i.toString(16).padStart(2, '0')}=${v.toString(16).padStart(2, '0')}`).join(' ')}\n`;
}

interface GuestTime {
  b: number;
  ms: number;
  weekday: number;
}

/** The guest's "time <b> <sec> <min> <hour> <weekday> <day> <month> <year> <century>" lines, decoded as register B says. */
function guestTimes(output: string): GuestTime[] {
  return [...output.matchAll(/^time ((?: [0-9a-f]{2}){0}[0-9a-f]{2})((?: [0-9a-f]{2}){8})$/gm)].map((match) => {
    const b = parseInt(match[1]!, 16);
    const [sec, min, hour, weekday, day, month, year, century] = match[2]!.trim().split(' ').map((h) => parseInt(h, 16)) as [number, number, number, number, number, number, number, number];
    const binary = (b & 0x04) !== 0;
    const value = (register: number) => (binary ? register : (register >> 4) * 10 + (register & 0xf));
    const hours = b & 0x02 ? value(hour) : (value(hour & 0x7f) % 12) + (hour & 0x80 ? 12 : 0);
    const ms = Date.UTC(value(century) * 100 + value(year), value(month) - 1, value(day), hours, value(min), value(sec));
    return { b, ms, weekday: value(weekday) };
  });
}

const weekdayOf = (ms: number) => new Date(ms).getUTCDay() + 1;

t.test('the guest reads the host\'s UTC time in BCD and binary, 24 and 12 hours, one second apart; and the memory-size bytes', { skip: noKvm }, async (t) => {
  const { exit, output, hostBefore, hostAfter } = await runGuest({ mode: Mode.Clock });
  t.same(exit, { reason: 'debug-exit', code: SUCCESS, vcpu: 0 }, output);
  t.match(output, expectedCmosLine(64 * MiB, 1));
  const times = guestTimes(output);
  t.same(times.map((time) => time.b), [0x02, 0x06, 0x00, 0x04], output);
  for (const time of times) {
    t.ok(time.ms >= hostBefore - 2000 && time.ms <= hostAfter + 2000, `mode ${time.b}: ${new Date(time.ms).toISOString()} within 2 s of the host's ${new Date(hostBefore).toISOString()}..${new Date(hostAfter).toISOString()}`);
    t.equal(time.weekday, weekdayOf(time.ms), 'the weekday (Sunday = 1)');
  }
  t.same(times.slice(1).map((time, i) => time.ms - times[i]!.ms), [1000, 1000, 1000], 'each read is one tick after the one before');
});

t.test('the guest sets the clock with SET: it reads back what it wrote, and it runs on from there', { skip: noKvm }, async (t) => {
  const { exit, output } = await runGuest({ mode: Mode.Set });
  t.same(exit, { reason: 'debug-exit', code: SUCCESS, vcpu: 0 }, output);
  const times = guestTimes(output);
  t.same(times.map((time) => new Date(time.ms).toISOString()), ['2001-02-03T04:05:06.000Z', '2001-02-03T04:05:07.000Z'], output);
  t.equal(times[0]!.weekday, 7, 'Saturday, as written');
});

t.test('the periodic interrupt through the IOAPIC: the guest counts N interrupts with PF at the rate it chose', { skip: noKvm }, async (t) => {
  const { exit, output, hostBefore, hostAfter } = await runGuest({ mode: Mode.Periodic, rate: 10, count: 32 }, { vcpus: 2, memoryBytes: 512 * MiB });
  t.same(exit, { reason: 'debug-exit', code: SUCCESS, vcpu: 0 }, output);
  t.match(output, expectedCmosLine(512 * MiB, 2), 'the memory-size bytes for 512 MiB, and 2 CPUs');
  t.match(output, 'periodic 32 interrupts, 0 without PF\n');
  t.ok(hostAfter - hostBefore >= 31 * 15.625 - 20, `32 interrupts at 64 Hz took at least 31 periods (${hostAfter - hostBefore} ms)`);

  // Above 1 kHz the interrupts owed are coalesced, but they keep coming.
  const fast = await runGuest({ mode: Mode.Periodic, rate: 3, count: 100 });
  t.match(fast.output, 'periodic 100 interrupts, 0 without PF\n', 'at 8192 Hz');
});

t.test('the update-ended interrupt: one at each tick of the seconds', { skip: noKvm }, async (t) => {
  const { exit, output } = await runGuest({ mode: Mode.Update, count: 2 });
  t.same(exit, { reason: 'debug-exit', code: SUCCESS, vcpu: 0 }, output);
  const seconds = [...output.matchAll(/^update (\d+) (\d+)$/gm)].map((m) => [Number(m[1]), Number(m[2])]);
  t.equal(seconds.length, 2, output);
  t.same(seconds.map(([n]) => n), [1, 2]);
  t.equal(seconds[1]![1], (seconds[0]![1]! + 1) % 60, 'the second interrupt came one second after the first');
});

t.test('what a guest pays per RTC read (index write + data read) against a write+read of the POST port', { skip: noKvm }, async (t) => {
  const { exit, output } = await runGuest({ mode: Mode.Bench, iterations: 2000 });
  t.same(exit, { reason: 'debug-exit', code: SUCCESS, vcpu: 0 }, output);
  const match = /bench tsc_hz (\d+) rtc (\d+) post (\d+)/.exec(output);
  t.ok(match, output);
  if (!match) return;
  const [tscHz, rtcCycles, postCycles] = match.slice(1).map(Number) as [number, number, number];
  t.ok(tscHz > 1e8, `the TSC's rate against the RTC's seconds: ${(tscHz / 1e6).toFixed(0)} MHz`);
  const ns = (cycles: number) => (cycles / tscHz) * 1e9;
  t.comment(`RTC read (2 exits, at CPL 0): ${ns(rtcCycles).toFixed(0)} ns; POST port write+read (2 exits): ${ns(postCycles).toFixed(0)} ns; the RTC's own share: ${(ns(rtcCycles) - ns(postCycles)).toFixed(0)} ns`);
  t.ok(rtcCycles > 0 && postCycles > 0);
});

interface Tick {
  n: number;
  ms: number;
}

/** The "tick <n> <year> <month> <day> <hour> <min> <sec>" lines. */
function ticks(output: string): Tick[] {
  return [...output.matchAll(/^tick (\d+) (\d+) (\d+) (\d+) (\d+) (\d+) (\d+)$/gm)].map((m) => {
    const [n, year, month, day, hour, min, sec] = m.slice(1).map(Number) as [number, number, number, number, number, number, number];
    return { n, ms: Date.UTC(year, month - 1, day, hour, min, sec) };
  });
}

const lastTick = (output: string) => ticks(output).at(-1)?.n ?? 0;

/** A sink collecting a machine's serial output. */
function collector(): { sink: PassThrough; text: () => string } {
  let text = '';
  const sink = new PassThrough();
  sink.on('data', (chunk: Buffer) => (text += chunk.toString('latin1')));
  return { sink, text: () => text };
}

async function until(condition: () => boolean, what: string, timeoutMs = 20_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

/** Ticks numbered 1, 2, 3, ... with times that never go back and stay near the set time. */
function checkTicks(t: Test, all: Tick[], hostElapsedMs: number): void {
  t.same(all.map((tick) => tick.n), all.map((_, i) => i + 1), 'every tick, in order, none twice');
  t.ok(all.every((tick, i) => i === 0 || tick.ms >= all[i - 1]!.ms), 'the guest\'s clock never went back');
  const last = all.at(-1)!;
  t.ok(last.ms >= SET_TIME_MS && last.ms <= SET_TIME_MS + hostElapsedMs + 2000, `it ran on from the time the guest set (${new Date(last.ms).toISOString()})`);
}

type Test = Parameters<Parameters<typeof t.test>[1]>[0];

t.test('a snapshot of a guest taking the periodic interrupt: the restored guest goes on taking it, its clock runs on from where it was', { skip: noKvm }, async (t) => {
  const dir = mkdtempSync(path.join(tmpdir(), 'node-kvm-rtc-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const started = Date.now();
  const source = await startGuest({ mode: Mode.Ticks, rate: 10, count: 16, setFirst: true });
  t.teardown(() => void source.machine.stop());
  await source.waitForOutput(/^tick 3 /m);
  await source.machine.pause();
  const state = await source.machine.saveState();
  const rtc = state.devices.cmosRtc!;
  t.ok(rtc, 'the machine state carries the RTC');
  const guestNow = Date.now() + rtc.offsetMs;
  t.ok(guestNow >= SET_TIME_MS && guestNow <= SET_TIME_MS + (Date.now() - started), `its offset puts the guest at ${new Date(guestNow).toISOString()}`);
  t.equal(rtc.cmos[0x0b]! & 0x40, 0x40, 'with PIE set');
  const snapshot = path.join(dir, 'rtc.snap');
  await source.machine.snapshot(snapshot);
  await source.machine.stop();
  const before = source.output();
  const pausedAt = lastTick(before);

  const out = collector();
  const restored = await Machine.restore(snapshot, { serial: { output: out.sink }, log: () => {}, pool });
  t.teardown(() => void restored.stop());
  restored.start();
  await until(() => lastTick(before + out.text()) >= pausedAt + 4, `four more ticks after ${pausedAt}`);
  await restored.stop();
  checkTicks(t, ticks(before + out.text()), Date.now() - started);
});

t.test('a live migration of a guest taking the periodic interrupt: the destination goes on taking it, its clock never goes back', { skip: noKvm }, async (t) => {
  const dir = mkdtempSync(path.join(tmpdir(), 'node-kvm-rtc-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const started = Date.now();
  const source = await startGuest({ mode: Mode.Ticks, rate: 10, count: 16, setFirst: true });
  t.teardown(() => void source.machine.stop());
  await source.waitForOutput(/^tick 3 /m);
  const out = collector();
  const address = `unix:${path.join(dir, 'rtc.sock')}`;
  let listening!: () => void;
  const ready = new Promise<void>((resolve) => (listening = resolve));
  const incoming = Machine.incoming(address, { onListening: () => listening(), serial: { output: out.sink }, log: () => {}, pool });
  await ready;
  await source.machine.migrate(address);
  const destination = await incoming;
  t.teardown(() => void destination.stop());
  t.equal((await source.machine.wait()).reason, 'migrated');
  await new Promise((resolve) => setImmediate(resolve));
  const before = source.output();
  const migratedAt = lastTick(before);
  await until(() => lastTick(before + out.text()) >= migratedAt + 4, `four more ticks after ${migratedAt}`);
  await destination.stop();
  checkTicks(t, ticks(before + out.text()), Date.now() - started);
});
