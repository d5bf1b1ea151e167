// Running a guest through the VMM (Machine) and collecting its serial output.
import { PassThrough } from 'node:stream';
import { Machine, type MachineConfig, type MachineExit } from '../../lib/index.js';

export interface Booted {
  machine: Machine;
  /** Everything the guest has written to COM1 so far. */
  output(): string;
  /** Resolves when the output contains `text`. */
  waitForOutput(text: string | RegExp, timeoutMs?: number): Promise<string>;
}

export async function boot(config: MachineConfig, logs: string[] = []): Promise<Booted> {
  const sink = new PassThrough();
  let output = '';
  const waiters: (() => void)[] = [];
  sink.on('data', (chunk: Buffer) => {
    output += chunk.toString('latin1');
    for (const wake of waiters.splice(0)) wake();
  });
  const machine = await Machine.create({ log: (message) => logs.push(message), ...config, serial: { output: sink, ...config.serial } });
  return {
    machine,
    output: () => output,
    async waitForOutput(text, timeoutMs = 20_000) {
      const deadline = Date.now() + timeoutMs;
      const matches = () => (typeof text === 'string' ? output.includes(text) : text.test(output));
      while (!matches()) {
        if (Date.now() > deadline) throw new Error(`timed out waiting for ${String(text)}; output so far: ${JSON.stringify(output)}`);
        await new Promise<void>((resolve) => {
          waiters.push(resolve);
          setTimeout(resolve, 50);
        });
      }
      return output;
    },
  };
}

/** Boots, starts, and waits for the machine's exit. */
export async function runToExit(config: MachineConfig, logs: string[] = []): Promise<{ exit: MachineExit; output: string }> {
  const booted = await boot(config, logs);
  booted.machine.start();
  const exit = await booted.machine.wait();
  // Let the output stream deliver the last bytes.
  await new Promise((resolve) => setImmediate(resolve));
  return { exit, output: booted.output() };
}

/**
 * A machine's `log` that keeps every line in `lines`, and `logged(pattern)`, which resolves once a
 * line matches: a device thread's log line and the guest's output reach the main thread by
 * different ports, in no set order, so a test that sees the guest's report waits for the line.
 */
export function logCollector(): { lines: string[]; log: (message: string) => void; logged(pattern: RegExp): Promise<void> } {
  const lines: string[] = [];
  const waiters: { pattern: RegExp; resolve: () => void }[] = [];
  return {
    lines,
    log(message) {
      lines.push(message);
      for (const waiter of waiters.filter(({ pattern }) => pattern.test(message))) {
        waiters.splice(waiters.indexOf(waiter), 1);
        waiter.resolve();
      }
    },
    logged(pattern) {
      if (lines.some((line) => pattern.test(line))) return Promise.resolve();
      return new Promise((resolve) => waiters.push({ pattern, resolve }));
    },
  };
}

/** A pattern for exactly this text (tap matches a string pattern as a part of the message). */
export function exactly(text: string): RegExp {
  return new RegExp(`^${text.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}$`);
}
