// The ACPI PM register block at the ports QEMU's PIIX4 uses (ACPI 6.4 section 4.8.4), which the
// FADT names: PM1a event (PM1_STS, PM1_EN) at 0x600, PM1a control at 0x604, the PM timer at 0x608.
// ACPI mode is always on (no SMI_CMD): SCI_EN reads 1. Writing SLP_EN with the _S5 sleep type (0)
// to PM1a control powers the machine off. The PM timer is a 24-bit counter at 3.579545 MHz
// (TMR_VAL_EXT = 0), computed from the host's monotonic clock on each read: no thread ticks it.
import type { PortDevice } from './bus-device.js';

export const ACPI_PM_BASE = 0x600;
/** PM1a_EVT_BLK (4 bytes), PM1a_CNT_BLK (2 bytes, then 2 unused), PM_TMR_BLK (4 bytes). */
export const ACPI_PM_PORTS = 12;
export const PM1A_EVT_PORT = ACPI_PM_BASE;
export const PM1A_CNT_PORT = ACPI_PM_BASE + 4;
export const PM_TMR_PORT = ACPI_PM_BASE + 8;
export const PM_TIMER_HZ = 3_579_545;
/** The _S5 sleep type the DSDT gives (`Name (_S5, Package () { 0, 0, 0, 0 })`). */
export const SLP_TYP_S5 = 0;

const COUNTER_MODULUS = 0x1000000;
/** The counter's bit 23: TMR_STS is set each time it changes (ACPI 6.4, Power Management Timer). */
const HALF_COUNTER = 0x800000;

// Offsets in the block.
const PM1_STS = 0;
const PM1_EN = 2;
const PM1_CNT = 4;
const PM_TMR = 8;

// PM1_STS bits (ACPI 6.4 table 4.11) a guest can see set here: the timer's carry, and those it
// may clear. Nothing else raises events on this machine. PM1_EN bits: table 4.12.
const TMR_STS = 0x0001;
const PM1_STS_BITS = 0x8731; // TMR, BM, GBL, PWRBTN, SLPBTN, RTC, WAK
const PM1_EN_BITS = 0x0721; // TMR_EN, GBL_EN, PWRBTN_EN, SLPBTN_EN, RTC_EN
// PM1_CNT bits: table 4.13.
const SCI_EN = 0x0001;
const GBL_RLS = 0x0004; // write-only
const SLP_TYP_SHIFT = 10;
const SLP_TYP_MASK = 0x1c00;
const SLP_EN = 0x2000; // write-only
const PM1_CNT_STORED = 0x1c07 & ~GBL_RLS;
const WRITABLE_REGISTERS = [PM1_STS, PM1_EN, PM1_CNT];

// Shared state: Int32 words, then Float64 tick counts.
const S_STATUS = 0;
const S_ENABLE = 1;
const S_CONTROL = 2;
/** Set once the unsupported sleep type has been logged. */
const S_LOGGED_SLEEP = 3;
const STATE_INTS = 4;
/** Host ticks at which the counter read 0 (unwrapped): the counter is hostTicks() - base. */
const F_BASE_TICKS = 0;
/** The unwrapped count when TMR_STS was last cleared: set again once bit 23 changes after it. */
const F_TMR_CLEARED_AT = 1;
const STATE_BYTES = STATE_INTS * 4 + 2 * 8;

/**
 * The host's CLOCK_MONOTONIC in PM timer ticks, exactly: seconds * Hz plus the floor of the
 * nanoseconds' share. Every product stays below 2^53, so the double arithmetic is integer
 * arithmetic, the same on every thread, and never drifts. process.hrtime() is the cheapest
 * monotonic clock Node offers on all threads alike (about 80 ns; performance.now() has a
 * per-thread origin, the BigInt form costs more).
 */
export function hostTicks(): number {
  const [seconds, nanoseconds] = process.hrtime();
  return seconds * PM_TIMER_HZ + Math.floor((nanoseconds * PM_TIMER_HZ) / 1e9);
}

export interface AcpiPmEvents {
  /** The guest wrote SLP_EN with the _S5 type: the machine powers off. */
  powerOff(): void;
  log(message: string): void;
}

export class AcpiPm implements PortDevice {
  readonly name = 'acpi-pm';
  readonly #words: Int32Array;
  readonly #ticks: Float64Array;
  readonly #events: AcpiPmEvents;

  constructor(shared: SharedArrayBuffer, events: AcpiPmEvents) {
    this.#words = new Int32Array(shared, 0, STATE_INTS);
    this.#ticks = new Float64Array(shared, STATE_INTS * 4, 2);
    this.#events = events;
  }

  /** A new block: the counter starts at 0 now. */
  static createShared(): SharedArrayBuffer {
    const shared = new SharedArrayBuffer(STATE_BYTES);
    const ticks = new Float64Array(shared, STATE_INTS * 4, 2);
    ticks[F_BASE_TICKS] = hostTicks();
    Atomics.store(new Int32Array(shared, 0, STATE_INTS), S_CONTROL, SCI_EN);
    return shared;
  }

