// The vCPU throttle (a migration's auto-converge): each vCPU sleeps a share of every 10 ms (above
// 90 %, of a longer period that leaves it runs of 1 ms: throttle-sleep.ts), so that a guest that
// dirties memory faster than the link can carry slows down until it fits. A
// guest in a tight loop at CPL 3 never exits on its own: while throttled, a ticker thread
// (throttle-worker.ts) kicks every vCPU each period, and at that kick's exit each vCPU thread
// sleeps until the tick's time plus its share. The sleep waits on the control block's doorbell, so
// a pause, a stop or the throttle's end wakes it at once.
import { fileURLToPath } from 'node:url';
import { Worker } from 'node:worker_threads';
import { argTypeError, outOfRangeError } from '../kvm/errors.js';
import type { VcpuKickHandle } from '../kvm/vcpu.js';
import { RunState, STATE, THROTTLE_PERCENT, ringDoorbell } from './control.js';
import { MAX_THROTTLE_PERCENT } from './throttle-sleep.js';
import { workerEntry } from './worker-entry.js';

const tickerFile = workerEntry(fileURLToPath(import.meta.url), 'throttle-worker');

/** The main-thread side: sets the share, runs the ticker thread, and keeps the time throttled. */
export class VcpuThrottle {
  readonly #control: Int32Array;
  readonly #kicks: readonly VcpuKickHandle[];
  /** [0]: 1 while the ticker is wanted; notified at every change (throttle-worker.ts). */
  readonly #wanted = new Int32Array(new SharedArrayBuffer(4));
  /** The ticker thread, until it has ended. */
  #ticker: Worker | null = null;
  #ticking = false;
  /** Since when the share is above 0, or null. */
  #since: number | null = null;
  #throttledMs = 0;

  constructor(control: Int32Array, kicks: readonly VcpuKickHandle[]) {
    this.#control = control;
    this.#kicks = kicks;
  }

  /** The share of each period the vCPUs sleep now, in percent (0: not throttled). */
  get percent(): number {
    return Atomics.load(this.#control, THROTTLE_PERCENT);
  }

  /** How long the vCPUs have been throttled in all (wall time with a share above 0), in ms. */
  get throttledMs(): number {
    return this.#throttledMs + (this.#since === null ? 0 : performance.now() - this.#since);
  }

  /** Whether the ticker thread runs (a share above 0 takes effect once it does). */
  get ticking(): boolean {
    return this.#ticking;
  }

  /**
   * Starts the ticker thread ahead of a throttle that may come (a migration with auto-converge),
   * so that the first share set takes effect at once; set(0) lets it go.
   */
  prepare(): void {
    Atomics.store(this.#wanted, 0, 1);
    if (!this.#ticker) this.#startTicker();
  }

  /** Throttles the vCPUs to sleep `percent` % (0..99) of every period; 0 ends it and lets the ticker go. */
  set(percent: number): void {
    if (typeof percent !== 'number') throw argTypeError('percent must be a number');
    if (!Number.isInteger(percent) || percent < 0 || percent > MAX_THROTTLE_PERCENT) {
      throw outOfRangeError(`percent must be an integer 0..${MAX_THROTTLE_PERCENT}, got ${percent}`);
    }
    Atomics.store(this.#control, THROTTLE_PERCENT, percent);
    if (percent === 0) {
      Atomics.store(this.#wanted, 0, 0);
      if (this.#since !== null) this.#throttledMs += performance.now() - this.#since;
      this.#since = null;
    } else {
      this.#since ??= performance.now();
      this.prepare();
    }
    // The ticker sees the new share now; sleeping vCPUs wake (at 0 they run on).
    Atomics.notify(this.#wanted, 0);
    ringDoorbell(this.#control);
  }

  #startTicker(): void {
    const ticker = new Worker(tickerFile, {
      name: 'vcpu-throttle',
      workerData: { control: this.#control.buffer, wanted: this.#wanted.buffer, kicks: this.#kicks },
    });
    // The throttle keeps nobody's process alive: the migration that set it does.
    ticker.unref();
    let failed = false;
    ticker.on('message', () => (this.#ticking = true));
    // A ticker that cannot run leaves the guest unthrottled (a slower convergence), not failed.
    ticker.on('error', () => (failed = true));
    ticker.on('exit', () => {
      this.#ticker = null;
      this.#ticking = false;
      // Wanted again while it was ending.
      const state = Atomics.load(this.#control, STATE);
      if (!failed && Atomics.load(this.#wanted, 0) === 1 && state !== RunState.Stopping && state !== RunState.Stopped) this.#startTicker();
    });
    this.#ticker = ticker;
  }
}
