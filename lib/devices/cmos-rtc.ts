// The PC's CMOS real-time clock, a Motorola MC146818 (ports 0x70/0x71, IRQ 8), as its data sheet
// describes it and as PC firmware leaves it. Port 0x70 takes the register index (bits 0-6) and
// the NMI mask (bit 7); port 0x71 reads or writes the register it names.
//
// The time is the host's UTC time plus an offset the guest sets by writing the time registers
// (with SET in register B held, as a BIOS does, or one register at a time without it). Time
// registers are computed when read, in binary or BCD and 12 or 24 hours as register B says, so
// the clock costs nothing between reads. UIP (register A bit 7) reads 1 in the last 244 us
// before each second ticks over, so a guest that waits for it to fall has a whole second to read
// a consistent time. Register C's flags are worked out when it is read: UF if a second ticked
// since the last read (or the update interrupt) reported it, AF if the alarm matched one of those
// seconds, PF if a periodic boundary passed (while PIE is off, or no timer runs; with PIE on, the
// periodic interrupt sets PF).
//
// The interrupts (periodic, update-ended, alarm) need timers, which vCPU threads cannot keep: the
// main thread runs them (CmosRtcInterrupts below) while the machine runs, and a vCPU thread that
// changes PIE, UIE, AIE, SET, the rate or the time bumps a generation word in the shared state
// and notifies it (Atomics.notify), so the timers follow at once, without polling and without
// waking the main thread while nothing changes.
//
// All the device's state is in one SharedArrayBuffer: a vCPU thread may run it, the main thread
// drives the interrupts and saves it. Reads and writes hold a small lock (two vCPUs may use the
// index register at once), as does the main thread's update interrupt; the periodic one only ORs
// flags into register C atomically.
import { argValueError } from '../kvm/errors.js';
import type { PortDevice } from './bus-device.js';

export const CMOS_RTC_PORT = 0x70;
export const CMOS_RTC_PORTS = 2;
export const CMOS_RTC_IRQ = 8;
export const CMOS_BYTES = 128;

// Register indexes (MC146818 data sheet, and the PC's century byte).
export const RtcRegister = {
  Seconds: 0x00, SecondsAlarm: 0x01, Minutes: 0x02, MinutesAlarm: 0x03, Hours: 0x04, HoursAlarm: 0x05,
  DayOfWeek: 0x06, DayOfMonth: 0x07, Month: 0x08, Year: 0x09, A: 0x0a, B: 0x0b, C: 0x0c, D: 0x0d,
  Century: 0x32,
} as const;
const R = RtcRegister;

export const REG_A_UIP = 0x80;
const REG_A_WRITABLE = 0x7f;
const REG_A_RATE = 0x0f;
export const REG_B_SET = 0x80;
export const REG_B_PIE = 0x40;
export const REG_B_AIE = 0x20;
export const REG_B_UIE = 0x10;
export const REG_B_DM = 0x04;
export const REG_B_24H = 0x02;
export const REG_C_IRQF = 0x80;
export const REG_C_PF = 0x40;
export const REG_C_AF = 0x20;
export const REG_C_UF = 0x10;
const REG_D_VRT = 0x80;
const NMI_MASK = 0x80;
const INDEX_MASK = 0x7f;
const HOUR_PM = 0x80;
/** An alarm byte from 0xC0 up matches any value (data sheet: "don't care"). */
const ALARM_DONT_CARE = 0xc0;
/** UIP is set this long before the update (data sheet: tBUC = 244 us). */
export const UIP_BEFORE_UPDATE_MS = 0.244;
/** As the BIOS leaves them: 32.768 kHz divider, 1024 Hz rate; 24 h, BCD; valid RAM and time. */
const RESET_A = 0x26;
const RESET_B = REG_B_24H;
// PC CMOS RAM (as QEMU's pc machine fills it for SeaBIOS, and as kernels read it).
const CMOS_FLOPPY_TYPES = 0x10;
const CMOS_EQUIPMENT = 0x14;
/** FPU present (bit 1) and a PS/2 mouse (bit 2); no floppy, EGA/VGA video (bits 4-5 zero). */
const EQUIPMENT = 0x06;
const CMOS_BASE_MEMORY_KIB = 0x15;
const CMOS_EXTENDED_MEMORY_KIB = 0x17;
const CMOS_EXTENDED_MEMORY_KIB_COPY = 0x30;
const CMOS_MEMORY_ABOVE_16MIB_64KIB = 0x34;
const CMOS_MEMORY_ABOVE_4GIB_64KIB = 0x5b;
const CMOS_CPU_COUNT_MINUS_ONE = 0x5f;

