// Pre-started vCPU threads. A Worker takes tens of milliseconds to start and load its modules,
// longer than creating a whole VM; a pool pays that once, and machines borrow threads from it and
// return them when they stop.
import { startVcpuThread, type VcpuThread } from './vcpu-thread.js';
import { ErrorCode, argTypeError, NodeKvmError, outOfRangeError } from '../kvm/errors.js';
import { SpareVm, type SpareVmShape } from './spare-vm.js';

export { startVcpuThread, watchVcpuThread, type VcpuThread, type VcpuThreadMessage } from './vcpu-thread.js';

/**
 * How long after a machine was built (one that took the spare VM, or the first of its shape) the
 * next spare is made: after the caller has started it and its guest runs, which the main
 * thread's ~1 ms of ioctls (more while the host's grace periods are slow) would otherwise delay.
 */
const SPARE_VM_DELAY_MS = 25;

/** VcpuWorkerPool.create() and start() options. */
export interface VcpuWorkerPoolOptions {
  /**
   * Keep one spare VM (the VM, guest RAM's memory slot over placeholder RAM, the in-kernel
   * interrupt controllers, GSI routing and PIT, and its vCPUs) for the next restore from a
   * snapshot with this pool (Machine.restore(path, { pool })), in the RAM size, vCPU count and
   * irqchip setting of the last machine built with the pool; made in the background once such a
   * machine has been built, and again each time a restore takes it. A restore that finds none ready, or one that does not fit,
   * builds its VM as without the option (the unfit one is closed, and the next is made to fit).
   * close() closes it. Default false.
   */
  spareVm?: boolean;
}

/** vCPU threads started ahead of time (VcpuWorkerPool.create()) and lent to machines (MachineConfig.pool), which return them when they end: a machine then starts without waiting for its threads. */
export class VcpuWorkerPool {
  /** Loaded and waiting for a machine. */
  readonly #idle: VcpuThread[] = [];
  /** Still loading and not taken: handed out before new threads are started. */
  readonly #starting: VcpuThread[] = [];
  #closed = false;
  readonly #keepSpareVm: boolean;
  #spareVm: SpareVm | null = null;
  #spareVmsTaken = 0;
  /** The shape the next spare VM is made in (the last machine's), once one was seen. */
  #spareShape: SpareVmShape | null = null;
  #spareTimer: NodeJS.Timeout | null = null;
  /** Spare VMs being closed: KVM's teardown of a VM (15-20 ms) runs on libuv's pool, not the event loop. */
  readonly #spareVmsClosing = new Set<Promise<void>>();

  private constructor(options: VcpuWorkerPoolOptions) {
    this.#keepSpareVm = options.spareVm === true;
  }

