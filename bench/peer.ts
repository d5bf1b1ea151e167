// The destination of a benchmark's migration: bench/migrate-peer.js in another process, its JSON
// lines on stdout (listening, report, error) turned into promises. For bench/migrate.ts and
// bench/migrate-local.ts.
import { spawn, type ChildProcess } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const peerScript = path.join(path.dirname(fileURLToPath(import.meta.url)), 'migrate-peer.js');

export interface Peer {
  child: ChildProcess;
  /** The address it listens on. */
  listening: Promise<string>;
  /** What it found once the guest ran there (or why it failed). */
  report: Promise<Record<string, unknown>>;
}

/**
 * Starts the peer with `args`, its command line under `prefix` (a placement's `taskset -c 1`,
 * `ip netns exec NS`); `track` is told of the child (to end it on a signal).
 */
export function startPeer(args: string[], prefix: readonly string[] = [], track: (child: ChildProcess) => void = () => {}): Peer {
  const command = [...prefix, process.execPath, peerScript, ...args];
  const child = spawn(command[0]!, command.slice(1), { stdio: ['ignore', 'pipe', 'pipe'] });
  track(child);
  let stdout = '';
  let stderr = '';
  let onListening!: (address: string) => void;
  let onReport!: (report: Record<string, unknown>) => void;
  let onFailure!: (error: Error) => void;
  const report = new Promise<Record<string, unknown>>((resolve, reject) => {
    onReport = resolve;
    onFailure = reject;
  });
  // A peer that fails before it listens fails `listening` too.
  const listening = Promise.race([new Promise<string>((resolve) => (onListening = resolve)), report.then(() => new Promise<never>(() => {}))]);
  // Whoever awaits these still sees a failure; this keeps one nobody awaits (after an earlier
  // error) from ending the process before that error is reported.
  report.catch(() => {});
  listening.catch(() => {});
  child.stdout!.on('data', (chunk: Buffer) => {
    stdout += chunk.toString('utf8');
    let newline: number;
    while ((newline = stdout.indexOf('\n')) >= 0) {
      const message = JSON.parse(stdout.slice(0, newline)) as Record<string, unknown>;
      stdout = stdout.slice(newline + 1);
      if (typeof message.listening === 'string') onListening(message.listening);
      else if (message.report) onReport(message.report as Record<string, unknown>);
      else if (message.error) onFailure(new Error(`peer: ${String(message.error)}`));
    }
  });
  child.stderr!.on('data', (chunk: Buffer) => (stderr += chunk.toString('utf8')));
  child.on('close', (status, signal) => onFailure(new Error(`peer ended (${status ?? signal}) without a report: ${stderr.trim()}`)));
  return { child, listening, report };
}