// Shared state: Int32 words, then Float64 values, then the 128 CMOS bytes.
const I_LOCK = 0;
/** The last byte written to port 0x70: register index and NMI mask. */
const I_INDEX = 1;
/** Register C flags set by the periodic interrupt and not yet read. */
const I_FLAGS = 2;
/** Bumped (and notified) when PIE, UIE, AIE, SET, the rate or the time change: the main thread's timers follow it. */
const I_GENERATION = 3;
/** 1 while the main thread's periodic timer runs: it raises PF then, not a read of register C. */
const I_TIMER_RUNS = 4;
/** Rounded up so the Float64 values that follow are 8-byte aligned. */
const INT_WORDS = 6;
/** Guest time minus host wall-clock time, in ms. */
const F_OFFSET_MS = 0;
/** Host wall clock minus the monotonic clock (ms), taken once per machine so every thread agrees. */
const F_WALL_MINUS_MONOTONIC_MS = 1;
/** The guest second up to which UF and AF are accounted. */
const F_LAST_UPDATE_SECOND = 2;
/** The periodic boundary up to which PF is accounted (while PIE is off). */
const F_LAST_PERIOD = 3;
const FLOAT_VALUES = 4;
const FLOATS_AT = INT_WORDS * 4;
const CMOS_AT = FLOATS_AT + FLOAT_VALUES * 8;
const SHARED_BYTES = CMOS_AT + CMOS_BYTES;

const MS_PER_DAY = 86_400_000;

/** What the guest sees of its hardware in the CMOS bytes a BIOS fills. */
export interface CmosMachine {
  /** RAM below 4 GiB, from address 0. */
  lowMemoryBytes: number;
  /** RAM from 4 GiB up. */
  highMemoryBytes: number;
  vcpus: number;
}

/** What a snapshot or a migration carries for the RTC. */
export interface CmosRtcState {
  /** The last byte written to port 0x70 (bit 7 the NMI mask). */
  index: number;
  /** The 128 bytes; the time registers hold the time only while SET is held. */
  cmos: number[];
  /** Guest time minus the host's UTC time, in ms: the restored clock runs on from host time + this. */
  offsetMs: number;
  /** Register C flags raised by the periodic interrupt and not yet read. */
  flags: number;
}

/** Whether `value` has the structure of a CmosRtcState (a state from a stream is checked before use). */
export function isCmosRtcState(value: unknown): value is CmosRtcState {
  if (typeof value !== 'object' || value === null) return false;
  const state = value as Record<string, unknown>;
  const isByte = (v: unknown) => Number.isInteger(v) && (v as number) >= 0 && (v as number) <= 0xff;
  return isByte(state.index) && isByte(state.flags) && typeof state.offsetMs === 'number' && Number.isFinite(state.offsetMs)
    && Array.isArray(state.cmos) && state.cmos.length === CMOS_BYTES && state.cmos.every(isByte);
}

/** The host's monotonic clock (CLOCK_MONOTONIC, the same in every thread) in ms. */
function monotonicMs(): number {
  const [seconds, nanoseconds] = process.hrtime();
  return seconds * 1000 + nanoseconds / 1e6;
}

/** The periodic interrupt's period in ms for rate bits `rate` (1..15), or 0 when off. */
export function periodicPeriodMs(rate: number): number {
  if (rate === 0) return 0;
  // Rates 1 and 2 are the prescaler's 256 and 128 Hz taps, not 32 and 16 kHz (data sheet table 3).
  const shift = rate <= 2 ? rate + 6 : rate - 1;
  return (1 << shift) / 32.768;
}

