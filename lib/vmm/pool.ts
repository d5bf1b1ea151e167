// Pre-started vCPU threads. A Worker takes tens of milliseconds to start and load its modules,
// longer than creating a whole VM; a pool pays that once, and machines borrow threads from it and
// return them when they stop.
import { fileURLToPath } from 'node:url';
import { Worker, type TransferListItem } from 'node:worker_threads';
import type { MainMessage, WorkerMessage } from './types.js';
import { workerEntry } from './worker-entry.js';

// The worker module sits beside this one, as .ts under a TypeScript loader and .js when built.
const here = fileURLToPath(import.meta.url);
// Built, a one-file bundle of it starts faster where there is one (scripts/bundle-workers.mjs).
const workerFile = workerEntry(here, 'vcpu-worker');

export interface VcpuThread {
  readonly worker: Worker;
  send(message: MainMessage, transfer?: TransferListItem[]): void;
}

/** Starts one vCPU thread and resolves once it has loaded and is idle. */
export function startVcpuThread(): Promise<VcpuThread> {
  const worker = new Worker(workerFile, { name: 'vcpu' });
  return new Promise((resolve, reject) => {
    const onMessage = (message: WorkerMessage) => {
      if (message.type !== 'idle') return;
      worker.off('message', onMessage);
      worker.off('error', onError);
      resolve({ worker, send: (m, transfer) => worker.postMessage(m, transfer) });
    };
    const onError = (error: Error) => reject(error);
    worker.on('message', onMessage);
    worker.once('error', onError);
  });
}

export class VcpuWorkerPool {
  readonly #idle: VcpuThread[] = [];
  #closed = false;

  private constructor() {}

  /** A pool with `size` threads started and idle. */
  static async create(size: number): Promise<VcpuWorkerPool> {
    if (!Number.isInteger(size) || size < 0 || size > 1024) throw new RangeError('size must be an integer 0..1024');
    const pool = new VcpuWorkerPool();
    pool.#idle.push(...(await Promise.all(Array.from({ length: size }, startVcpuThread))));
    return pool;
  }

  get idleCount(): number {
    return this.#idle.length;
  }

  /** Takes `count` threads, starting new ones if the pool has too few. */
  async acquire(count: number): Promise<VcpuThread[]> {
    if (this.#closed) throw new Error('the vCPU pool is closed');
    const taken = this.#idle.splice(0, count);
    while (taken.length < count) taken.push(await startVcpuThread());
    return taken;
  }

  /** Gives threads back once their machine is done with them. */
  release(threads: VcpuThread[]): void {
    if (this.#closed) {
      for (const thread of threads) thread.send({ type: 'quit' });
      return;
    }
    this.#idle.push(...threads);
  }

  /** Ends the idle threads. */
  async close(): Promise<void> {
    this.#closed = true;
    const threads = this.#idle.splice(0);
    await Promise.all(threads.map((thread) => new Promise<void>((resolve) => {
      thread.worker.once('exit', () => resolve());
      thread.send({ type: 'quit' });
    })));
  }
}
