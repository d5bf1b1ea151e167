// An opt-in breakdown of where a migration's downtime (or a restore's time) goes: with
// NODE_KVM_PHASE_TIMING=1 in the environment, the source and the destination each note the
// moment of every step (pause, vCPU states saved, last pages sent, state encoded, sent; received,
// decoded, applied, resumed, acknowledged). The moments are wall-clock milliseconds
// (performance.timeOrigin + performance.now()), so two processes on one host compare. Off, each
// note is one test of a constant.

const enabled = process.env.NODE_KVM_PHASE_TIMING === '1';

/** One step and when it ended, in ms since the epoch (fractional). */
export interface PhaseMark {
  name: string;
  atMs: number;
}

let marks: PhaseMark[] = [];

/** Whether steps are noted at all. */
export function phaseTimingEnabled(): boolean {
  return enabled;
}

/** The clock the notes use: wall-clock ms, fractional (the same in every thread and process of a host). */
export function phaseClockMs(): number {
  return performance.timeOrigin + performance.now();
}

/** Notes that step `name` ends now, or ended at `atMs` (phaseClockMs()); nothing when off. */
export function markPhase(name: string, atMs = phaseClockMs()): void {
  if (enabled) marks.push({ name, atMs });
}

/** Starts a new breakdown, dropping the notes so far. */
export function resetPhases(): void {
  if (enabled) marks = [];
}

/** The steps noted since the last reset, in order. */
export function phaseMarks(): PhaseMark[] {
  return marks.slice();
}
