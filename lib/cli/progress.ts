// How a migration looks on the command line: a progress bar on a terminal, one line per update
// elsewhere (logs, pipes), and the final figures as a table.
import { PAGE_SIZE } from '../kvm/constants.js';
import type { MigrationProgress, MigrationStats } from '../migration/types.js';

const MIB = 1024 * 1024;

export interface ProgressDisplay {
  update(progress: MigrationProgress): void;
  /** Ends the bar's line, so that what is printed next starts on its own. */
  finish(): void;
}

/** A bar redrawn in place when `stream` is a terminal; otherwise one plain line per update. */
export function progressDisplay(stream: NodeJS.WritableStream & { isTTY?: boolean; columns?: number }): ProgressDisplay {
  const terminal = stream.isTTY === true;
  let drawn = false;
  return {
    update(progress) {
      if (!terminal) {
        stream.write(`${progressLine(progress)}\n`);
        return;
      }
      const barWidth = 20;
      const percent = progressPercent(progress);
      const filled = Math.round((percent / 100) * barWidth);
      const round = progress.iterations > 0 ? ` round ${progress.iterations}` : '';
      const text = `[${'#'.repeat(filled)}${'-'.repeat(barWidth - filled)}] ${percent.toFixed(0).padStart(3)}% ${progress.phase}${round}`
        + ` | ${mib(progress.bytesTransferred)} sent | ${progress.remainingPages} pages left | ${Math.round(progress.dirtyPagesRate)} pages/s dirty`;
      // \r and "erase line": the bar replaces itself. Cut to the width, or a wrapped line stays behind.
      stream.write(`\r\x1b[2K${text.slice(0, Math.max(1, (stream.columns ?? 80) - 1))}`);
      drawn = true;
    },
    finish() {
      if (terminal && drawn) stream.write('\n');
      drawn = false;
    },
  };
}

/** Share of guest RAM no longer waiting to be sent. */
export function progressPercent(progress: MigrationProgress): number {
  const pages = progress.memoryBytes / PAGE_SIZE;
  if (!(pages > 0)) return 0;
  return Math.min(100, Math.max(0, (100 * (pages - progress.remainingPages)) / pages));
}

export function progressLine(progress: MigrationProgress): string {
  const parts = [
    `migrate: ${progress.phase}${progress.iterations > 0 ? ` round ${progress.iterations}` : ''}`,
    `sent ${mib(progress.bytesTransferred)}`,
    `${progress.remainingPages} pages left`,
    `dirty ${Math.round(progress.dirtyPagesRate)} pages/s`,
  ];
  if (progress.phase === 'precopy') parts.push(`expected downtime ${ms(progress.expectedDowntimeMs)}`);
  if (progress.cpuThrottlePercentage > 0) parts.push(`vCPUs throttled ${progress.cpuThrottlePercentage}%`);
  return parts.join(', ');
}

/** The final figures, one per line, labels aligned. */
export function formatMigrationStats(stats: MigrationStats): string {
  const rows: [string, string][] = [
    ['status', stats.phase],
    ['total time', ms(stats.totalTimeMs)],
    ['setup', ms(stats.setupTimeMs)],
    ['downtime', ms(stats.downtimeMs)],
    ['transferred', mib(stats.bytesTransferred)],
    ['pages', String(stats.pagesTransferred)],
    ['zero pages', String(stats.zeroPagesSkipped)],
    ['pages resent', String(stats.pagesResent)],
    ['iterations', String(stats.iterations)],
    ['dirty rate', `${Math.round(stats.dirtyPagesRate)} pages/s`],
    ['throughput', `${(stats.throughputBytesPerSec / MIB).toFixed(1)} MiB/s`],
    ['guest memory', mib(stats.memoryBytes)],
    ['dirty log', stats.dirtyLogMode],
  ];
  // Only where auto-converge throttled the guest (older machines do not report it).
  if (stats.throttledMs > 0) rows.push(['cpu throttle', `${stats.cpuThrottlePercentage}% at the end, throttled ${ms(stats.throttledMs)}`]);
  const postcopy = stats.postcopy;
  if (postcopy) {
    const latency = postcopy.faultLatencyMs;
    rows.push(
      ['post-copy', `${ms(postcopy.durationMs)}, ${postcopy.missingPages} pages missing at the switch`],
      ['  on demand', `${postcopy.pagesOnDemand} pages for ${postcopy.requests} requests (${postcopy.faults} faults)`],
      ['  background', `${postcopy.pagesBackground} pages`],
      ['  fault latency', `p50 ${latency.p50.toFixed(2)} ms, p90 ${latency.p90.toFixed(2)} ms, p99 ${latency.p99.toFixed(2)} ms`],
      ['  recoveries', String(postcopy.recoveries)],
    );
  }
  return table(rows);
}

export function table(rows: [string, string][]): string {
  const width = Math.max(...rows.map(([label]) => label.length));
  return rows.map(([label, value]) => `${label.padEnd(width)}  ${value}\n`).join('');
}

export function mib(bytes: number): string {
  return `${(bytes / MIB).toFixed(1)} MiB`;
}

export function ms(milliseconds: number): string {
  return `${milliseconds < 10 ? milliseconds.toFixed(1) : Math.round(milliseconds)} ms`;
}
