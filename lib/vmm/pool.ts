// Pre-started vCPU threads. A Worker takes tens of milliseconds to start and load its modules,
// longer than creating a whole VM; a pool pays that once, and machines borrow threads from it and
// return them when they stop.
import { startVcpuThread, type VcpuThread } from './vcpu-thread.js';
import { ErrorCode, argTypeError, NodeKvmError, outOfRangeError } from '../kvm/errors.js';

export { startVcpuThread, watchVcpuThread, type VcpuThread, type VcpuThreadMessage } from './vcpu-thread.js';

/** vCPU threads started ahead of time (VcpuWorkerPool.create()) and lent to machines (MachineConfig.pool), which return them when they end: a machine then starts without waiting for its threads. */
export class VcpuWorkerPool {
  /** Loaded and waiting for a machine. */
  readonly #idle: VcpuThread[] = [];
  /** Still loading and not taken: handed out before new threads are started. */
  readonly #starting: VcpuThread[] = [];
  #closed = false;

  private constructor() {}

  /** A pool with `size` threads started and idle. */
  static async create(size: number): Promise<VcpuWorkerPool> {
    const pool = VcpuWorkerPool.start(size);
    try {
      await Promise.all(pool.#starting.map((thread) => thread.loaded));
    } catch (error) {
      await pool.close(); // the threads that did start end with it
      throw error;
    }
    return pool;
  }

  /**
   * A pool whose `size` threads are starting: it can be handed to a machine at once, and the
   * machine builds its VM while they load (what a command that knows it will boot a guest wants).
   * `started` are threads the caller started earlier (startVcpuThread()): they count towards
   * `size` and belong to the pool from here on. A thread that fails to load fails the machine
   * that took it.
   */
  static start(size: number, started: readonly VcpuThread[] = []): VcpuWorkerPool {
    if (!Number.isInteger(size) || size < 0 || size > 1024) throw (typeof size === 'number' ? outOfRangeError : argTypeError)(`size must be an integer 0..1024, got ${String(size)}`);
    if (!Array.isArray(started)) throw argTypeError('started must be an array of vCPU threads');
    const pool = new VcpuWorkerPool();
    for (const thread of started) pool.#adopt(thread);
    for (let i = started.length; i < size; i++) pool.#adopt(startVcpuThread());
    return pool;
  }

  /** Idle or loading from now on, depending on where the thread stands; a failed one is dropped. */
  #adopt(thread: VcpuThread): void {
    if (this.#closed) {
      thread.send({ type: 'quit' });
      return;
    }
    if (thread.status === 'loaded') {
      this.#idle.push(thread);
      return;
    }
    if (thread.status === 'failed') return;
    this.#starting.push(thread);
    const leaveStarting = () => {
      const index = this.#starting.indexOf(thread);
      if (index < 0) return false; // taken meanwhile
      this.#starting.splice(index, 1);
      return true;
    };
    thread.loaded.then(() => {
      if (!leaveStarting()) return;
      if (this.#closed) thread.send({ type: 'quit' });
      else this.#idle.push(thread);
    }, () => leaveStarting());
  }

  /** Threads loaded and waiting for a machine. */
  get idleCount(): number {
    return this.#idle.length;
  }

  /**
   * Takes `count` threads: idle ones, then ones still loading, then new ones. It does not wait
   * for them to load: a machine sends a thread its vCPU at once, and the thread picks it up once
   * loaded.
   */
  async acquire(count: number): Promise<VcpuThread[]> {
    if (this.#closed) throw new NodeKvmError(ErrorCode.InvalidState, 'the vCPU pool is closed');
    if (!Number.isInteger(count) || count < 0) throw (typeof count === 'number' ? outOfRangeError : argTypeError)(`count must be a non-negative integer, got ${String(count)}`);
    const taken = this.#idle.splice(0, count);
    taken.push(...this.#starting.splice(0, count - taken.length));
    while (taken.length < count) taken.push(startVcpuThread());
    return taken;
  }

  /** Gives threads back once their machine is done with them. */
  release(threads: VcpuThread[]): void {
    for (const thread of threads) this.#adopt(thread);
  }

  /** Ends the idle threads and those still loading (once they have), and waits until they have. */
  async close(): Promise<void> {
    this.#closed = true;
    const threads = [...this.#idle.splice(0), ...this.#starting.splice(0)];
    // A thread still loading takes the message once it has.
    for (const thread of threads) thread.send({ type: 'quit' });
    await Promise.all(threads.map((thread) => thread.exited));
  }
}
