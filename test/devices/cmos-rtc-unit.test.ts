// The CMOS RTC without a guest: calendar arithmetic, register encodings, the memory-size bytes
// for given machines, the ports over shared state (index and NMI mask, SET, UIP, register C),
// its saved state, the periodic interrupt's main-thread timer, and the device-state check.
import t from 'tap';
import {
  CmosRtc, CmosRtcInterrupts, REG_B_24H, REG_B_AIE, REG_B_DM, REG_B_PIE, REG_B_SET, REG_B_UIE, REG_C_AF, REG_C_IRQF, REG_C_PF, REG_C_UF,
  RtcRegister as R, civilFromDays, cmosMemoryBytes, decodeTime, encodeTime, periodicPeriodMs,
} from '../../lib/devices/cmos-rtc.js';
import { isDeviceStates } from '../../lib/vmm/devices.js';

const MiB = 1 << 20;
const GiB = 1 << 30;
const machine = { lowMemoryBytes: 64 * MiB, highMemoryBytes: 0, vcpus: 1 };

function rtcOn(shared = CmosRtc.createShared(machine), clock?: () => number) {
  const rtc = new CmosRtc(shared, clock);
  return {
    rtc,
    shared,
    read: (index: number) => {
      rtc.write(0, 1, index);
      return rtc.read(1, 1);
    },
    write: (index: number, value: number) => {
      rtc.write(0, 1, index);
      rtc.write(1, 1, value);
    },
  };
}

t.test('civilFromDays agrees with Date over four centuries, leap days and weekdays included', async (t) => {
  let mismatches = 0;
  for (let days = -25_000; days < 120_000; days += 7) {
    const date = new Date(days * 86_400_000);
    const civil = civilFromDays(days);
    const expected = { year: date.getUTCFullYear(), month: date.getUTCMonth() + 1, day: date.getUTCDate(), weekday: date.getUTCDay() + 1 };
    if (JSON.stringify(civil) !== JSON.stringify(expected)) mismatches++;
  }
  t.equal(mismatches, 0);
  t.same(civilFromDays(0), { year: 1970, month: 1, day: 1, weekday: 5 }, '1970-01-01 was a Thursday (Sunday = 1)');
  t.same(civilFromDays(11016), { year: 2000, month: 2, day: 29, weekday: 3 });
});

t.test('time registers: BCD and binary, 24 and 12 hours (PM in bit 7), century at 0x32; decoding inverts encoding', async (t) => {
  const at = Date.UTC(2026, 11, 6, 23, 59, 58); // a Sunday
  const registers = (b: number) => [...encodeTime(at, b)].map(([index, value]) => `${index.toString(16)}=${value.toString(16)}`).join(' ');
  t.equal(registers(REG_B_24H), '0=58 2=59 4=23 6=1 7=6 8=12 9=26 32=20');
  t.equal(registers(REG_B_24H | REG_B_DM), '0=3a 2=3b 4=17 6=1 7=6 8=c 9=1a 32=14');
  t.equal(registers(0), '0=58 2=59 4=91 6=1 7=6 8=12 9=26 32=20', '11 PM in BCD is 0x91');
  t.equal(registers(REG_B_DM), '0=3a 2=3b 4=8b 6=1 7=6 8=c 9=1a 32=14');
  const hour = (h: number, b: number) => encodeTime(Date.UTC(2000, 0, 1, h), b).get(R.Hours);
  t.same([0, 1, 11, 12, 13].map((h) => hour(h, 0)), [0x12, 0x01, 0x11, 0x92, 0x81], 'midnight is 12 AM, noon 12 PM');
  for (const b of [0, REG_B_24H, REG_B_DM, REG_B_DM | REG_B_24H]) {
    for (const time of [at, Date.UTC(1999, 0, 1, 0, 0, 0), Date.UTC(2001, 1, 3, 12, 5, 6), Date.UTC(2099, 11, 31, 12, 0, 0)]) {
      const cmos = new Uint8Array(128);
      for (const [index, value] of encodeTime(time, b)) cmos[index] = value;
      t.equal(decodeTime(cmos, b), time, `round trip in mode ${b}`);
    }
  }
});

