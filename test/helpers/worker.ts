// Worker threads running fixtures from test/fixtures/. A fixture is TypeScript: the Worker gets
// the test process's execArgv, which under tap carries its TypeScript loader (--import), so the
// worker imports ../../lib/index.js the same way the test file does.
import { Worker } from 'node:worker_threads';

// Of tap's other preloads, a fixture needs neither: mock serves t.mockImport, processinfo
// records the test process. Leaving them out saves about a third of each worker's start.
const fixtureExecArgv = process.execArgv.filter((arg) => !arg.includes('@tapjs/processinfo') && !arg.includes('@tapjs/mock'));

/** A fixture worker whose messages are queued from the start, so none is missed. */
export class FixtureWorker {
  readonly worker: Worker;
  /** Resolves with the exit code once the thread is gone. */
  readonly exited: Promise<number>;
  #messages: unknown[] = [];
  #waiting: { resolve(value: unknown): void; reject(error: Error): void }[] = [];
  #failure: Error | null = null;
  #exitCode: number | null = null;

  constructor(fixture: string, workerData?: unknown) {
    this.worker = new Worker(new URL(`../fixtures/${fixture}.ts`, import.meta.url), { workerData, execArgv: fixtureExecArgv });
    this.worker.on('message', (message) => {
      const waiter = this.#waiting.shift();
      if (waiter) waiter.resolve(message);
      else this.#messages.push(message);
    });
    this.worker.on('error', (error) => {
      this.#failure = error;
      for (const waiter of this.#waiting.splice(0)) waiter.reject(error);
    });
    this.exited = new Promise((resolve) => {
      this.worker.once('exit', (code) => {
        this.#exitCode = code;
        const error = this.#failure ?? new Error(`worker ${fixture} exited with code ${code} before posting`);
        for (const waiter of this.#waiting.splice(0)) waiter.reject(error);
        resolve(code);
      });
    });
  }

  /** The next message the worker posted; rejects if it fails or exits first. */
  next<T = unknown>(): Promise<T> {
    if (this.#messages.length > 0) return Promise.resolve(this.#messages.shift() as T);
    if (this.#failure) return Promise.reject(this.#failure);
    if (this.#exitCode !== null) return Promise.reject(new Error(`worker exited with code ${this.#exitCode}`));
    return new Promise<T>((resolve, reject) => this.#waiting.push({ resolve: resolve as (value: unknown) => void, reject }));
  }

  post(message: unknown): void {
    this.worker.postMessage(message);
  }
}

/** Resolves after `ms` milliseconds. */
export const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));