/** Year, month (1-12), day (1-31) and weekday (1 = Sunday) of a day count from 1970-01-01. */
export function civilFromDays(days: number): { year: number; month: number; day: number; weekday: number } {
  // Howard Hinnant's days_from_civil inverse, over 400-year eras from 0000-03-01.
  const z = days + 719468;
  const era = Math.floor(z / 146097);
  const dayOfEra = z - era * 146097;
  const yearOfEra = Math.floor((dayOfEra - Math.floor(dayOfEra / 1460) + Math.floor(dayOfEra / 36524) - Math.floor(dayOfEra / 146096)) / 365);
  const dayOfYear = dayOfEra - (365 * yearOfEra + Math.floor(yearOfEra / 4) - Math.floor(yearOfEra / 100));
  const monthIndex = Math.floor((5 * dayOfYear + 2) / 153);
  const day = dayOfYear - Math.floor((153 * monthIndex + 2) / 5) + 1;
  const month = monthIndex < 10 ? monthIndex + 3 : monthIndex - 9;
  const year = yearOfEra + era * 400 + (month <= 2 ? 1 : 0);
  const weekday = (((days + 4) % 7) + 7) % 7 + 1; // 1970-01-01 was a Thursday (5)
  return { year, month, day, weekday };
}

const toRegister = (value: number, b: number) => (b & REG_B_DM ? value : (Math.floor(value / 10) << 4) | (value % 10));
const fromRegister = (register: number, b: number) => (b & REG_B_DM ? register : (register >> 4) * 10 + (register & 0x0f));

function hoursToRegister(hours: number, b: number): number {
  if (b & REG_B_24H) return toRegister(hours, b);
  return toRegister(hours % 12 || 12, b) | (hours >= 12 ? HOUR_PM : 0);
}

function hoursFromRegister(register: number, b: number): number {
  if (b & REG_B_24H) return fromRegister(register, b);
  return (fromRegister(register & ~HOUR_PM, b) % 12) + (register & HOUR_PM ? 12 : 0);
}

/** Time register `index` (one of TIME_REGISTERS) at `timeMs`, as register B says; computes only what it needs. */
export function timeRegister(timeMs: number, index: number, b: number): number {
  const seconds = Math.floor(timeMs / 1000);
  const days = Math.floor(seconds / 86400);
  const ofDay = seconds - days * 86400;
  switch (index) {
    case R.Seconds: return toRegister(ofDay % 60, b);
    case R.Minutes: return toRegister(Math.floor(ofDay / 60) % 60, b);
    case R.Hours: return hoursToRegister(Math.floor(ofDay / 3600), b);
  }
  const { year, month, day, weekday } = civilFromDays(days);
  switch (index) {
    case R.DayOfWeek: return toRegister(weekday, b);
    case R.DayOfMonth: return toRegister(day, b);
    case R.Month: return toRegister(month, b);
    case R.Year: return toRegister(((year % 100) + 100) % 100, b);
    default: return toRegister(Math.floor(year / 100), b);
  }
}

const TIME_REGISTERS: readonly number[] = [R.Seconds, R.Minutes, R.Hours, R.DayOfWeek, R.DayOfMonth, R.Month, R.Year, R.Century];
const IS_TIME_REGISTER = new Uint8Array(CMOS_BYTES).map((_, index) => (TIME_REGISTERS.includes(index) ? 1 : 0));

/** The time registers (0x00-0x09 less the alarms, and the century) of `timeMs`, as register B says. */
export function encodeTime(timeMs: number, b: number): Map<number, number> {
  return new Map(TIME_REGISTERS.map((index) => [index, timeRegister(timeMs, index, b)]));
}

/** The time (ms since the epoch, whole seconds) that the time registers in `cmos` say, read as register B says. */
export function decodeTime(cmos: Uint8Array, b: number): number {
  const year = fromRegister(cmos[R.Century]!, b) * 100 + fromRegister(cmos[R.Year]!, b);
  // Out-of-range fields carry over (the 61st second into the next minute), as a chip would count
  // on; setUTCFullYear, unlike Date.UTC, takes years below 100 as they are.
  const date = new Date(0);
  date.setUTCFullYear(year, fromRegister(cmos[R.Month]!, b) - 1, fromRegister(cmos[R.DayOfMonth]!, b));
  date.setUTCHours(hoursFromRegister(cmos[R.Hours]!, b), fromRegister(cmos[R.Minutes]!, b), fromRegister(cmos[R.Seconds]!, b), 0);
  return date.getTime();
}


