// The downtime's breakdown for bench/migrate.ts, with NODE_KVM_PHASE_TIMING=1 (lib/vmm/phase-timing.ts):
// the steps both processes noted, merged on the one clock of the host, as ms since the source
// asked its guest to pause (negative: before it); the median of the runs for each step.
import type { PhaseMark } from '../lib/vmm/phase-timing.js';
import { median } from './report.js';

/** One migration's steps from both processes, in ms since the pause, in order. */
export function mergePhases(source: readonly PhaseMark[], destination: readonly PhaseMark[]): { name: string; ms: number }[] {
  const label = (side: string, mark: PhaseMark) => (/^(source|destination):/.test(mark.name) ? mark.name : `${side}: ${mark.name}`);
  const all = [...source.map((m) => ({ name: label('source', m), atMs: m.atMs })), ...destination.map((m) => ({ name: label('destination', m), atMs: m.atMs }))];
  const start = source.find((m) => m.name === 'source: pause asked')?.atMs;
  if (start === undefined) return [];
  return all.sort((a, b) => a.atMs - b.atMs).map((m) => ({ name: m.name, ms: m.atMs - start }));
}

/** Rows: step, then per scenario its median time since the pause (ms) and the step's share of it. */
export function breakdownTable(scenarios: { title: string; runs: { name: string; ms: number }[][] }[]): string[][] {
  const order: string[] = [];
  for (const scenario of scenarios) {
    for (const run of scenario.runs) for (const step of run) if (!order.includes(step.name)) order.push(step.name);
  }
  const at = (runs: { name: string; ms: number }[][], name: string) => {
    // The last of a step noted twice: the destination's dry run notes the same steps before the real ones.
    const values = runs.map((run) => [...run].reverse().find((s) => s.name === name)?.ms).filter((v): v is number => v !== undefined);
    return values.length > 0 ? median(values) : NaN;
  };
  // Steps in the order of their median moment in the first scenario that has them.
  order.sort((a, b) => {
    for (const scenario of scenarios) {
      const x = at(scenario.runs, a);
      const y = at(scenario.runs, b);
      if (!Number.isNaN(x) && !Number.isNaN(y)) return x - y;
    }
    return 0;
  });
  const rows: string[][] = [['step (ms since pause, median)', ...scenarios.map((s) => s.title)]];
  for (const name of order) {
    rows.push([name, ...scenarios.map((s) => {
      const ms = at(s.runs, name);
      return Number.isNaN(ms) ? '-' : ms.toFixed(3);
    })]);
  }
  return rows;
}
