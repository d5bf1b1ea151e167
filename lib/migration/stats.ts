// A migration's statistics (MigrationStats) as a migration starts them.
import type { DirtyLogMode, MigrationStats } from './types.js';

/** A migration's statistics before anything has happened. */
export function newMigrationStats(memoryBytes: number, dirtyLogMode: DirtyLogMode): MigrationStats {
  // Every number is made as a fraction (NaN), then zeroed, so that V8 stores each as a double from
  // the start. Made with 0, a field becomes a double only at the first time or rate written to
  // it: that changes the object's map in the middle of the migration, and V8 throws away the code
  // it compiled for the old map (the counting of pages sent, in a process's first migrations).
  const stats: MigrationStats = {
    phase: 'setup', totalTimeMs: NaN, setupTimeMs: NaN, downtimeMs: NaN, expectedDowntimeMs: NaN, bytesTransferred: NaN, pagesTransferred: NaN,
    zeroPagesSkipped: NaN, pagesResent: NaN, iterations: NaN, dirtyPagesRate: NaN, throughputBytesPerSec: NaN, remainingPages: NaN,
    memoryBytes: NaN, dirtyLogMode, cpuThrottlePercentage: NaN, throttledMs: NaN,
  };
  const numbers = stats as unknown as Record<string, unknown>;
  for (const key of Object.keys(numbers)) if (typeof numbers[key] === 'number') numbers[key] = 0;
  stats.memoryBytes = memoryBytes;
  return stats;
}