/** The CMOS RAM bytes a PC BIOS leaves for `machine` (index -> value), as QEMU's pc machine writes them. */
export function cmosMemoryBytes(machine: CmosMachine): Map<number, number> {
  const KIB = 1024;
  const MIB = 1024 * KIB;
  const bytes = new Map<number, number>();
  const put16 = (at: number, value: number) => {
    bytes.set(at, value & 0xff);
    bytes.set(at + 1, (value >> 8) & 0xff);
  };
  const low = machine.lowMemoryBytes;
  bytes.set(CMOS_FLOPPY_TYPES, 0);
  bytes.set(CMOS_EQUIPMENT, EQUIPMENT);
  put16(CMOS_BASE_MEMORY_KIB, Math.min(low / KIB, 640));
  const extendedKib = Math.min(Math.max(0, (low - MIB) / KIB), 0xffff);
  put16(CMOS_EXTENDED_MEMORY_KIB, extendedKib);
  put16(CMOS_EXTENDED_MEMORY_KIB_COPY, extendedKib);
  put16(CMOS_MEMORY_ABOVE_16MIB_64KIB, Math.min(Math.max(0, (low - 16 * MIB) / (64 * KIB)), 0xffff));
  const high64Kib = Math.floor(machine.highMemoryBytes / (64 * KIB));
  bytes.set(CMOS_MEMORY_ABOVE_4GIB_64KIB, high64Kib & 0xff);
  bytes.set(CMOS_MEMORY_ABOVE_4GIB_64KIB + 1, (high64Kib >> 8) & 0xff);
  bytes.set(CMOS_MEMORY_ABOVE_4GIB_64KIB + 2, (high64Kib >> 16) & 0xff);
  // More CPUs than a byte holds: 0, and firmware asks fw_cfg (as QEMU does).
  bytes.set(CMOS_CPU_COUNT_MINUS_ONE, machine.vcpus > 0xff ? 0 : machine.vcpus - 1);
  return bytes;
}

/** The RTC's ports, over its shared state (one instance per thread). */
export class CmosRtc implements PortDevice {
  readonly name = 'cmos-rtc';
  readonly #ints: Int32Array;
  readonly #floats: Float64Array;
  readonly #cmos: Uint8Array;
  readonly #monotonicMs: () => number;

  /** `monotonicClock` (ms) is the host's monotonic clock; tests give one they step themselves. */
  constructor(shared: SharedArrayBuffer, monotonicClock: () => number = monotonicMs) {
    this.#monotonicMs = monotonicClock;
    this.#ints = new Int32Array(shared, 0, INT_WORDS);
    this.#floats = new Float64Array(shared, FLOATS_AT, FLOAT_VALUES);
    this.#cmos = new Uint8Array(shared, CMOS_AT, CMOS_BYTES);
  }

  /** The state of a new machine's RTC: the host's time, BIOS register values and memory-size bytes. */
  static createShared(machine: CmosMachine): SharedArrayBuffer {
    const shared = new SharedArrayBuffer(SHARED_BYTES);
    const rtc = new CmosRtc(shared);
    const cmos = rtc.#cmos;
    for (const [index, value] of cmosMemoryBytes(machine)) cmos[index] = value;
    cmos[R.A] = RESET_A;
    cmos[R.B] = RESET_B;
    cmos[R.D] = REG_D_VRT;
    rtc.#startClock(0);
    return shared;
  }

