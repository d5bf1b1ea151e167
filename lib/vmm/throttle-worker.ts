// The vCPU throttle's ticker (throttle.ts): a thread of its own, so that the ticks keep their
// period to a fraction of a millisecond whatever the main thread is busy with (a timer there
// fires a millisecond or more late, and not at all while a large round is encoded: at a share of
// 99 % that would let the guest run several times longer than it should). While the share is
// above 0, each tick publishes its time and kicks every vCPU; at 0 the thread idles, and it ends
// once it is no longer wanted or the machine stops.
import { parentPort, workerData } from 'node:worker_threads';
import { kickVcpu, type VcpuKickHandle } from '../kvm/vcpu.js';
import { setThreadName } from '../kvm/thread.js';
import { RunState, STATE, THROTTLE_PERCENT, THROTTLE_TICK_US } from './control.js';
import { monotonicUs, throttlePeriodUs } from './throttle-sleep.js';

const data = workerData as { control: SharedArrayBuffer; wanted: SharedArrayBuffer; kicks: VcpuKickHandle[] };
const control = new Int32Array(data.control);
/** [0]: 1 while the throttle wants this thread; notified at every change of the share. */
const wanted = new Int32Array(data.wanted);
setThreadName('vcpu-throttle');
parentPort!.postMessage('ticking');
let nextTickUs = monotonicUs();
for (;;) {
  const state = Atomics.load(control, STATE);
  if (Atomics.load(wanted, 0) !== 1 || state === RunState.Stopping || state === RunState.Stopped) break;
  const percent = Atomics.load(control, THROTTLE_PERCENT);
  if (percent === 0) {
    // Idle until throttled (or no longer wanted); the machine's end is seen within a second.
    Atomics.wait(wanted, 0, 1, 1000);
    nextTickUs = monotonicUs();
    continue;
  }
  const nowUs = monotonicUs();
  if (((nowUs - nextTickUs) | 0) >= 0) {
    Atomics.store(control, THROTTLE_TICK_US, nowUs);
    for (const kick of data.kicks) kickVcpu(kick);
    // From the schedule, not from now: a late tick does not shift the ones after it (unless it
    // is a whole period late).
    const periodUs = throttlePeriodUs(percent);
    nextTickUs = (nextTickUs + periodUs) | 0;
    if (((nowUs - nextTickUs) | 0) >= 0) nextTickUs = (nowUs + periodUs) | 0;
  }
  Atomics.wait(wanted, 0, 1, ((nextTickUs - monotonicUs()) | 0) / 1000);
}
