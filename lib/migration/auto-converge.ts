// Auto-converge, as QEMU's: when the guest dirties memory faster than pre-copy can send it, the
// vCPUs are throttled (each sleeps a share of every 10 ms, lib/vmm/throttle.ts) more and more
// until what a round leaves fits the downtime budget. The throttle lasts until the migration ends,
// however it ends: a guest that stays here runs at full speed again.
import { argTypeError, argValueError, outOfRangeError } from '../kvm/errors.js';
import type { AutoConvergeOptions, MigrationStats } from './types.js';

export const DEFAULT_THROTTLE_INITIAL = 20;
export const DEFAULT_THROTTLE_INCREMENT = 10;
export const DEFAULT_THROTTLE_MAX = 99;
/**
 * A round is "dirty" when the guest dirtied more than this share of what the round sent (QEMU's
 * throttle-trigger-threshold): below it every round leaves less than the last, and pre-copy
 * converges without help.
 */
const TRIGGER_SHARE = 0.5;
/** Dirty rounds before each step up (QEMU's dirty_rate_high_cnt). */
const DIRTY_ROUNDS_PER_STEP = 2;

/** The vCPU throttle a migration's source lends auto-converge. */
export interface ThrottleControl {
  /** Gets ready to throttle at once when asked (the VMM's ticker thread starts). */
  prepare(): void;
  set(percent: number): void;
  readonly percent: number;
  readonly throttledMs: number;
}

export interface CheckedAutoConverge {
  throttleInitial: number;
  throttleIncrement: number;
  throttleMax: number;
}

/** MigrateOptions.autoConverge checked, with its defaults; null when off. */
export function checkAutoConverge(value: boolean | AutoConvergeOptions | undefined): CheckedAutoConverge | null {
  if (value === undefined || value === false) return null;
  if (value !== true && (typeof value !== 'object' || value === null)) throw argTypeError('autoConverge must be a boolean or an object');
  const options: AutoConvergeOptions = value === true ? {} : value;
  for (const key of Object.keys(options)) {
    if (key !== 'throttleInitial' && key !== 'throttleIncrement' && key !== 'throttleMax') throw argValueError(`autoConverge: unknown option '${key}'`);
  }
  const percent = (name: keyof AutoConvergeOptions, fallback: number): number => {
    const given = options[name];
    if (given === undefined) return fallback;
    if (typeof given !== 'number' || !Number.isInteger(given) || given < 1 || given > 99) {
      throw outOfRangeError(`autoConverge.${name} must be an integer percentage 1..99, got ${String(given)}`);
    }
    return given;
  };
  const checked = {
    throttleInitial: percent('throttleInitial', DEFAULT_THROTTLE_INITIAL),
    throttleIncrement: percent('throttleIncrement', DEFAULT_THROTTLE_INCREMENT),
    throttleMax: percent('throttleMax', DEFAULT_THROTTLE_MAX),
  };
  if (checked.throttleMax < checked.throttleInitial) {
    throw outOfRangeError(`autoConverge.throttleMax (${checked.throttleMax}) must be at least throttleInitial (${checked.throttleInitial})`);
  }
  return checked;
}

/** One migration's auto-converge: told of each round, it steps the throttle up. */
export class AutoConverge {
  readonly #options: CheckedAutoConverge;
  readonly #throttle: ThrottleControl;
  #dirtyRounds = 0;
  #stopped = false;
  /** The last share set, for the statistics once stopped. */
  #lastPercent = 0;

  constructor(options: CheckedAutoConverge, throttle: ThrottleControl) {
    this.#options = options;
    this.#throttle = throttle;
    throttle.prepare();
  }

  /**
   * After a pre-copy round that did not meet the downtime budget: `sentBytes` went out during
   * it and the guest dirtied `dirtiedBytes` meanwhile.
   */
  afterRound(sentBytes: number, dirtiedBytes: number): void {
    if (this.#stopped || !(dirtiedBytes > sentBytes * TRIGGER_SHARE)) return;
    if (++this.#dirtyRounds < DIRTY_ROUNDS_PER_STEP) return;
    this.#dirtyRounds = 0;
    const { throttleInitial, throttleIncrement, throttleMax } = this.#options;
    const now = this.#throttle.percent;
    const next = now === 0 ? throttleInitial : Math.min(now + throttleIncrement, throttleMax);
    if (next !== now) this.#throttle.set(next);
    this.#lastPercent = next;
  }

  /** Into the statistics: the share in force (once stopped, the last one set) and the time throttled. */
  report(stats: MigrationStats): void {
    stats.cpuThrottlePercentage = this.#stopped ? this.#lastPercent : this.#throttle.percent;
    stats.throttledMs = this.#throttle.throttledMs;
  }

  /**
   * Ends the throttle (the guest has paused for the last pass, or the migration failed): a guest
   * that runs on here runs at full speed. Idempotent.
   */
  stop(): void {
    this.#stopped = true;
    this.#throttle.set(0);
  }
}