  /** Bit 7 of the last write to port 0x70: NMIs masked. */
  get nmiMasked(): boolean {
    return (Atomics.load(this.#ints, I_INDEX) & NMI_MASK) !== 0;
  }

  /** The guest's time now, in ms since the epoch (UTC). */
  get guestTimeMs(): number {
    return this.#nowMs();
  }

  /** The last second whose update was accounted (a read of register C or the main thread's timer). */
  get lastUpdateSecond(): number {
    return this.#floats[F_LAST_UPDATE_SECOND]!;
  }

  read(offset: number, size: number): number {
    let value = 0;
    for (let lane = 0; lane < size; lane++) {
      // A wide access covers the index port and then the data port, as the ISA bus splits it.
      const port = offset + lane;
      const byte = port === 1 ? this.#locked(() => this.#readData()) : 0xff; // the index port is write-only
      value |= byte << (8 * lane);
    }
    return value >>> 0;
  }

  write(offset: number, size: number, value: number): void {
    for (let lane = 0; lane < size; lane++) {
      const port = offset + lane;
      const byte = (value >>> (8 * lane)) & 0xff;
      if (port === 0) Atomics.store(this.#ints, I_INDEX, byte);
      else if (port === 1) this.#locked(() => this.#writeData(byte));
    }
  }

  saveState(): CmosRtcState {
    return this.#locked(() => ({
      index: Atomics.load(this.#ints, I_INDEX),
      cmos: [...this.#cmos],
      offsetMs: this.#floats[F_OFFSET_MS]!,
      flags: Atomics.load(this.#ints, I_FLAGS),
    }));
  }

  /** Puts a saved state back; the clock runs on from the host's time now plus the saved offset. */
  restoreState(state: CmosRtcState): void {
    if (!isCmosRtcState(state)) throw argValueError('the saved CMOS RTC state is malformed');
    this.#locked(() => {
      Atomics.store(this.#ints, I_INDEX, state.index & 0xff);
      this.#cmos.set(state.cmos);
      Atomics.store(this.#ints, I_FLAGS, state.flags & (REG_C_PF | REG_C_IRQF));
      this.#startClock(state.offsetMs);
    });
    this.#changed();
  }

  // --- what the main thread's timer needs (CmosRtcInterrupts) ---

  /** The period of the periodic interrupt in ms while PIE is on, else 0. */
  get periodicInterruptMs(): number {
    if ((Atomics.load(this.#cmos, R.B) & REG_B_PIE) === 0) return 0;
    return periodicPeriodMs(Atomics.load(this.#cmos, R.A) & REG_A_RATE);
  }

  /** The word that changes with PIE, UIE, AIE, SET, the rate or the time (for Atomics.waitAsync). */
  get generation(): { array: Int32Array; index: number } {
    return { array: this.#ints, index: I_GENERATION };
  }

  /** Whether the main thread's periodic timer runs (it raises PF while PIE is on). */
  set timerRuns(runs: boolean) {
    Atomics.store(this.#ints, I_TIMER_RUNS, runs ? 1 : 0);
  }

  /** Whether the update-ended or alarm interrupt is enabled (UIE or AIE, and the clock running). */
  get updateInterruptsEnabled(): boolean {
    const b = Atomics.load(this.#cmos, R.B);
    return (b & (REG_B_UIE | REG_B_AIE)) !== 0 && (b & REG_B_SET) === 0;
  }

  /**
   * A second ticked with UIE or AIE on: raises UF (and AF on an alarm match, IRQF as enabled) unless
   * a read of register C already reported that update; true if IRQF rose (the line rises).
   */
  raiseUpdate(): boolean {
    return this.#locked(() => {
      const raised = this.#accountUpdates(this.#nowMs(), this.#cmos[R.B]!);
      const before = Atomics.or(this.#ints, I_FLAGS, raised);
      return (raised & REG_C_IRQF) !== 0 && (before & REG_C_IRQF) === 0;
    });
  }

  /** A periodic boundary passed with PIE on: raises PF and IRQF; true if IRQF was clear (the line rises). */
  raisePeriodic(): boolean {
    return (Atomics.or(this.#ints, I_FLAGS, REG_C_PF | REG_C_IRQF) & REG_C_IRQF) === 0;
  }

  // --- registers ---

  #startClock(offsetMs: number): void {
    const f = this.#floats;
    f[F_WALL_MINUS_MONOTONIC_MS] = Date.now() - this.#monotonicMs();
    f[F_OFFSET_MS] = offsetMs;
    this.#resetAccounting();
  }

  #resetAccounting(): void {
    const now = this.#nowMs();
    this.#floats[F_LAST_UPDATE_SECOND] = Math.floor(now / 1000);
    const period = periodicPeriodMs(this.#cmos[R.A]! & REG_A_RATE);
    this.#floats[F_LAST_PERIOD] = period ? Math.floor(now / period) : 0;
  }

  #nowMs(): number {
    const f = this.#floats;
    return this.#monotonicMs() + f[F_WALL_MINUS_MONOTONIC_MS]! + f[F_OFFSET_MS]!;
  }

  #setTime(timeMs: number): void {
    this.#floats[F_OFFSET_MS] = timeMs - (this.#monotonicMs() + this.#floats[F_WALL_MINUS_MONOTONIC_MS]!);
    this.#resetAccounting();
    this.#changed(); // the seconds now tick at another phase
  }

  /** Puts the current time into the time registers (the clock is about to stop, or a register changes). */
  #latchTime(b: number): number {
    const now = this.#nowMs();
    for (const [index, value] of encodeTime(now, b)) this.#cmos[index] = value;
    return now;
  }

  #readData(): number {
    const index = Atomics.load(this.#ints, I_INDEX) & INDEX_MASK;
    const cmos = this.#cmos;
    const b = cmos[R.B]!;
    if (IS_TIME_REGISTER[index]) {
      if (b & REG_B_SET) return cmos[index]!; // stopped: what the guest wrote
      return timeRegister(this.#nowMs(), index, b);
    }
    switch (index) {
      case R.A: {
        if (b & REG_B_SET) return cmos[R.A]!;
        const intoSecond = this.#nowMs() % 1000;
        return cmos[R.A]! | (intoSecond >= 1000 - UIP_BEFORE_UPDATE_MS ? REG_A_UIP : 0);
      }
      case R.C:
        return this.#readC(b);
      case R.D:
        return REG_D_VRT;
      default:
        return cmos[index]!;
    }
  }

  /** Register C: the flags raised since it was last read; reading clears them. */
  #readC(b: number): number {
    let flags = Atomics.exchange(this.#ints, I_FLAGS, 0);
    const f = this.#floats;
    const now = this.#nowMs();
    const rate = this.#cmos[R.A]! & REG_A_RATE;
    const period = periodicPeriodMs(rate);
    if (period) {
      const boundary = Math.floor(now / period);
      // With PIE on the timer raises PF (with IRQF, once per period); with PIE off, or without a
      // timer (no irqchip), PF still says a period passed (data sheet).
      const timerRaisesPf = b & REG_B_PIE && Atomics.load(this.#ints, I_TIMER_RUNS) === 1;
      if (boundary > f[F_LAST_PERIOD]! && !timerRaisesPf) flags |= REG_C_PF;
      f[F_LAST_PERIOD] = boundary;
    }
    flags |= this.#accountUpdates(now, b);
    if ((flags & REG_C_PF && b & REG_B_PIE) || (flags & REG_C_AF && b & REG_B_AIE) || (flags & REG_C_UF && b & REG_B_UIE)) flags |= REG_C_IRQF;
    return flags;
  }

  /**
   * The updates (seconds ticked) since they were last accounted, by a read of register C or the
   * main thread's timer, whichever comes first: UF, AF if the alarm matched one of them, IRQF if
   * UIE or AIE enables what was raised. Returns those flags. Called holding the lock.
   */
  #accountUpdates(now: number, b: number): number {
    if (b & REG_B_SET) return 0; // no updates while stopped
    const f = this.#floats;
    const second = Math.floor(now / 1000);
    const last = f[F_LAST_UPDATE_SECOND]!;
    f[F_LAST_UPDATE_SECOND] = second;
    if (second <= last) return 0;
    let raised = REG_C_UF;
    if (this.#alarmMatchedBetween(last + 1, second, b)) raised |= REG_C_AF;
    if (b & REG_B_UIE || (raised & REG_C_AF && b & REG_B_AIE)) raised |= REG_C_IRQF;
    return raised;
  }

  /** Whether the alarm registers match the time at any second in [first, last] (at most a day is looked at). */
  #alarmMatchedBetween(first: number, last: number, b: number): boolean {
    const cmos = this.#cmos;
    const alarms = [cmos[R.SecondsAlarm]!, cmos[R.MinutesAlarm]!, cmos[R.HoursAlarm]!];
    const from = Math.max(first, last - 86399);
    for (let second = from; second <= last; second++) {
      const ofDay = ((second % 86400) + 86400) % 86400;
      const values = [toRegister(ofDay % 60, b), toRegister(Math.floor(ofDay / 60) % 60, b), hoursToRegister(Math.floor(ofDay / 3600), b)];
      if (alarms.every((alarm, i) => alarm >= ALARM_DONT_CARE || alarm === values[i])) return true;
    }
    return false;
  }

  #writeData(value: number): void {
    const index = Atomics.load(this.#ints, I_INDEX) & INDEX_MASK;
    const cmos = this.#cmos;
    const b = cmos[R.B]!;
    if (IS_TIME_REGISTER[index]) {
      if (b & REG_B_SET) {
        cmos[index] = value; // taken when SET is cleared
        return;
      }
      // One register written while the clock runs: the others stay as they read now, and the
      // current second keeps its phase.
      const now = this.#latchTime(b);
      cmos[index] = value;
      this.#setTime(decodeTime(cmos, b) + (((now % 1000) + 1000) % 1000));
      return;
    }
    switch (index) {
      case R.A: {
        const before = cmos[R.A]!;
        Atomics.store(cmos, R.A, value & REG_A_WRITABLE);
        if ((before ^ value) & REG_A_RATE) {
          this.#resetAccounting();
          this.#changed();
        }
        return;
      }
      case R.B:
        this.#writeB(b, value);
        return;
      case R.C:
      case R.D:
        return; // read-only
      default:
        cmos[index] = value;
    }
  }

  #writeB(before: number, value: number): void {
    const cmos = this.#cmos;
    // Setting SET ends update-ended interrupts (data sheet: UIE is cleared when SET goes high).
    if (value & REG_B_SET) value &= ~REG_B_UIE;
    const modeBits = REG_B_DM | REG_B_24H;
    if (value & REG_B_SET && !(before & REG_B_SET)) {
      this.#latchTime(value); // stopped: the registers hold the time, in the new mode
    } else if (value & REG_B_SET && (before ^ value) & modeBits) {
      // The mode changes while stopped: the registers keep their time, in the new format.
      const held = decodeTime(cmos, before);
      for (const [index, encoded] of encodeTime(held, value)) cmos[index] = encoded;
    }
    Atomics.store(cmos, R.B, value);
    if (before & REG_B_SET && !(value & REG_B_SET)) {
      // Running again from what the guest wrote; the new second starts now.
      this.#setTime(decodeTime(cmos, value));
    }
    if ((before ^ value) & (REG_B_PIE | REG_B_UIE | REG_B_AIE | REG_B_SET)) this.#changed();
  }

  /** Tells the main thread's timers that PIE, UIE, AIE, SET, the rate or the time changed. */
  #changed(): void {
    Atomics.add(this.#ints, I_GENERATION, 1);
    Atomics.notify(this.#ints, I_GENERATION);
  }

  /** Runs `work` holding the lock: 0 free, 1 held, 2 held with a thread waiting (only then is a notify paid). */
  #locked<T>(work: () => T): T {
    const ints = this.#ints;
    let lock = Atomics.compareExchange(ints, I_LOCK, 0, 1);
    if (lock !== 0) {
      if (lock !== 2) lock = Atomics.exchange(ints, I_LOCK, 2);
      while (lock !== 0) {
        Atomics.wait(ints, I_LOCK, 2, 1);
        lock = Atomics.exchange(ints, I_LOCK, 2);
      }
    }
    try {
      return work();
    } finally {
      if (Atomics.exchange(ints, I_LOCK, 0) === 2) Atomics.notify(ints, I_LOCK, 1);
    }
  }
}

/**
 * The RTC's interrupts, on the main thread, while the machine runs. The periodic interrupt: while
 * PIE is on with a non-zero rate, raises PF and IRQF in register C at each period and pulses
 * IRQ 8 (the in-kernel IOAPIC and PIC take the edge) when IRQF was clear, as the chip's IRQ line
 * only rises again once register C was read. Node's timers have millisecond resolution: at rates
 * above 1 kHz, or when the event loop is late, the periods owed are delivered as one interrupt
 * (QEMU's lost-tick policy 'discard'). The update-ended and alarm interrupts: while UIE or AIE is
 * on, at each tick of the seconds, raises UF (AF when the alarm matches) and pulses the line the
 * same way. It follows register changes through the generation word the vCPU threads notify, so
 * it costs nothing while no interrupt is enabled.
 */
export class CmosRtcInterrupts {
  readonly #rtc: CmosRtc;
  readonly #pulse: () => void;
  #running = false;
  /** Each run() starts a new watch; an older one ends when it sees the epoch moved. */
  #epoch = 0;
  #periodicTimer: NodeJS.Timeout | null = null;
  #periodMs = 0;
  #lastBoundary = 0;
  #updateTimer: NodeJS.Timeout | null = null;
  /** Interrupts delivered since creation (for tests and diagnostics). */
  delivered = 0;

  /** `pulse` raises and lowers IRQ 8 (vm.setIrqLine(8, true) then false). */
  constructor(shared: SharedArrayBuffer, pulse: () => void) {
    this.#rtc = new CmosRtc(shared);
    this.#pulse = pulse;
  }

  /** The machine runs (start, resume): the interrupts run as the registers say. */
  run(): void {
    if (this.#running) return;
    this.#running = true;
    this.#rtc.timerRuns = true;
    void this.#watch(++this.#epoch);
  }

  /** The machine pauses or stops: no interrupts until run(); those owed meanwhile are dropped. */
  halt(): void {
    if (!this.#running) return;
    this.#running = false;
    this.#rtc.timerRuns = false;
    this.#epoch++;
    this.#cancelPeriodic();
    this.#cancelUpdates();
    const { array, index } = this.#rtc.generation;
    Atomics.notify(array, index); // releases the watch's wait
  }

  async #watch(epoch: number): Promise<void> {
    const { array, index } = this.#rtc.generation;
    while (epoch === this.#epoch) {
      const generation = Atomics.load(array, index);
      this.#configure();
      const waited = Atomics.waitAsync(array, index, generation);
      if (waited.async) await waited.value;
    }
  }

  #configure(): void {
    const periodMs = this.#rtc.periodicInterruptMs;
    if (periodMs !== this.#periodMs || this.#periodicTimer === null) {
      this.#cancelPeriodic();
      this.#periodMs = periodMs;
      if (periodMs !== 0) {
        this.#lastBoundary = Math.floor(this.#rtc.guestTimeMs / periodMs);
        this.#schedulePeriodic();
      }
    }
    // The next tick may have moved (the time was set): always scheduled afresh.
    this.#cancelUpdates();
    if (this.#rtc.updateInterruptsEnabled) this.#scheduleUpdate();
  }

  #schedulePeriodic(): void {
    const nextMs = (this.#lastBoundary + 1) * this.#periodMs;
    this.#periodicTimer = setTimeout(this.#periodicTick, Math.max(0, nextMs - this.#rtc.guestTimeMs));
    this.#periodicTimer.unref();
  }

  readonly #periodicTick = () => {
    this.#periodicTimer = null;
    if (!this.#running || this.#periodMs === 0) return;
    const boundary = Math.floor(this.#rtc.guestTimeMs / this.#periodMs);
    // However many periods passed, one interrupt (discarding the rest).
    if (boundary > this.#lastBoundary && this.#rtc.raisePeriodic()) this.#deliver();
    // The guest may have set its clock back: count from where it is now.
    this.#lastBoundary = boundary;
    this.#schedulePeriodic();
  };

  #scheduleUpdate(): void {
    const now = this.#rtc.guestTimeMs;
    const second = Math.floor(now / 1000);
    // A tick that fired a moment early (Node's timers keep whole milliseconds) accounted nothing;
    // if its second has begun since, it is owed at once, not merged into the next second's
    // interrupt. (Seconds further behind: the interrupts were just enabled, from the next tick.)
    const next = this.#rtc.lastUpdateSecond + 1 === second ? second : second + 1;
    this.#updateTimer = setTimeout(this.#updateTick, Math.max(0, next * 1000 - now));
    this.#updateTimer.unref();
  }

  readonly #updateTick = () => {
    this.#updateTimer = null;
    if (!this.#running || !this.#rtc.updateInterruptsEnabled) return;
    if (this.#rtc.raiseUpdate()) this.#deliver();
    this.#scheduleUpdate();
  };

  #deliver(): void {
    this.#pulse();
    this.delivered++;
  }

  #cancelPeriodic(): void {
    if (this.#periodicTimer) clearTimeout(this.#periodicTimer);
    this.#periodicTimer = null;
  }

  #cancelUpdates(): void {
    if (this.#updateTimer) clearTimeout(this.#updateTimer);
    this.#updateTimer = null;
  }
}