  /** The PM timer's value now (24 bits). */
  get counter(): number {
    return (hostTicks() - this.#ticks[F_BASE_TICKS]!) % COUNTER_MODULUS;
  }

  read(offset: number, size: number): number {
    if (offset === PM_TMR && size === 4) return this.counter;
    // Each 32-bit word of the block the access touches is read once, so the bytes of one access
    // come from one value of the counter.
    let value = 0;
    let word = -1;
    let wordValue = 0;
    for (let i = 0; i < size; i++) {
      const at = offset + i;
      if (at >> 2 !== word) {
        word = at >> 2;
        wordValue = this.#readWord(word);
      }
      value |= ((wordValue >>> (8 * (at & 3))) & 0xff) << (8 * i);
    }
    return value >>> 0;
  }

  write(offset: number, size: number, value: number): void {
    // Each 16-bit register takes the bytes of this access that fall in it.
    for (const register of WRITABLE_REGISTERS) {
      const first = Math.max(offset, register);
      const end = Math.min(offset + size, register + 2);
      if (first >= end) continue;
      let bits = 0;
      let mask = 0;
      for (let at = first; at < end; at++) {
        const shift = 8 * (at - register);
        bits |= ((value >>> (8 * (at - offset))) & 0xff) << shift;
        mask |= 0xff << shift;
      }
      this.#writeRegister(register, bits, mask);
    }
  }

  /** Word 0: PM1_STS and PM1_EN; 1: PM1_CNT; 2: the timer; past the block, nothing (all ones). */
  #readWord(word: number): number {
    if (word === PM1_STS >> 2) return this.#status() | (Atomics.load(this.#words, S_ENABLE) << 16);
    if (word === PM1_CNT >> 2) return Atomics.load(this.#words, S_CONTROL) | SCI_EN;
    if (word === PM_TMR >> 2) return this.counter;
    return 0xffffffff;
  }

  #status(): number {
    return Atomics.load(this.#words, S_STATUS) | (this.#timerCarried() ? TMR_STS : 0);
  }

  /** Whether bit 23 of the counter changed since TMR_STS was last cleared. */
  #timerCarried(): boolean {
    const count = hostTicks() - this.#ticks[F_BASE_TICKS]!;
    return Math.floor(count / HALF_COUNTER) !== Math.floor(this.#ticks[F_TMR_CLEARED_AT]! / HALF_COUNTER);
  }

  #writeRegister(register: number, bits: number, mask: number): void {
    if (register === PM1_STS) {
      const clear = bits & mask & PM1_STS_BITS;
      Atomics.and(this.#words, S_STATUS, ~clear);
      if (clear & TMR_STS) this.#ticks[F_TMR_CLEARED_AT] = hostTicks() - this.#ticks[F_BASE_TICKS]!;
    } else if (register === PM1_EN) {
      const old = Atomics.load(this.#words, S_ENABLE);
      Atomics.store(this.#words, S_ENABLE, ((old & ~mask) | (bits & mask)) & PM1_EN_BITS);
    } else {
      const old = Atomics.load(this.#words, S_CONTROL);
      Atomics.store(this.#words, S_CONTROL, (((old & ~mask) | (bits & mask)) & PM1_CNT_STORED) | SCI_EN);
      if (bits & mask & SLP_EN) this.#sleep((bits & SLP_TYP_MASK) >> SLP_TYP_SHIFT);
    }
  }

  #sleep(type: number): void {
    if (type === SLP_TYP_S5) {
      this.#events.powerOff();
      return;
    }
    // Sleep states S1-S4 are not offered (the DSDT names only _S5): a guest that tries one goes on.
    if (Atomics.exchange(this.#words, S_LOGGED_SLEEP, 1) === 0) this.#events.log(`acpi-pm: sleep type ${type} is not supported; the guest keeps running`);
  }

  /**
   * The counter's value and the registers. Saved while the machine is paused, so the counter
   * continues from this value when the state is restored, however long the pause.
   */
  saveState(): AcpiPmState {
    return {
      status: this.#status(),
      enable: Atomics.load(this.#words, S_ENABLE),
      control: Atomics.load(this.#words, S_CONTROL),
      counter: this.counter,
    };
  }

  restoreState(state: AcpiPmState): void {
    const now = hostTicks();
    const counter = state.counter % COUNTER_MODULUS;
    this.#ticks[F_BASE_TICKS] = now - counter;
    // A set TMR_STS stays set (sticky, as saved); a clear one sets again at the next carry.
    Atomics.store(this.#words, S_STATUS, state.status & PM1_STS_BITS & ~TMR_STS);
    this.#ticks[F_TMR_CLEARED_AT] = state.status & TMR_STS ? counter - HALF_COUNTER : counter;
    Atomics.store(this.#words, S_ENABLE, state.enable & PM1_EN_BITS);
    Atomics.store(this.#words, S_CONTROL, (state.control & PM1_CNT_STORED) | SCI_EN);
    Atomics.store(this.#words, S_LOGGED_SLEEP, 0);
  }
}

/** The ACPI PM registers' state, for snapshots and migrations. */
export interface AcpiPmState {
  /** PM1_STS as the guest would read it, TMR_STS included. */
  status: number;
  /** PM1_EN. */
  enable: number;
  /** PM1_CNT (SLP_TYP and the like; SCI_EN always set). */
  control: number;
  /** The PM timer's value (24 bits) when the state was saved. */
  counter: number;
}

/** Whether `value` has the structure of an AcpiPmState (a state from a stream is checked before use). */
export function isAcpiPmState(value: unknown): value is AcpiPmState {
  if (typeof value !== 'object' || value === null) return false;
  const state = value as Record<string, unknown>;
  const isInteger = (v: unknown): v is number => Number.isSafeInteger(v);
  return isInteger(state.status) && isInteger(state.enable) && isInteger(state.control) && isInteger(state.counter) && state.counter >= 0;
}
