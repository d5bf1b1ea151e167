// A guest's serial output collected from a stream sink, with waits that wake on each chunk (no polling).
import { PassThrough } from 'node:stream';
import { lastPass } from './migration.js';

export interface SerialCollector {
  /** Give this as `serial: { output }`. */
  sink: PassThrough;
  output(): string;
  /** Resolves once the output includes `text`; rejects after `timeoutMs` with the output so far. */
  waitFor(text: string, timeoutMs?: number): Promise<void>;
  /** Resolves once the dirtier's last "pass N ok" line has N >= `pass`. */
  waitForPass(pass: number, timeoutMs?: number): Promise<void>;
}

export function serialCollector(): SerialCollector {
  const sink = new PassThrough();
  let output = '';
  const waiters = new Set<() => void>();
  sink.on('data', (chunk: Buffer) => {
    output += chunk.toString('latin1');
    for (const waiter of waiters) waiter();
  });
  const waitUntil = (done: () => boolean, what: string, timeoutMs: number) => new Promise<void>((resolve, reject) => {
    const check = () => {
      if (!done()) return;
      waiters.delete(check);
      clearTimeout(deadline);
      resolve();
    };
    const deadline = setTimeout(() => {
      waiters.delete(check);
      reject(new Error(`timed out waiting for ${what}; output: ${JSON.stringify(output.slice(-300))}`));
    }, timeoutMs);
    waiters.add(check);
    check();
  });
  return {
    sink,
    output: () => output,
    waitFor: (text, timeoutMs = 20_000) => waitUntil(() => output.includes(text), JSON.stringify(text), timeoutMs),
    waitForPass: (pass, timeoutMs = 20_000) => waitUntil(() => lastPass(output) >= pass, `pass ${pass}`, timeoutMs),
  };
}