  /** A pool with `size` threads started and idle. */
  static async create(size: number, options: VcpuWorkerPoolOptions = {}): Promise<VcpuWorkerPool> {
    const pool = VcpuWorkerPool.start(size, [], options);
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
  static start(size: number, started: readonly VcpuThread[] = [], options: VcpuWorkerPoolOptions = {}): VcpuWorkerPool {
    if (!Number.isInteger(size) || size < 0 || size > 1024) throw (typeof size === 'number' ? outOfRangeError : argTypeError)(`size must be an integer 0..1024, got ${String(size)}`);
    if (!Array.isArray(started)) throw argTypeError('started must be an array of vCPU threads');
    if (typeof options !== 'object' || options === null) throw argTypeError('options must be an object');
    if (options.spareVm !== undefined && typeof options.spareVm !== 'boolean') throw argTypeError(`options.spareVm must be a boolean, got ${typeof options.spareVm}`);
    const pool = new VcpuWorkerPool(options);
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

  /** Whether a spare VM is made and waiting (spareVm option). */
  get spareVmReady(): boolean {
    return this.#spareVm !== null;
  }

  /** The shape of the spare VM waiting, or null if there is none. */
  get spareVmShape(): { memoryBytes: number; irqchip: boolean; vcpus: number } | null {
    return this.#spareVm ? { ...this.#spareVm.shape } : null;
  }

  /** How many machines took the spare VM for their own (a restore that found none, or none that fit, built its VM itself). */
  get spareVmsTaken(): number {
    return this.#spareVmsTaken;
  }

  /**
   * Makes the spare VM now, for machines of `shape.memoryBytes` of RAM and `shape.vcpus` vCPUs
   * (default 1), with (default) or without the in-kernel irqchip, in place of one of another
   * shape: for the first restore, before any machine has shown the pool its shape. Nothing is done if the spare there fits already. Needs
   * the spareVm option (ERR_INVALID_STATE without it, or once closed); throws what creating the
   * VM throws, with nothing kept.
   */
  makeSpareVm(shape: { memoryBytes: number; irqchip?: boolean; vcpus?: number }): void {
    if (this.#closed) throw new NodeKvmError(ErrorCode.InvalidState, 'the vCPU pool is closed');
    if (!this.#keepSpareVm) throw new NodeKvmError(ErrorCode.InvalidState, 'this pool keeps no spare VM (VcpuWorkerPool.create(size, { spareVm: true }))');
    if (typeof shape !== 'object' || shape === null) throw argTypeError('shape must be an object with memoryBytes');
    const memoryBytes = shape.memoryBytes;
    // (Not config.ts's check, which imports this file's type: the upper bound is GuestMemory's.)
    if (!Number.isSafeInteger(memoryBytes) || memoryBytes < 1 << 20 || memoryBytes % (1 << 20) !== 0) {
      throw (typeof memoryBytes === 'number' ? outOfRangeError : argTypeError)(`shape.memoryBytes must be a positive multiple of 1 MiB, got ${String(memoryBytes)}`);
    }
    const wanted = { memoryBytes, irqchip: shape.irqchip ?? true, vcpus: shape.vcpus ?? 1 };
    if (typeof wanted.irqchip !== 'boolean') throw argTypeError(`shape.irqchip must be a boolean, got ${typeof wanted.irqchip}`);
    if (!Number.isInteger(wanted.vcpus) || wanted.vcpus < 1 || wanted.vcpus > 255) {
      throw (typeof wanted.vcpus === 'number' ? outOfRangeError : argTypeError)(`shape.vcpus must be an integer 1..255, got ${String(wanted.vcpus)}`);
    }
    this.#spareShape = wanted;
    if (this.#spareVm?.fits(wanted)) return;
    this.#closeInBackground(this.#spareVm);
    this.#spareVm = null;
    this.#spareVm = SpareVm.create(wanted);
  }

  /**
   * @internal For the machine builder: the spare VM if it fits a machine of `shape` (it is the
   * caller's from now on), else null (an unfit one is closed). A pool without the spareVm option
   * returns null. The builder calls noteMachineShape() once done.
   */
  takeSpareVm(shape: SpareVmShape): SpareVm | null {
    if (!this.#keepSpareVm || this.#closed) return null;
    this.#spareShape = { memoryBytes: shape.memoryBytes, irqchip: shape.irqchip, vcpus: shape.vcpus };
    const taken = this.#spareVm;
    this.#spareVm = null;
    if (!taken) return null;
    if (!taken.fits(shape)) {
      this.#closeInBackground(taken);
      return null;
    }
    this.#spareVmsTaken++;
    return taken;
  }

  /**
   * @internal For the machine builder: a machine of `shape` was built (or failed to be): the
   * spare VM is made in its shape, in the background, if there is none of it yet. Not during the
   * build, whose main thread its ioctls would hold up.
   */
  noteMachineShape(shape: SpareVmShape): void {
    if (!this.#keepSpareVm || this.#closed) return;
    if (this.#spareVm?.fits(shape)) return;
    this.#spareShape = { memoryBytes: shape.memoryBytes, irqchip: shape.irqchip, vcpus: shape.vcpus };
    this.#makeSpareSoon();
  }

  #makeSpareSoon(): void {
    if (this.#spareTimer) return;
    this.#spareTimer = setTimeout(() => {
      this.#spareTimer = null;
      const shape = this.#spareShape;
      if (this.#closed || !shape || this.#spareVm?.fits(shape)) return;
      this.#closeInBackground(this.#spareVm);
      this.#spareVm = null;
      try {
        this.#spareVm = SpareVm.create(shape);
      } catch {
        // No spare then (say /dev/kvm is full or gone): a restore builds its VM itself, and
        // reports what fails there.
      }
    }, SPARE_VM_DELAY_MS);
    // A pool waiting to make its spare does not keep the process alive.
    this.#spareTimer.unref();
  }

  /**
   * Resolves once every spare VM the pool has closed so far (one that did not fit a restore, or
   * one replaced) is gone: its fds closed and KVM's teardown done, off the event loop.
   */
  async spareVmsClosed(): Promise<void> {
    await Promise.all(this.#spareVmsClosing);
  }

  /** Closes `spare` (if any) in the background; spareVmsClosed() waits for it. */
  #closeInBackground(spare: SpareVm | null): void {
    if (!spare) return;
    const closing = spare.closeAsync().catch(() => {
      // Nothing to do about a close that failed: the VM is given up either way.
    }).finally(() => this.#spareVmsClosing.delete(closing));
    this.#spareVmsClosing.add(closing);
  }

  /** Ends the idle threads and those still loading (once they have), and waits until they have; closes the spare VM and waits for every spare VM it closed. */
  async close(): Promise<void> {
    this.#closed = true;
    if (this.#spareTimer) clearTimeout(this.#spareTimer);
    this.#spareTimer = null;
    this.#closeInBackground(this.#spareVm);
    this.#spareVm = null;
    const threads = [...this.#idle.splice(0), ...this.#starting.splice(0)];
    // A thread still loading takes the message once it has.
    for (const thread of threads) thread.send({ type: 'quit' });
    await Promise.all([this.spareVmsClosed(), ...threads.map((thread) => thread.exited)]);
  }
}