t.test('the periodic rate: 32768 >> (rate - 1) Hz, with rates 1 and 2 the 256 and 128 Hz taps', async (t) => {
  t.same([0, 1, 2, 3, 6, 10, 15].map(periodicPeriodMs), [0, 3.90625, 7.8125, 0.1220703125, 0.9765625, 15.625, 500]);
});

t.test('the memory-size and CPU-count bytes, as QEMU\'s pc machine writes them', async (t) => {
  const bytes = (m: typeof machine) => Object.fromEntries([...cmosMemoryBytes(m)].map(([i, v]) => [i.toString(16), v]));
  t.same(bytes(machine), {
    10: 0, 14: 0x06, 15: 0x80, 16: 0x02, 17: 0x00, 18: 0xfc, 30: 0x00, 31: 0xfc, 34: 0x00, 35: 0x03, '5b': 0, '5c': 0, '5d': 0, '5f': 0,
  }, '64 MiB: 640 KiB base, 63 MiB extended, 48 MiB above 16 MiB in 64 KiB units');
  t.same(bytes({ lowMemoryBytes: 3 * GiB, highMemoryBytes: 5 * GiB, vcpus: 4 }), {
    10: 0, 14: 0x06, 15: 0x80, 16: 0x02, 17: 0xff, 18: 0xff, 30: 0xff, 31: 0xff, 34: 0x00, 35: 0xbf, '5b': 0x00, '5c': 0x40, '5d': 0x01, '5f': 3,
  }, 'extended memory capped at 0xffff KiB; (3 GiB - 16 MiB) / 64 KiB = 0xbf00; 5 GiB above 4 GiB = 0x14000 units');
  t.same(bytes({ lowMemoryBytes: MiB, highMemoryBytes: 0, vcpus: 255 }), {
    10: 0, 14: 0x06, 15: 0x80, 16: 0x02, 17: 0, 18: 0, 30: 0, 31: 0, 34: 0, 35: 0, '5b': 0, '5c': 0, '5d': 0, '5f': 254,
  });
  t.equal(cmosMemoryBytes({ ...machine, vcpus: 300 }).get(0x5f), 0, 'more CPUs than a byte holds: 0 (firmware asks fw_cfg)');
  const { read } = rtcOn(CmosRtc.createShared({ lowMemoryBytes: 512 * MiB, highMemoryBytes: 0, vcpus: 2 }));
  t.same([0x15, 0x16, 0x17, 0x18, 0x34, 0x35, 0x5f].map(read), [0x80, 0x02, 0xff, 0xff, 0x00, 0x1f, 1], 'the device reads them back (512 MiB: extended capped)');
});

t.test('ports: the index port keeps the NMI mask (in the state), reads 0xff; registers A-D as the BIOS leaves them', async (t) => {
  const { rtc, read, write } = rtcOn();
  t.equal(read(R.A), 0x26, 'A: 32.768 kHz divider, 1024 Hz rate (UIP aside)');
  t.equal(read(R.B), REG_B_24H);
  t.equal(read(R.D), 0x80, 'D: VRT');
  rtc.write(0, 1, 0x80 | 0x40);
  t.ok(rtc.nmiMasked);
  t.equal(rtc.saveState().index, 0xc0, 'the state carries the NMI mask with the index');
  t.equal(rtc.read(0, 1), 0xff, 'the index port is write-only');
  t.equal(rtc.read(1, 1), 0, 'CMOS RAM at 0x40');
  rtc.write(1, 1, 0x5a);
  t.equal(rtc.read(1, 1), 0x5a, 'and it is read/write');
  rtc.write(0, 1, 0x0f);
  t.notOk(rtc.nmiMasked, 'NMIs unmasked with bit 7 clear');
  write(R.D, 0);
  write(R.C, 0xff);
  t.equal(read(R.D), 0x80, 'D is read-only');
  t.equal(rtc.read(0, 2) & 0xff, 0xff, 'a 16-bit read: the index port\'s byte, then the data port\'s');
  rtc.write(0, 2, (0x5a << 8) | 0x41);
  t.equal(read(0x41), 0x5a, 'a 16-bit write sets the index, then writes the data');
  write(R.A, 0xff);
  t.equal(read(R.A) & 0x7f, 0x7f, 'A bits 0-6 are written, UIP is not');
});

