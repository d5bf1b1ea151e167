// A machine's virtio-mmio devices: disks first, then the rest, one slot each (slot i at
// VIRTIO_MMIO_BASE + i * 0x1000, GSI VIRTIO_FIRST_GSI + i). Each has its register file, its
// eventfds (an ioeventfd per queue for the guest's notify, an irqfd for its interrupt) and its own
// thread (virtio-worker.ts). The main thread only starts, pauses, resumes and stops the threads,
// and saves and restores the register state while they are parked.
import { statSync } from 'node:fs';
import { dirname, resolve as resolvePath } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Worker } from 'node:worker_threads';
import { rngModel } from '../devices/virtio-rng.js';
import { checkVsockConfig, vsockModel, type VsockConfig } from '../devices/virtio-vsock.js';
import { Reg, VIRTIO_FIRST_GSI, VIRTIO_MAX_DEVICES, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE, VirtioMmio, type VirtioMmioState } from '../devices/virtio-mmio.js';
import { EventFd, type GuestMemory, type Vm } from '../kvm/index.js';
import { removeStaleSocket } from '../kvm/unix-socket.js';
import { ErrorCode, argTypeError, argValueError, NodeKvmError, outOfRangeError, systemError } from '../kvm/errors.js';
import type { DirtyBitmap } from './dirty-bitmap.js';
import { lockDisks, openDisk, releaseLock, type CheckedDiskConfig, type DiskShape, type OpenDisk } from './disks.js';
import { netMismatch, openNet, type CheckedNetConfig, type NetShape } from './nets.js';
import { workerEntry } from './worker-entry.js';
import { RunState } from './control.js';
import {
  DEVICE_CONTROL_BYTES, DEVICE_PARKED, DEVICE_RESTORES, DEVICE_STATE, type OpenedDevice, type VirtioWorkerData, type VirtioWorkerMessage,
} from './virtio-control.js';

const here = fileURLToPath(import.meta.url);
// Built, a one-file bundle of it starts faster where there is one (scripts/bundle.mjs).
const workerFile = workerEntry(here, 'virtio-worker');

/** Every virtio device a machine has, checked (checkVirtioConfig). */
export interface VirtioConfig {
  disks: CheckedDiskConfig[];
  rng: boolean;
  net: CheckedNetConfig[];
  vsock: VsockConfig | null;
}

/** The devices of a machine's shape, in slot order after the disks: a saved state fits only the same. */
export interface VirtioShape {
  rng?: boolean;
  /** Network cards, after the disks. */
  net?: NetShape[];
  /** A vsock device and the guest's CID (its host socket is each host's own: MachineRuntimeConfig.vsock). */
  vsock?: { cid: number };
}

interface Slot extends OpenedDevice {
  readonly notify: EventFd;
  readonly irq: EventFd | null;
  readonly mmio: VirtioMmio;
  readonly control: Int32Array;
  worker: Worker | null;
  done: Promise<void>;
}

/** Checks the virtio part of a machine's configuration; returns it with defaults filled in. */
export function checkVirtioConfig(disks: CheckedDiskConfig[], rng: unknown, net: CheckedNetConfig[] = [], vsock?: unknown): VirtioConfig {
  if (rng !== undefined && typeof rng !== 'boolean') throw argTypeError('rng must be a boolean');
  if (vsock !== undefined && vsock !== null) checkVsockConfig(vsock);
  const config = { disks, rng: rng ?? false, net, vsock: vsock ? { cid: vsock.cid, uds: vsock.uds } : null };
  const count = virtioSlotCount(config);
  if (count > VIRTIO_MAX_DEVICES) throw outOfRangeError(`at most ${VIRTIO_MAX_DEVICES} virtio devices (disks and others), got ${count}`);
  return config;
}

/** The shape of a machine's devices other than disks. */
export function virtioShape(config: VirtioConfig): VirtioShape {
  return {
    ...(config.net.length > 0 ? { net: config.net.map((card) => ({ mac: card.mac })) } : {}),
    ...(config.vsock ? { vsock: { cid: config.vsock.cid } } : {}),
    ...(config.rng ? { rng: true } : {}),
  };
}

/**
 * The vsock device of a machine built for a saved state: the saved machine's CID, with this
 * host's socket (`given`, whose cid, if any, must be the saved one).
 */
export function vsockConfigFor(saved: VirtioShape['vsock'], given: unknown): VsockConfig | null {
  if (saved === undefined) {
    if (given !== undefined && given !== null) throw argValueError('the saved machine had no vsock device, but vsock was given');
    return null;
  }
  if (given === undefined || given === null) throw argValueError(`the saved machine had a vsock device (CID ${saved.cid}): give vsock: { uds } for its host socket here`);
  const { uds, cid } = given as { uds?: unknown; cid?: unknown };
  if (cid !== undefined && cid !== saved.cid) throw argValueError(`vsock.cid ${String(cid)} given, but the saved guest has CID ${saved.cid}`);
  const config = { cid: saved.cid, uds };
  checkVsockConfig(config);
  return config;
}

