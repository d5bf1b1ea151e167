// A destination in another process (test/fixtures/migration-destination.ts), as a real
// migration has: its console, its final report, and how it ended.
import { spawn, type ChildProcess } from 'node:child_process';
import path from 'node:path';
import { repoRoot } from './kvm.js';

const fixture = path.join(repoRoot, 'test', 'fixtures', 'migration-destination.ts');

export interface Destination {
  child: ChildProcess;
  /** The address it listens on (the real port for tcp port 0). */
  listening: Promise<string>;
  output(): string;
  stderr(): string;
  waitForOutput(text: string, timeoutMs?: number): Promise<void>;
  /** Its last JSON line: { exit, code } or { error, code }, and its exit status. */
  result: Promise<{ report: { exit?: string; code?: number | null; error?: string }; status: number | null; signal: NodeJS.Signals | null }>;
}

export function startDestination(address: string, token?: string, memoryBytes?: number): Destination {
  const args = [fixture, address, token ?? '-', ...(memoryBytes ? [String(memoryBytes)] : [])];
  const child = spawn(process.execPath, [...process.execArgv, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  let output = '';
  let stderr = '';
  let onListening: (address: string) => void;
  let onListenFailed: (error: Error) => void;
  const listening = new Promise<string>((resolve, reject) => {
    onListening = resolve;
    onListenFailed = reject;
  });
  child.stdout!.on('data', (chunk: Buffer) => (output += chunk.toString('latin1')));
  child.stderr!.on('data', (chunk: Buffer) => {
    stderr += chunk.toString('latin1');
    const match = /^listening (\S+)$/m.exec(stderr);
    if (match) onListening(match[1]!);
  });
  const result = new Promise<Awaited<Destination['result']>>((resolve) => {
    child.on('close', (status, signal) => {
      onListenFailed(new Error(`the destination ended before listening: ${stderr}`));
      const last = stderr.trim().split('\n').filter((line) => line.startsWith('{')).pop();
      resolve({ report: last ? JSON.parse(last) : {}, status, signal });
    });
  });
  return {
    child,
    listening,
    output: () => output,
    stderr: () => stderr,
    async waitForOutput(text, timeoutMs = 30_000) {
      const deadline = Date.now() + timeoutMs;
      while (!output.includes(text)) {
        if (Date.now() > deadline || child.exitCode !== null) {
          throw new Error(`destination: no ${JSON.stringify(text)}; output ${JSON.stringify(output.slice(-200))}; stderr ${stderr}`);
        }
        await new Promise((resolve) => setTimeout(resolve, 10));
      }
    },
    result,
  };
}