t.test('the time is the host\'s UTC time; SET stops it and writing the registers moves it for good', async (t) => {
  const { rtc, read, write } = rtcOn();
  t.ok(Math.abs(rtc.guestTimeMs - Date.now()) < 50, 'a new RTC reads the host time');
  write(R.B, REG_B_24H | REG_B_DM);
  const now = new Date();
  const seconds = read(R.Seconds) + 60 * read(R.Minutes) + 3600 * read(R.Hours);
  const hostSeconds = now.getUTCSeconds() + 60 * now.getUTCMinutes() + 3600 * now.getUTCHours();
  t.ok(Math.abs(seconds - hostSeconds) <= 1 || Math.abs(seconds - hostSeconds) === 86399, `binary registers hold the host time (${seconds} vs ${hostSeconds})`);
  t.equal(read(R.Year) + 100 * read(R.Century), now.getUTCFullYear());

  write(R.B, REG_B_SET | REG_B_24H);
  write(R.Seconds, 0x30);
  write(R.Minutes, 0x20);
  write(R.Hours, 0x10);
  write(R.DayOfMonth, 0x15);
  write(R.Month, 0x06);
  write(R.Year, 0x10);
  write(R.Century, 0x20);
  t.equal(read(R.Seconds), 0x30, 'with SET held the registers hold what was written');
  write(R.B, REG_B_24H);
  const set = Date.UTC(2010, 5, 15, 10, 20, 30);
  t.ok(rtc.guestTimeMs - set >= 0 && rtc.guestTimeMs - set < 50, 'clearing SET starts the clock from the written time');
  const offset = rtc.saveState().offsetMs;
  t.ok(Math.abs(offset - (set - Date.now())) < 50, 'the state carries the offset from the host clock');
  t.equal(read(R.DayOfWeek), 3, 'the weekday follows the date (2010-06-15 was a Tuesday)');

  // One register written while the clock runs: the others stay, the minute moves.
  write(R.Minutes, 0x45);
  t.equal(read(R.Minutes), 0x45);
  t.equal(read(R.Hours), 0x10);

  const restored = rtcOn(CmosRtc.createShared(machine));
  const state = rtc.saveState();
  restored.rtc.restoreState(state);
  t.ok(restored.rtc.guestTimeMs >= rtc.guestTimeMs - 1 && restored.rtc.guestTimeMs - rtc.guestTimeMs < 50, 'a restored RTC runs on from host time + the same offset');
  t.equal(restored.read(R.Minutes), 0x45);
});

t.test('mode changes while SET is held re-encode the held time; UIE is cleared by SET', async (t) => {
  const { read, write } = rtcOn();
  write(R.B, REG_B_SET | REG_B_24H | 0x10);
  t.equal(read(R.B) & 0x10, 0, 'UIE cleared');
  write(R.Hours, 0x15);
  write(R.B, REG_B_SET | REG_B_DM);
  t.equal(read(R.Hours), 0x83, '15h in BCD becomes 3 PM in binary 12-hour form');
});

/** A monotonic clock (ms) the test steps, starting where the host's is. */
function steppedClock() {
  const [seconds, nanoseconds] = process.hrtime();
  let nowMs = seconds * 1000 + nanoseconds / 1e6;
  return { clock: () => nowMs, step: (ms: number) => void (nowMs += ms) };
}

