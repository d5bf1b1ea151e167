// The calling thread as a Linux thread: its name and CPU affinity. A vCPU is a thread of the VMM
// process, so naming it `vcpu0` makes it show up as such in ps/top/perf.
import { checkInteger } from './handle.js';
import { native } from './native.js';
import { argTypeError } from './errors.js';

/** Names the calling thread (at most 15 bytes), as /proc/<pid>/task/<tid>/comm shows it. */
export function setThreadName(name: string): void {
  if (typeof name !== 'string') throw argTypeError('name must be a string');
  native.setThreadName(name);
}

/**
 * Puts the calling thread in the SCHED_BATCH policy (`batch` true) or back in SCHED_OTHER, its
 * nice level unchanged. A batch thread that wakes does not preempt the thread running on its CPU;
 * it runs once that one blocks or has had its slice. For a thread woken by another that has more
 * to do first (a vCPU thread woken by the machine's start()).
 */
export function setThreadBatch(batch: boolean): void {
  if (typeof batch !== 'boolean') throw argTypeError('batch must be a boolean');
  native.setThreadBatch(batch);
}

/** Pins the calling thread to the given host CPUs. */
export function setThreadAffinity(cpus: readonly number[]): void {
  if (!Array.isArray(cpus)) throw argTypeError('cpus must be an array of CPU numbers');
  native.setThreadAffinity(cpus.map((cpu, i) => checkInteger(cpu, `cpus[${i}]`, 0, 1023)));
}
