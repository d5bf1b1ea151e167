// The control block shared by the main thread and every vCPU thread of a machine: run state,
// counters, and who reported the machine's exit first. vCPU threads check the state after every
// exit and park on Atomics.wait while paused; a parked thread also serves the main thread's
// requests (save or restore its vCPU's state), since only it may make its vCPU's ioctls.

export const STATE = 0;
export const PARKED = 1;
export const HALTED = 2;
export const EXIT_CLAIMED = 3;
/** Bumped on every state change and request, so a parked thread never misses a wake-up. */
export const EPOCH = 4;
/** The vCPU throttle (throttle.ts): the share of each period the vCPUs sleep, in percent, and the last tick's time. */
export const THROTTLE_PERCENT = 5;
export const THROTTLE_TICK_US = 6;
const CONTROL_INTS = 7;
/** Where the vCPUs' stop times start (bytes: past the ints, 8-aligned for a Float64Array). */
const STOPPED_AT_OFFSET = Math.ceil((CONTROL_INTS * 4) / 8) * 8;

export const RunState = {
  /** vCPUs are created and wait for start(). */
  Created: 0,
  Running: 1,
  Paused: 2,
  /** Ending: the vCPU threads leave (a thread that sees it never runs the guest again). */
  Stopping: 3,
  /** Ended, everything released (set by the main thread once no vCPU thread is left). */
  Stopped: 4,
} as const;

export function createControl(vcpuCount: number): SharedArrayBuffer {
  return new SharedArrayBuffer(STOPPED_AT_OFFSET + 8 * vcpuCount);
}

/**
 * Per vCPU, with phase timing (phase-timing.ts): when a pause's kick took it out of the guest (0:
 * not noted). Its thread writes it; the pause's breakdown reads it, whichever thread saves the vCPU.
 */
export function stoppedAtTimes(control: Int32Array): Float64Array {
  return new Float64Array(control.buffer, STOPPED_AT_OFFSET);
}

/**
 * The vCPU-thread side: park while created or paused, calling `serve` each time the thread wakes
 * (requests arrive by ringDoorbell()); true once running, false once the machine is stopping.
 */
export function waitWhileNotRunning(control: Int32Array, serve?: () => void): boolean {
  let parked = false;
  try {
    for (;;) {
      const epoch = Atomics.load(control, EPOCH);
      serve?.();
      const state = Atomics.load(control, STATE);
      if (state === RunState.Running) return true;
      if (state === RunState.Stopping || state === RunState.Stopped) return false;
      if (state === RunState.Paused && !parked) {
        parked = true;
        Atomics.add(control, PARKED, 1);
        Atomics.notify(control, PARKED);
      }
      Atomics.wait(control, EPOCH, epoch);
    }
  } finally {
    if (parked) {
      Atomics.sub(control, PARKED, 1);
      Atomics.notify(control, PARKED);
    }
  }
}

/** Sets the state and wakes every thread waiting on it. */
export function setRunState(control: Int32Array, state: number): void {
  Atomics.store(control, STATE, state);
  Atomics.notify(control, STATE);
  ringDoorbell(control);
}

/** Wakes parked vCPU threads so that they look for requests. */
export function ringDoorbell(control: Int32Array): void {
  Atomics.add(control, EPOCH, 1);
  Atomics.notify(control, EPOCH);
}

/** Claims the right to report the machine's exit; true for the first caller only. */
export function claimExit(control: Int32Array): boolean {
  return Atomics.compareExchange(control, EXIT_CLAIMED, 0, 1) === 0;
}

/**
 * A vCPU thread pauses the running machine itself (a debug exit): true if it did, false if the
 * machine was not running (already paused or ending), when there is nobody to tell.
 */
export function pauseFromVcpu(control: Int32Array): boolean {
  if (Atomics.compareExchange(control, STATE, RunState.Running, RunState.Paused) !== RunState.Running) return false;
  Atomics.notify(control, STATE);
  ringDoorbell(control);
  return true;
}