t.test('UIP is up in the last 244 us before the seconds tick; register C reports UF and AF after it, and clears', async (t) => {
  const { clock, step } = steppedClock();
  const { read, write } = rtcOn(undefined, clock);
  write(R.B, REG_B_SET | REG_B_24H | REG_B_DM);
  write(R.Seconds, 10);
  write(R.B, REG_B_24H | REG_B_DM); // the second starts now
  write(R.SecondsAlarm, 11);
  write(R.MinutesAlarm, 0xc0);
  write(R.HoursAlarm, 0xc0);
  read(R.C);
  step(999.7);
  t.same([read(R.A) & 0x80, read(R.Seconds)], [0, 10], '300 us before the tick: no UIP');
  step(0.1);
  t.same([read(R.A) & 0x80, read(R.Seconds)], [0x80, 10], '200 us before: UIP, the registers not yet ticked');
  t.equal(read(R.C) & REG_C_UF, 0, 'no update yet');
  step(0.25);
  t.same([read(R.A) & 0x80, read(R.Seconds)], [0, 11], 'after the tick: UIP down, the seconds ticked');
  t.equal(read(R.C) & (REG_C_UF | REG_C_AF | REG_C_IRQF), REG_C_UF | REG_C_AF, 'UF, and AF (the alarm at second 11), no IRQF without UIE/AIE');
  t.equal(read(R.C) & (REG_C_UF | REG_C_AF), 0, 'reading C cleared them');
  step(1000);
  t.equal(read(R.C) & (REG_C_UF | REG_C_AF), REG_C_UF, 'the next second: UF, no alarm');
  step(86_400_000);
  t.equal(read(R.C) & (REG_C_UF | REG_C_AF), REG_C_UF | REG_C_AF, 'a day later: the alarm matched on the way');
});

t.test('PF is set when a period passed, without PIE too, and with PIE when no timer runs (no irqchip)', async (t) => {
  const { clock, step } = steppedClock();
  const { read, write } = rtcOn(undefined, clock);
  write(R.A, 0x2f); // 2 Hz
  read(R.C);
  step(500);
  const pfIrqf = () => read(R.C) & (REG_C_PF | REG_C_IRQF); // (UF comes with some steps)
  t.equal(pfIrqf(), REG_C_PF, 'PF alone: no IRQF without PIE');
  t.equal(read(R.C) & REG_C_PF, 0, 'and reading C cleared it');
  write(R.B, REG_B_24H | REG_B_PIE);
  step(500);
  t.equal(pfIrqf(), REG_C_PF | REG_C_IRQF, 'with PIE: PF and IRQF');
});

t.test('the periodic interrupt\'s timer: follows PIE set by another agent, pulses while IRQF is clear, stops when halted', async (t) => {
  const shared = CmosRtc.createShared(machine);
  const { read, write } = rtcOn(shared);
  let pulses = 0;
  let acknowledge = true;
  const interrupts = new CmosRtcInterrupts(shared, () => {
    pulses++;
    if (acknowledge) read(R.C); // what the guest's handler does
  });
  t.teardown(() => interrupts.halt());
  interrupts.run();
  write(R.A, 0x2a); // 64 Hz
  await new Promise((resolve) => setTimeout(resolve, 100));
  t.equal(pulses, 0, 'no pulses with PIE off');
  write(R.B, REG_B_24H | REG_B_PIE);
  await new Promise((resolve) => setTimeout(resolve, 250));
  t.ok(pulses >= 5 && pulses <= 18, `about 16 pulses in 250 ms at 64 Hz (${pulses})`);
  acknowledge = false;
  await new Promise((resolve) => setTimeout(resolve, 100));
  const unacknowledged = pulses;
  await new Promise((resolve) => setTimeout(resolve, 100));
  t.equal(pulses, unacknowledged, 'no new edge until register C is read');
  t.equal(read(R.C) & (REG_C_PF | REG_C_IRQF), REG_C_PF | REG_C_IRQF);
  acknowledge = true;
  interrupts.halt();
  const halted = pulses;
  await new Promise((resolve) => setTimeout(resolve, 100));
  t.equal(pulses, halted, 'none while halted');
  interrupts.run();
  await new Promise((resolve) => setTimeout(resolve, 100));
  t.ok(pulses > halted, 'running again resumes them');
  write(R.B, REG_B_24H);
  const off = pulses;
  await new Promise((resolve) => setTimeout(resolve, 100));
  t.ok(pulses - off <= 1, 'clearing PIE stops them');
});

