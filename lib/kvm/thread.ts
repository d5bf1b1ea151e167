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

/** Pins the calling thread to the given host CPUs. */
export function setThreadAffinity(cpus: readonly number[]): void {
  if (!Array.isArray(cpus)) throw argTypeError('cpus must be an array of CPU numbers');
  native.setThreadAffinity(cpus.map((cpu, i) => checkInteger(cpu, `cpus[${i}]`, 0, 1023)));
}
