// A machine's disks: one virtio-mmio block device each, with its image file, its eventfds (an
// ioeventfd for the guest's notify, an irqfd for the completion interrupt) and its own thread.
// The main thread only starts, pauses, resumes and stops the threads, and saves and restores the
// register state while they are parked.
import { closeSync, openSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { Worker } from 'node:worker_threads';
import { BLK_ID_BYTES, blkModel, diskIdBytes, diskSectors, type DiskConfig } from '../devices/virtio-blk.js';
import { Reg, VIRTIO_FIRST_GSI, VIRTIO_MAX_DEVICES, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE, VirtioMmio, type VirtioMmioState } from '../devices/virtio-mmio.js';
import { EventFd, type GuestMemory, type Vm } from '../kvm/index.js';
import { ErrorCode, argTypeError, argValueError, NodeKvmError, outOfRangeError, systemError } from '../kvm/errors.js';
import { lockFile, unlockFile } from '../kvm/host.js';
import type { DirtyBitmap } from './dirty-bitmap.js';
import { workerEntry } from './worker-entry.js';
import { RunState } from './control.js';
import { DEVICE_CONTROL_BYTES, DEVICE_PARKED, DEVICE_STATE, type VirtioWorkerData, type VirtioWorkerMessage } from './virtio-control.js';

export type { DiskConfig } from '../devices/virtio-blk.js';

/** A disk as a machine's shape records it: enough to check that a saved state fits. */
export interface DiskShape {
  path: string;
  readOnly: boolean;
  sectors: number;
  id: string;
}

const here = fileURLToPath(import.meta.url);
// Built, a one-file bundle of it starts faster where there is one (scripts/bundle.mjs).
const workerFile = workerEntry(here, 'virtio-worker');

/** Checks a `disks` configuration; returns it with defaults filled in. */
export function checkDiskConfigs(disks: unknown): Required<DiskConfig>[] {
  if (disks === undefined) return [];
  if (!Array.isArray(disks)) throw argTypeError('disks must be an array of { path, readOnly?, id? }');
  if (disks.length > VIRTIO_MAX_DEVICES) throw outOfRangeError(`at most ${VIRTIO_MAX_DEVICES} disks, got ${disks.length}`);
  return disks.map((disk: unknown, index) => {
    if (typeof disk !== 'object' || disk === null) throw argTypeError(`disks[${index}] must be an object`);
    const { path: file, readOnly, id } = disk as DiskConfig;
    if (typeof file !== 'string' || file === '') throw argTypeError(`disks[${index}].path must be a file path`);
    if (readOnly !== undefined && typeof readOnly !== 'boolean') throw argTypeError(`disks[${index}].readOnly must be a boolean`);
    if (id !== undefined && typeof id !== 'string') throw argTypeError(`disks[${index}].id must be a string of at most ${BLK_ID_BYTES} bytes`);
    if (id !== undefined && new TextEncoder().encode(id).length > BLK_ID_BYTES) {
      throw argValueError(`disks[${index}].id must be a string of at most ${BLK_ID_BYTES} bytes`);
    }
    return { path: file, readOnly: readOnly ?? false, id: id ?? new TextDecoder().decode(diskIdBytes({ path: file })) };
  });
}

interface Disk {
  readonly shape: DiskShape;
  readonly fd: number;
  readonly notify: EventFd;
  readonly irq: EventFd | null;
  readonly mmio: VirtioMmio;
  readonly control: Int32Array;
  worker: Worker | null;
  done: Promise<void>;
  /** Holds its image's lock (shared if read-only, exclusive if writable). */
  locked: boolean;
}

export class Disks {
  readonly #disks: Disk[];
  #stopped = false;

  private constructor(disks: Disk[]) {
    this.#disks = disks;
  }

  get count(): number {
    return this.#disks.length;
  }

  get shapes(): DiskShape[] {
    return this.#disks.map((disk) => ({ ...disk.shape }));
  }

  /** The register files, for the vCPU threads' buses (slot i at VIRTIO_MMIO_BASE + i * 0x1000). */
  get mmioShared(): SharedArrayBuffer[] {
    return this.#disks.map((disk) => disk.mmio.shared);
  }

  /**
   * Opens the images, locks them (unless `lock` is false: a machine that waits for an incoming
   * migration locks them once the source has let go, see lock()), wires the eventfds into the VM
   * and starts one parked thread per disk. Nothing is left open on failure.
   */
  static async open(configs: Required<DiskConfig>[], options: {
    vm: Vm; memory: GuestMemory; dirty: DirtyBitmap; irqchip: boolean; log: (message: string) => void; lock?: boolean;
  }): Promise<Disks> {
    const disks: Disk[] = [];
    const set = new Disks(disks);
    try {
      for (const [index, config] of configs.entries()) {
        disks.push(openDisk(index, config, options));
      }
      if (options.lock !== false) set.lock();
      await Promise.all(disks.map((disk, index) => startThread(disk, index, options)));
      return set;
    } catch (error) {
      await set.close();
      throw error;
    }
  }

  /**
   * Takes each image's lock, as QEMU does: shared for a read-only disk, exclusive for a writable
   * one, so that two machines (in two processes, or two in one) never write one image at once.
   * Throws, holding none of them, if another machine holds one.
   */
  lock(): void {
    const taken: Disk[] = [];
    for (const [index, disk] of this.#disks.entries()) {
      if (disk.locked) continue;
      if (!lockFile(disk.fd, disk.shape.readOnly ? 'shared' : 'exclusive')) {
        for (const held of taken) releaseLock(held);
        const what = disk.shape.readOnly ? 'is open for writing by another machine' : 'is in use by another machine';
        throw new NodeKvmError('EBUSY', `disk ${index}: ${disk.shape.path} ${what} (it holds a lock on the image)`);
      }
      disk.locked = true;
      taken.push(disk);
    }
  }

  /** lock(), tried again for up to `waitMs` while another machine holds an image. */
  async lockWithin(waitMs: number): Promise<void> {
    const deadline = performance.now() + waitMs;
    for (;;) {
      try {
        this.lock();
        return;
      } catch (error) {
        if ((error as NodeJS.ErrnoException).code !== 'EBUSY' || performance.now() >= deadline) throw error;
      }
      // A lock frees without an event to wait on: look again shortly.
      await new Promise((resolve) => setTimeout(resolve, 10));
    }
  }

  /**
   * Lets go of the images' locks while keeping them open: a migration's source does so once its
   * disks are paused and flushed, so that a destination on the same host can take them over.
   */
  unlock(): void {
    for (const disk of this.#disks) releaseLock(disk);
  }

  /** Lets the threads serve their queues (the machine runs). */
  resume(): void {
    for (const disk of this.#disks) setState(disk, RunState.Running);
  }

  /** Stops the threads between two requests and waits until each has flushed and parked. */
  async pause(): Promise<void> {
    for (const disk of this.#disks) setState(disk, RunState.Paused);
    await Promise.all(this.#disks.map(async (disk) => {
      while (disk.worker && Atomics.load(disk.control, DEVICE_PARKED) === 0) {
        const result = Atomics.waitAsync(disk.control, DEVICE_PARKED, 0, 100);
        if (result.async) await result.value;
      }
    }));
  }

  saveState(): VirtioMmioState[] {
    return this.#disks.map((disk) => disk.mmio.saveState());
  }

  restoreState(states: VirtioMmioState[]): void {
    if (!Array.isArray(states) || states.length !== this.#disks.length) {
      throw argValueError(`the saved state has ${Array.isArray(states) ? states.length : 'no'} virtio devices, this machine ${this.#disks.length}`);
    }
    states.forEach((state, index) => this.#disks[index]!.mmio.restoreState(state));
  }

  /** Ends the threads and closes the files and eventfds. */
  async close(): Promise<void> {
    if (this.#stopped) return;
    this.#stopped = true;
    for (const disk of this.#disks) setState(disk, RunState.Stopping);
    await Promise.all(this.#disks.map((disk) => disk.done));
    for (const disk of this.#disks) {
      disk.notify.close();
      disk.irq?.close();
      closeSync(disk.fd);
    }
  }
}

function openDisk(index: number, config: Required<DiskConfig>, options: { vm: Vm; memory: GuestMemory; irqchip: boolean; log: (message: string) => void }): Disk {
  let fd: number;
  try {
    fd = openSync(config.path, config.readOnly ? 'r' : 'r+');
  } catch (error) {
    const e = error as NodeJS.ErrnoException;
    throw systemError(`disk ${index}: cannot open ${config.path}${config.readOnly ? '' : ' for writing'}: ${e.code ?? e.message}`, error);
  }
  const opened: { close(): void }[] = [{ close: () => closeSync(fd) }];
  try {
    const sectors = diskSectors(fd);
    if (sectors === 0) throw argValueError(`disk ${index}: ${config.path} is smaller than one 512-byte sector`);
    const notify = EventFd.create({ nonBlocking: false });
    opened.push(notify);
    const irq = options.irqchip ? EventFd.create() : null;
    if (irq) {
      opened.push(irq);
      options.vm.registerIrqfd(irq, VIRTIO_FIRST_GSI + index);
    }
    const base = VIRTIO_MMIO_BASE + index * VIRTIO_MMIO_SIZE;
    try {
      // A notify for queue 0 (the only one) then wakes the device thread from inside KVM, with no
      // exit to us; other values still exit, to be ignored and logged.
      options.vm.registerIoeventfd({ addr: base + Reg.QueueNotify, len: 4, datamatch: 0 }, notify);
    } catch (error) {
      options.log(`disk ${index}: no ioeventfd (${(error as Error).message}); queue notifies exit to the vCPU thread`);
    }
    const shared = VirtioMmio.createShared(blkModel(sectors, config.readOnly), options.memory.size, notify.fd, irq?.fd ?? null);
    const control = new Int32Array(new SharedArrayBuffer(DEVICE_CONTROL_BYTES));
    return {
      shape: { path: config.path, readOnly: config.readOnly, sectors, id: config.id },
      fd, notify, irq, mmio: new VirtioMmio(shared, `virtio-blk${index}`, options.log), control, worker: null, done: Promise.resolve(), locked: false,
    };
  } catch (error) {
    for (const thing of opened.reverse()) thing.close();
    throw error;
  }
}

function startThread(disk: Disk, index: number, options: { memory: GuestMemory; dirty: DirtyBitmap; log: (message: string) => void }): Promise<void> {
  const data: VirtioWorkerData = {
    name: `virtio-blk${index}`, mmio: disk.mmio.shared, control: disk.control.buffer as SharedArrayBuffer, notifyFd: disk.notify.fd,
    memory: options.memory.handle, dirtyBitmap: options.dirty.shared, memoryPages: options.dirty.pageCount,
    disk: { fd: disk.fd, path: disk.shape.path, sectors: disk.shape.sectors, readOnly: disk.shape.readOnly, id: diskIdBytes(disk.shape) },
  };
  const worker = new Worker(workerFile, { name: `virtio-blk${index}`, workerData: data });
  disk.worker = worker;
  disk.done = new Promise<void>((resolve) => {
    worker.on('message', (message: VirtioWorkerMessage) => {
      if (message.type === 'log') options.log(message.message);
      else if (message.error) options.log(`virtio-blk${index}: the device thread failed: ${message.error}`);
    });
    worker.once('exit', () => {
      disk.worker = null;
      Atomics.store(disk.control, DEVICE_PARKED, 1);
      Atomics.notify(disk.control, DEVICE_PARKED);
      resolve();
    });
    worker.once('error', (error) => options.log(`virtio-blk${index}: ${error.message}`));
  });
  // Ready once parked (it starts paused): the machine may then save or restore its registers.
  return new Promise<void>((resolve, reject) => {
    const check = () => {
      if (Atomics.load(disk.control, DEVICE_PARKED) === 1) {
        if (disk.worker) resolve();
        else reject(new NodeKvmError(ErrorCode.WorkerInitFailed, `virtio-blk${index}: the device thread ended before it started`));
        return;
      }
      const result = Atomics.waitAsync(disk.control, DEVICE_PARKED, 0, 1000);
      if (result.async) result.value.then(check);
      else check();
    };
    check();
  });
}

function releaseLock(disk: Disk): void {
  if (!disk.locked) return;
  unlockFile(disk.fd);
  disk.locked = false;
}

function setState(disk: Disk, state: number): void {
  Atomics.store(disk.control, DEVICE_STATE, state);
  Atomics.notify(disk.control, DEVICE_STATE);
  // Wakes a thread asleep on the notify eventfd, to look at the new state.
  if (disk.worker) disk.notify.write(1n);
}
