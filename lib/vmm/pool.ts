// Pre-started vCPU threads. A Worker takes tens of milliseconds to start and load its modules,
// longer than creating a whole VM; a pool pays that once, and machines borrow threads from it and
// return them when they stop.
import { fileURLToPath } from 'node:url';
import { Worker, type TransferListItem } from 'node:worker_threads';
import type { MainMessage, WorkerMessage } from './types.js';
import { workerEntry } from './worker-entry.js';

// The worker module sits beside this one, as .ts under a TypeScript loader and .js when built.
const here = fileURLToPath(import.meta.url);
// Built, a one-file bundle of it starts faster where there is one (scripts/bundle.mjs).
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
  /** Threads still loading (start()): taken before new ones are started. */
  readonly #starting: Promise<VcpuThread>[] = [];
  #closed = false;

  private constructor() {}

  /** A pool with `size` threads started and idle. */
  static async create(size: number): Promise<VcpuWorkerPool> {
    const pool = VcpuWorkerPool.start(size);
    try {
      await Promise.all(pool.#starting);
    } catch (error) {
      await pool.close(); // the threads that did start end with it
      throw error;
    }
    return pool;
  }

  /**
   * A pool whose `size` threads are starting: it can be handed to a machine at once, and the
   * machine builds its VM while they load (what a command that knows it will boot a guest wants).
   * A thread that fails to load fails the acquire() that takes it.
   */
  static start(size: number): VcpuWorkerPool {
    if (!Number.isInteger(size) || size < 0 || size > 1024) throw new RangeError('size must be an integer 0..1024');
    const pool = new VcpuWorkerPool();
    for (let i = 0; i < size; i++) {
      const thread = startVcpuThread();
      pool.#starting.push(thread);
      thread.then((started) => {
        // Loaded and not yet taken: idle from now on.
        const index = pool.#starting.indexOf(thread);
        if (index < 0) return;
        pool.#starting.splice(index, 1);
        if (pool.#closed) started.send({ type: 'quit' });
        else pool.#idle.push(started);
      }, () => {
        const index = pool.#starting.indexOf(thread);
        if (index >= 0) pool.#starting.splice(index, 1);
      });
    }
    return pool;
  }

  get idleCount(): number {
    return this.#idle.length;
  }

  /** Takes `count` threads: idle ones, then ones still starting, then new ones. */
  async acquire(count: number): Promise<VcpuThread[]> {
    if (this.#closed) throw new Error('the vCPU pool is closed');
    const taken = this.#idle.splice(0, count);
    const waiting = this.#starting.splice(0, count - taken.length);
    const loaded = await Promise.allSettled(waiting);
    for (const outcome of loaded) if (outcome.status === 'fulfilled') taken.push(outcome.value);
    const failed = loaded.find((outcome): outcome is PromiseRejectedResult => outcome.status === 'rejected');
    try {
      if (failed) throw failed.reason;
      while (taken.length < count) taken.push(await startVcpuThread());
    } catch (error) {
      this.release(taken);
      throw error;
    }
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

  /** Ends the idle threads (and those still starting, once they have). */
  async close(): Promise<void> {
    this.#closed = true;
    const threads = [...this.#idle.splice(0), ...(await Promise.allSettled(this.#starting.splice(0)))
      .flatMap((outcome) => (outcome.status === 'fulfilled' ? [outcome.value] : []))];
    await Promise.all(threads.map((thread) => new Promise<void>((resolve) => {
      thread.worker.once('exit', () => resolve());
      thread.send({ type: 'quit' });
    })));
  }
}
