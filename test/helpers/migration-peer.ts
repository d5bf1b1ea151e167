// A destination in another process (test/fixtures/migration-destination.ts), as a real
// migration has: its console, its final report, and how it ended. Or one in this process.
import { spawn, type ChildProcess } from 'node:child_process';
import path from 'node:path';
import { PassThrough } from 'node:stream';
import type { Test } from 'tap';
import { Machine } from '../../lib/index.js';
import type { IncomingConfig } from '../../lib/migration/types.js';
import { repoRoot } from './kvm.js';
import { childExecArgv } from './spawn.js';

const fixture = path.join(repoRoot, 'test', 'fixtures', 'migration-destination.ts');

export interface Destination {
  child: ChildProcess;
  /** The address it listens on (the real port for tcp port 0). */
  listening: Promise<string>;
  output(): string;
  stderr(): string;
  waitForOutput(text: string, timeoutMs?: number): Promise<void>;
  /** Resolves once its stderr matches `pattern`. */
  waitForStderr(pattern: RegExp, timeoutMs?: number): Promise<void>;
  /** Its last JSON line: { exit, code } or { error, code }, and its exit status. */
  result: Promise<{ report: { exit?: string; code?: number | null; error?: string }; status: number | null; signal: NodeJS.Signals | null }>;
}

export function startDestination(address: string, token?: string, memoryBytes?: number): Destination {
  const args = [fixture, address, token ?? '-', ...(memoryBytes ? [String(memoryBytes)] : [])];
  const child = spawn(process.execPath, [...childExecArgv, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  let output = '';
  let stderr = '';
  let closed = false;
  const waiters = new Set<() => void>();
  const wake = () => {
    for (const waiter of waiters) waiter();
  };
  let onListening: (address: string) => void;
  let onListenFailed: (error: Error) => void;
  const listening = new Promise<string>((resolve, reject) => {
    onListening = resolve;
    onListenFailed = reject;
  });
  child.stdout!.on('data', (chunk: Buffer) => {
    output += chunk.toString('latin1');
    wake();
  });
  child.stderr!.on('data', (chunk: Buffer) => {
    stderr += chunk.toString('latin1');
    const match = /^listening (\S+)$/m.exec(stderr);
    if (match) onListening(match[1]!);
    wake();
  });
  const result = new Promise<Awaited<Destination['result']>>((resolve) => {
    child.on('close', (status, signal) => {
      closed = true;
      onListenFailed(new Error(`the destination ended before listening: ${stderr}`));
      const last = stderr.trim().split('\n').filter((line) => line.startsWith('{')).pop();
      resolve({ report: last ? JSON.parse(last) : {}, status, signal });
      wake();
    });
  });
  /** Resolves once `done()` holds; rejects if the process ends first or after `timeoutMs`. */
  const until = (done: () => boolean, what: string, timeoutMs: number) => new Promise<void>((resolve, reject) => {
    const settle = (error?: Error) => {
      waiters.delete(check);
      clearTimeout(deadline);
      if (error) reject(error);
      else resolve();
    };
    const check = () => {
      if (done()) settle();
      else if (closed) settle(new Error(`destination ended without ${what}; output ${JSON.stringify(output.slice(-200))}; stderr ${stderr}`));
    };
    const deadline = setTimeout(() => settle(new Error(`destination: no ${what} in ${timeoutMs} ms; output ${JSON.stringify(output.slice(-200))}; stderr ${stderr}`)), timeoutMs);
    waiters.add(check);
    check();
  });
  return {
    child,
    listening,
    output: () => output,
    stderr: () => stderr,
    waitForOutput: (text, timeoutMs = 30_000) => until(() => output.includes(text), JSON.stringify(text), timeoutMs),
    waitForStderr: (pattern, timeoutMs = 30_000) => until(() => pattern.test(stderr), `${pattern} on stderr`, timeoutMs),
    result,
  };
}

/** A destination in this process (Machine.incoming), for a test that needs no process of its own. */
export interface LocalDestination {
  /** The address it listens on (the real port for tcp port 0). */
  listening: Promise<string>;
  /** The machine once it has arrived; rejects with why it did not. */
  arrived: Promise<Machine>;
  output(): string;
  /** What it logged. */
  logs: string[];
  waitForOutput(text: string, timeoutMs?: number): Promise<void>;
}

export function startLocalDestination(t: Test, address: string, config: Omit<IncomingConfig, 'onListening' | 'serial' | 'log'> = {}): LocalDestination {
  let output = '';
  const waiters = new Set<() => void>();
  const sink = new PassThrough();
  sink.on('data', (chunk: Buffer) => {
    output += chunk.toString('latin1');
    for (const waiter of waiters) waiter();
  });
  const logs: string[] = [];
  let onListening!: (address: string) => void;
  const listening = new Promise<string>((resolve) => (onListening = resolve));
  const arrived = Machine.incoming(address, { ...config, onListening, serial: { output: sink }, log: (message) => logs.push(message) });
  arrived.catch(() => {}); // the test looks at it when it expects the failure
  t.teardown(async () => {
    await (await arrived.catch(() => null))?.stop();
  });
  return {
    listening,
    arrived,
    output: () => output,
    logs,
    waitForOutput: (text, timeoutMs = 30_000) => new Promise((resolve, reject) => {
      const check = () => {
        if (!output.includes(text)) return;
        waiters.delete(check);
        clearTimeout(deadline);
        resolve();
      };
      const deadline = setTimeout(() => {
        waiters.delete(check);
        reject(new Error(`destination: no ${JSON.stringify(text)} in ${timeoutMs} ms; output ${JSON.stringify(output.slice(-200))}`));
      }, timeoutMs);
      waiters.add(check);
      check();
    }),
  };
}
