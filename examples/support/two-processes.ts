// What the two-process examples (migrate.ts, live-update.ts) share, none of it their point: the
// example's own file run again as a second process (the destination), a unix socket between the
// two in a temporary folder, and the echo guest's console output.
import { fork } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { Machine } from 'node-kvm';

/** The echo guest: prints `echo> `, echoes what is typed, exits (debug-exit 5) on `q`. */
export const echoGuest = new URL('../../../guests/build/echo.bin', import.meta.url).pathname;

/** What the guest prints on the console from now on. */
export class ConsoleOutput {
  text = '';
  constructor(private readonly machine: Machine) {
    machine.console.on('data', (chunk: Buffer) => (this.text += chunk.toString('latin1')));
  }
  async waitFor(text: string): Promise<void> {
    while (!this.text.includes(text)) await new Promise((resolve) => this.machine.console.once('data', resolve));
  }
}

export interface TwoProcesses {
  /**
   * In the forked process: takes the machine arriving at `address`, calling `onListening` once it
   * listens; `sourceDone` resolves once the source has printed its lines, so that the two
   * processes' lines come in order.
   */
  destination(address: string, onListening: () => void, sourceDone: Promise<unknown>): Promise<void>;
  /** In this process: sends a machine to `address`, where the destination listens. */
  source(address: string): Promise<void>;
}

/** Runs `parts.source` here and the example's file (`exampleUrl`: its import.meta.url) forked as the destination. */
export async function runInTwoProcesses(exampleUrl: string, parts: TwoProcesses): Promise<void> {
  if (process.argv[2] === 'destination') {
    const sourceDone = new Promise((resolve) => process.once('message', resolve));
    await parts.destination(`unix:${process.argv[3]}`, () => process.send!('listening'), sourceDone);
    process.disconnect();
    return;
  }
  const dir = mkdtempSync(path.join(tmpdir(), 'node-kvm-example-'));
  const socket = path.join(dir, 'migration.sock');
  const destination = fork(fileURLToPath(exampleUrl), ['destination', socket], { stdio: 'inherit' });
  try {
    await new Promise((resolve) => destination.once('message', resolve));
    await parts.source(`unix:${socket}`);
    const ended = new Promise((resolve) => destination.once('exit', resolve));
    destination.send('source done');
    await ended;
  } finally {
    destination.kill();
    rmSync(dir, { recursive: true, force: true });
  }
}
