// The vCPU side of the throttle (throttle.ts): the clock every thread shares, and the sleep a
// vCPU thread takes at a kick's exit while throttled. Apart, so that a vCPU thread loads no more
// than this.
import { EPOCH, RunState, STATE, THROTTLE_PERCENT, THROTTLE_TICK_US } from './control.js';

/** The throttle's period, as QEMU's CPU_THROTTLE_TIMESLICE. */
export const THROTTLE_PERIOD_MS = 10;
/** Above it a vCPU would never run between two ticks. */
export const MAX_THROTTLE_PERCENT = 99;
/**
 * The shortest run between two sleeps: a kick takes 0.1-0.2 ms to stop a vCPU here, which would
 * swamp the 0.1 ms a share of 99 % leaves of 10 ms (the guest ran about 10 times longer).
 */
const MIN_RUN_US = 1000;

/** The throttle's period at `percent`: 10 ms, longer above 90 % so that each run lasts MIN_RUN_US. */
export function throttlePeriodUs(percent: number): number {
  return Math.max(THROTTLE_PERIOD_MS * 1000, Math.round((MIN_RUN_US * 100) / (100 - percent)));
}

/**
 * Now on CLOCK_MONOTONIC in µs, wrapped to 32 bits: the same clock in every thread (a worker's
 * performance.now() counts from its own start). Differences of two readings are taken `| 0`.
 */
export function monotonicUs(): number {
  const [seconds, nanoseconds] = process.hrtime();
  return (seconds * 1_000_000 + Math.floor(nanoseconds / 1000)) | 0;
}

/**
 * The vCPU-thread side, at a kick's exit: while throttled, sleeps until the last tick's time plus
 * the share of its period (a kick that came late costs the guest less sleep, not a longer run),
 * serving requests meanwhile. Returns at once when the machine stops running or the throttle
 * ends, and without sleeping when the last tick is a period old or more (a kick of another kind).
 */
export function sleepIfThrottled(control: Int32Array, serve: () => void): void {
  const percent = Atomics.load(control, THROTTLE_PERCENT);
  const sinceTickUs = (monotonicUs() - Atomics.load(control, THROTTLE_TICK_US)) | 0;
  const shareUs = (percent * throttlePeriodUs(percent)) / 100;
  if (sinceTickUs < 0 || sinceTickUs >= shareUs) return;
  const until = performance.now() + (shareUs - sinceTickUs) / 1000;
  for (;;) {
    if (Atomics.load(control, THROTTLE_PERCENT) === 0 || Atomics.load(control, STATE) !== RunState.Running) return;
    const leftMs = until - performance.now();
    if (leftMs <= 0) return;
    const epoch = Atomics.load(control, EPOCH);
    serve();
    Atomics.wait(control, EPOCH, epoch, leftMs);
  }
}