t.test('the update-ended and alarm interrupts: a pulse at each tick of the seconds, with UF (and AF) in register C', async (t) => {
  const shared = CmosRtc.createShared(machine);
  const { read, write } = rtcOn(shared);
  const seen: number[] = [];
  let onPulse = () => {};
  // (PF, set at the default 1024 Hz rate, is left out.)
  const interrupts = new CmosRtcInterrupts(shared, () => {
    seen.push(read(R.C) & ~REG_C_PF);
    onPulse();
  });
  t.teardown(() => interrupts.halt());
  interrupts.run();
  write(R.SecondsAlarm, 0xc0);
  write(R.MinutesAlarm, 0xc0);
  write(R.HoursAlarm, 0xc0);
  read(R.C);
  write(R.B, REG_B_24H | REG_B_UIE);
  await new Promise((resolve) => setTimeout(resolve, 1100));
  t.ok(seen.length >= 1 && seen.length <= 2, `one pulse per second (${seen.length})`);
  t.ok(seen.every((c) => c === (REG_C_UF | REG_C_AF | REG_C_IRQF)), `each with UF, AF (a don't-care alarm) and IRQF: ${seen.map((c) => c.toString(16))}`);
  write(R.B, REG_B_24H | REG_B_AIE);
  write(R.HoursAlarm, 0); // midnight only: no alarm in the next second (unless it is midnight)
  seen.length = 0;
  await new Promise((resolve) => setTimeout(resolve, 1100));
  const midnight = new Date().getUTCHours() === 0;
  if (!midnight) t.same(seen, [], 'AIE with an alarm that does not match: no pulse');
  write(R.HoursAlarm, 0xc0);
  // The next tick of the seconds brings it: waited for as it comes (a busy host may be late).
  await new Promise<void>((resolve) => {
    const deadline = setTimeout(resolve, 5000);
    onPulse = () => {
      clearTimeout(deadline);
      resolve();
    };
    if (seen.length > 0) onPulse();
  });
  onPulse = () => {};
  t.ok(seen.length >= 1, `AIE with a matching alarm: a pulse (${seen.length})`);
  write(R.B, REG_B_24H | REG_B_SET);
  const stopped = seen.length;
  await new Promise((resolve) => setTimeout(resolve, 1100));
  t.equal(seen.length, stopped, 'no updates while SET is held');
});

t.test('device states: the RTC\'s state is optional, and checked when present', async (t) => {
  const base = { serial: {}, postCode: {} };
  const rtc = new CmosRtc(CmosRtc.createShared(machine)).saveState();
  t.ok(isDeviceStates(base), 'a state from a machine without the RTC loads');
  t.ok(isDeviceStates({ ...base, cmosRtc: rtc }));
  t.notOk(isDeviceStates({ ...base, cmosRtc: { ...rtc, cmos: [1, 2] } }));
  t.notOk(isDeviceStates({ ...base, cmosRtc: { ...rtc, offsetMs: 'x' } }));
  t.notOk(isDeviceStates({ ...base, cmosRtc: null }));
  t.throws(() => new CmosRtc(CmosRtc.createShared(machine)).restoreState({ ...rtc, cmos: [] }), { code: 'ERR_INVALID_ARG_VALUE' }, 'the device refuses a malformed state');
});