/** Why a saved machine's devices (other than disks) do not fit a machine's, or null. */
export function virtioMismatch(saved: VirtioShape, mine: VirtioShape): string | null {
  if (!!saved.rng !== !!mine.rng) return `it ${saved.rng ? 'had' : 'had no'} virtio-rng, this machine ${mine.rng ? 'has' : 'has none'}`;
  if (saved.vsock?.cid !== mine.vsock?.cid) {
    const describe = (shape: VirtioShape) => (shape.vsock ? `a vsock device with CID ${shape.vsock.cid}` : 'no vsock device');
    return `it had ${describe(saved)}, this machine has ${describe(mine)}`;
  }
  return netMismatch(saved.net, mine.net);
}

/** How many slots a configuration takes: the Linux command line names each. */
export function virtioSlotCount(config: VirtioConfig): number {
  return config.disks.length + config.net.length + (config.vsock ? 1 : 0) + (config.rng ? 1 : 0);
}

export class VirtioDevices {
  readonly #slots: Slot[];
  readonly #config: VirtioConfig;
  #stopped = false;

  private constructor(slots: Slot[], config: VirtioConfig) {
    this.#slots = slots;
    this.#config = config;
  }

  /** The devices other than disks, as a machine's shape records them. */
  get shape(): VirtioShape {
    return virtioShape(this.#config);
  }

  get count(): number {
    return this.#slots.length;
  }

  get diskShapes(): DiskShape[] {
    return this.#disks().map((disk) => ({ ...disk.shape }));
  }

  /** The register files and names, for the vCPU threads' buses, in slot order. */
  get mmio(): { name: string; registers: SharedArrayBuffer }[] {
    return this.#slots.map((slot) => ({ name: slot.name, registers: slot.mmio.shared }));
  }

  /**
   * Opens every device (a disk's image unlocked if `lock` is false: a machine that waits for an
   * incoming migration locks them once the source has let go, see lock()), wires the eventfds
   * into the VM and starts one parked thread per device. Nothing is left open on failure.
   */
  static async open(config: VirtioConfig, options: {
    vm: Vm; memory: GuestMemory; dirty: DirtyBitmap; irqchip: boolean; log: (message: string) => void; lock?: boolean;
  }): Promise<VirtioDevices> {
    const slots: Slot[] = [];
    const set = new VirtioDevices(slots, config);
    try {
      // A socket left by a machine that died is replaced; a live one or another file is refused here.
      if (config.vsock) {
        const uds = resolvePath(config.vsock.uds);
        try {
          statSync(dirname(uds));
        } catch (error) {
          throw systemError(`vsock.uds: no directory for ${config.vsock.uds}`, error);
        }
        await removeStaleSocket(uds);
      }
      const opens: (() => OpenedDevice)[] = [
        ...config.disks.map((disk, index) => () => openDisk(index, disk)),
        ...config.net.map((card, index) => () => openNet(index, card)),
        ...(config.vsock ? [openVsock(config.vsock)] : []),
        ...(config.rng ? [(): OpenedDevice => ({ name: 'virtio-rng', model: rngModel(), data: { kind: 'rng' }, close: () => {} })] : []),
      ];
      for (const open of opens) slots.push(openSlot(slots.length, open, options));
      if (options.lock !== false) set.lock();
      await Promise.all(slots.map((slot) => startThread(slot, options)));
      return set;
    } catch (error) {
      await set.close();
      throw error;
    }
  }

  /**
   * Takes each disk image's lock (shared if read-only, exclusive if writable); throws, holding
   * none, if another machine holds one.
   */
  lock(): void {
    lockDisks(this.#disks());
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
    for (const disk of this.#disks()) releaseLock(disk);
  }

  /**
   * The fds a migration on this host hands to the destination process (SCM_RIGHTS), in slot
   * order: each disk's image (the same open file, and so the same lock) and each card's TAP.
   */
  handoverFds(): { disks: number[]; net: number[] } {
    return {
      disks: this.#disks().map((disk) => disk.fd),
      net: this.#slots.flatMap((slot) => (slot.data.kind === 'net' ? [slot.data.fd] : [])),
    };
  }

  /** Lets the threads serve their queues (the machine runs). */
  resume(): void {
    for (const slot of this.#slots) setState(slot, RunState.Running);
  }

  /** Stops the threads between two requests and waits until each has (flushed and) parked. */
  async pause(): Promise<void> {
    for (const slot of this.#slots) setState(slot, RunState.Paused);
    await Promise.all(this.#slots.map(async (slot) => {
      while (slot.worker && Atomics.load(slot.control, DEVICE_PARKED) === 0) {
        const result = Atomics.waitAsync(slot.control, DEVICE_PARKED, 0, 100);
        if (result.async) await result.value;
      }
    }));
  }

  saveState(): VirtioMmioState[] {
    return this.#slots.map((slot) => slot.mmio.saveState());
  }

  restoreState(states: VirtioMmioState[]): void {
    if (!Array.isArray(states) || states.length !== this.#slots.length) {
      throw argValueError(`the saved state has ${Array.isArray(states) ? states.length : 'no'} virtio devices, this machine ${this.#slots.length}`);
    }
    states.forEach((state, index) => {
      const slot = this.#slots[index]!;
      slot.mmio.restoreState(state);
      Atomics.add(slot.control, DEVICE_RESTORES, 1);
    });
  }

  /** Ends the threads and closes the files and eventfds. */
  async close(): Promise<void> {
    if (this.#stopped) return;
    this.#stopped = true;
    for (const slot of this.#slots) setState(slot, RunState.Stopping);
    await Promise.all(this.#slots.map((slot) => slot.done));
    for (const slot of this.#slots) {
      slot.notify.close();
      slot.irq?.close();
      slot.close();
    }
  }

  #disks(): OpenDisk[] {
    return this.#slots.flatMap((slot) => (slot.disk ? [slot.disk] : []));
  }
}

function openVsock(vsock: VsockConfig): () => OpenedDevice {
  return () => ({ name: 'virtio-vsock', model: vsockModel(vsock.cid), data: { kind: 'vsock', vsock }, close: () => {} });
}

function openSlot(index: number, open: () => OpenedDevice, options: { vm: Vm; memory: GuestMemory; irqchip: boolean; log: (message: string) => void }): Slot {
  const device = open();
  const opened: { close(): void }[] = [device];
  try {
    // A disk's thread sleeps in read(2) on it; the others watch it from their event loop.
    const notify = EventFd.create({ nonBlocking: device.data.kind !== 'blk' });
    opened.push(notify);
    const irq = options.irqchip ? EventFd.create() : null;
    if (irq) {
      opened.push(irq);
      options.vm.registerIrqfd(irq, VIRTIO_FIRST_GSI + index);
    }
    const base = VIRTIO_MMIO_BASE + index * VIRTIO_MMIO_SIZE;
    try {
      // A notify for any of its queues then wakes the device thread from inside KVM, with no
      // exit to us; other values still exit, to be ignored and logged.
      for (let queue = 0; queue < device.model.numQueues; queue++) {
        options.vm.registerIoeventfd({ addr: base + Reg.QueueNotify, len: 4, datamatch: queue }, notify);
      }
    } catch (error) {
      options.log(`${device.name}: no ioeventfd (${(error as Error).message}); queue notifies exit to the vCPU thread`);
    }
    const shared = VirtioMmio.createShared(device.model, options.memory.size, notify.fd, irq?.fd ?? null);
    const control = new Int32Array(new SharedArrayBuffer(DEVICE_CONTROL_BYTES));
    return { ...device, notify, irq, mmio: new VirtioMmio(shared, device.name, options.log), control, worker: null, done: Promise.resolve() };
  } catch (error) {
    for (const thing of opened.reverse()) thing.close();
    throw error;
  }
}

function startThread(slot: Slot, options: { memory: GuestMemory; dirty: DirtyBitmap; log: (message: string) => void }): Promise<void> {
  const data: VirtioWorkerData = {
    name: slot.name, mmio: slot.mmio.shared, control: slot.control.buffer as SharedArrayBuffer, notifyFd: slot.notify.fd,
    memory: options.memory.handle, dirtyBitmap: options.dirty.shared, memoryPages: options.dirty.pageCount, device: slot.data,
  };
  const worker = new Worker(workerFile, { name: slot.name, workerData: data });
  slot.worker = worker;
  slot.done = new Promise<void>((resolve) => {
    worker.on('message', (message: VirtioWorkerMessage) => {
      if (message.type === 'log') options.log(message.message);
      else if (message.error) options.log(`${slot.name}: the device thread failed: ${message.error}`);
    });
    worker.once('exit', () => {
      slot.worker = null;
      Atomics.store(slot.control, DEVICE_PARKED, 1);
      Atomics.notify(slot.control, DEVICE_PARKED);
      resolve();
    });
    worker.once('error', (error) => options.log(`${slot.name}: ${error.message}`));
  });
  // Ready once parked (it starts paused): the machine may then save or restore its registers.
  return new Promise<void>((resolve, reject) => {
    const check = () => {
      if (Atomics.load(slot.control, DEVICE_PARKED) === 1) {
        if (slot.worker) resolve();
        else reject(new NodeKvmError(ErrorCode.WorkerInitFailed, `${slot.name}: the device thread ended before it started`));
        return;
      }
      const result = Atomics.waitAsync(slot.control, DEVICE_PARKED, 0, 1000);
      if (result.async) result.value.then(check);
      else check();
    };
    check();
  });
}

function setState(slot: Slot, state: number): void {
  Atomics.store(slot.control, DEVICE_STATE, state);
  Atomics.notify(slot.control, DEVICE_STATE);
  // Wakes a thread asleep on (or watching) the notify eventfd, to look at the new state.
  if (slot.worker) slot.notify.write(1n);
}

