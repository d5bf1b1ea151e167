// The virtio-mmio transport (virtio 1.x, register layout version 2). Its registers live in shared
// memory: any vCPU thread handles the guest's MMIO accesses, and the device's own thread (which
// serves the queues, see lib/vmm/virtio-worker.ts) reads the queue configuration from the same
// words. A notify never reaches this code when an ioeventfd catches it in the kernel; without one,
// the vCPU thread signals the same eventfd itself.
import { writeSync } from 'node:fs';
import { argTypeError, argValueError, outOfRangeError } from '../kvm/errors.js';
import type { MmioDevice } from './bus-device.js';

export const VIRTIO_MMIO_MAGIC = 0x74726976; // "virt"
export const VIRTIO_MMIO_VERSION = 2;
/** The size of one virtio-mmio device's register window. */
export const VIRTIO_MMIO_SIZE = 0x1000;
/** Where the machine puts its virtio-mmio devices: slot i at BASE + i * SIZE, above the largest RAM. */
export const VIRTIO_MMIO_BASE = 0xd000_0000;
/** The GSI of slot i is FIRST_GSI + i (4 is COM1's). */
export const VIRTIO_FIRST_GSI = 5;
/** virtio-mmio slots a machine has at most. */
export const VIRTIO_MAX_DEVICES = 8;

// Register offsets.
export const Reg = {
  MagicValue: 0x000, Version: 0x004, DeviceId: 0x008, VendorId: 0x00c,
  DeviceFeatures: 0x010, DeviceFeaturesSel: 0x014, DriverFeatures: 0x020, DriverFeaturesSel: 0x024,
  QueueSel: 0x030, QueueNumMax: 0x034, QueueNum: 0x038, QueueReady: 0x044, QueueNotify: 0x050,
  InterruptStatus: 0x060, InterruptAck: 0x064, Status: 0x070,
  QueueDescLow: 0x080, QueueDescHigh: 0x084, QueueDriverLow: 0x090, QueueDriverHigh: 0x094,
  QueueDeviceLow: 0x0a0, QueueDeviceHigh: 0x0a4, ConfigGeneration: 0x0fc, Config: 0x100,
} as const;

/** Device status bits (virtio 1.x 2.1). */
export const Status = { Acknowledge: 1, Driver: 2, DriverOk: 4, FeaturesOk: 8, NeedsReset: 0x40, Failed: 0x80 } as const;
/** InterruptStatus bits. */
export const Interrupt = { UsedBuffer: 1, ConfigChange: 2 } as const;
export const VIRTIO_F_VERSION_1 = 32n;
export const VIRTIO_F_RING_INDIRECT_DESC = 28n;
export const VIRTIO_F_RING_EVENT_IDX = 29n;
/** "NODE" as a little-endian word: the vendor id we report. */
const VENDOR_ID = 0x45444f4e;
const CONFIG_BYTES = 256;

// Shared words (Int32 indices).
const W_STATUS = 0;
const W_DEVICE_FEATURES_SEL = 1;
const W_DRIVER_FEATURES_SEL = 2;
const W_DRIVER_FEATURES_LO = 3;
const W_DRIVER_FEATURES_HI = 4;
const W_QUEUE_SEL = 5;
const W_INTERRUPT_STATUS = 6;
const W_CONFIG_GENERATION = 7;
/** Bumped by every device reset: the device thread drops work begun before it. */
const W_RESET_GENERATION = 8;
const W_MEMORY_PAGES = 9;
const W_NOTIFY_FD = 10;
const W_IRQ_FD = 11;
const W_DEVICE_FEATURES_LO = 12;
const W_DEVICE_FEATURES_HI = 13;
const W_DEVICE_ID = 14;
const W_NUM_QUEUES = 15;
const W_QUEUE_NUM_MAX = 16;
const QUEUES_AT = 32;
const QUEUE_WORDS = 16;
export const MAX_QUEUES = 4;
// Per queue.
export const Q_NUM = 0;
export const Q_READY = 1;
export const Q_DESC = 2; // lo, hi
export const Q_DRIVER = 4; // lo, hi
export const Q_DEVICE = 6; // lo, hi
/** Device-side ring positions, kept here so that a save can read them while the device is parked. */
export const Q_LAST_AVAIL = 8;
export const Q_NEXT_USED = 9;
const WORDS = QUEUES_AT + MAX_QUEUES * QUEUE_WORDS;
const CONFIG_AT = WORDS * 4;

export interface VirtioDeviceModel {
  /** 2 = block. */
  deviceId: number;
  /** Every feature bit the device offers (VERSION_1 is added). */
  features: bigint;
  numQueues: number;
  queueNumMax: number;
  /** The device's config space (at most 256 bytes), read-only for the driver. */
  config: Uint8Array;
}

/** One virtqueue's registers (size, ready, ring addresses) and the device's place in it, for snapshots and migrations. */
export interface VirtioQueueState {
  num: number;
  ready: boolean;
  desc: number;
  driver: number;
  device: number;
  lastAvail: number;
  nextUsed: number;
}

/** What a snapshot or migration carries of a virtio-mmio device. */
export interface VirtioMmioState {
  status: number;
  deviceFeaturesSel: number;
  driverFeaturesSel: number;
  driverFeatures: [number, number];
  queueSel: number;
  interruptStatus: number;
  configGeneration: number;
  queues: VirtioQueueState[];
}

/** A failure of the driver's making: the device must be reset. `message` says what, for the log. */
export type NeedsResetReporter = (message: string) => void;

/**
 * The register file of one virtio-mmio device over shared memory. Built in every thread that
 * touches the device; `shared` is what crosses threads.
 */
export class VirtioMmio implements MmioDevice {
  readonly name: string;
  readonly #words: Int32Array;
  readonly #config: Uint8Array;
  readonly #eventWord = Buffer.alloc(8);
  readonly #log: (message: string) => void;
  readonly #logged = new Set<string>();

  constructor(readonly shared: SharedArrayBuffer, name: string, log: (message: string) => void) {
    if (!(shared instanceof SharedArrayBuffer) || shared.byteLength !== CONFIG_AT + CONFIG_BYTES) {
      throw argTypeError('shared must be the SharedArrayBuffer of VirtioMmio.createShared()');
    }
    this.name = name;
    this.#words = new Int32Array(shared, 0, WORDS);
    this.#config = new Uint8Array(shared, CONFIG_AT, CONFIG_BYTES);
    this.#eventWord.writeBigUInt64LE(1n);
    this.#log = log;
  }

  /**
   * Shared state for a device: `notifyFd` is the eventfd the device thread waits on (an
   * ioeventfd on QueueNotify signals it in the kernel); `irqFd`, if any, an irqfd's eventfd.
   */
  static createShared(model: VirtioDeviceModel, memoryBytes: number, notifyFd: number, irqFd: number | null): SharedArrayBuffer {
    if (model.numQueues < 1 || model.numQueues > MAX_QUEUES) throw outOfRangeError(`a virtio device has 1..${MAX_QUEUES} queues here`);
    if (model.config.length > CONFIG_BYTES) throw argValueError(`config space is at most ${CONFIG_BYTES} bytes`);
    const shared = new SharedArrayBuffer(CONFIG_AT + CONFIG_BYTES);
    const words = new Int32Array(shared, 0, WORDS);
    const features = model.features | (1n << VIRTIO_F_VERSION_1);
    words[W_DEVICE_FEATURES_LO] = Number(features & 0xffffffffn) | 0;
    words[W_DEVICE_FEATURES_HI] = Number(features >> 32n) | 0;
    words[W_DEVICE_ID] = model.deviceId;
    words[W_NUM_QUEUES] = model.numQueues;
    words[W_QUEUE_NUM_MAX] = model.queueNumMax;
    words[W_MEMORY_PAGES] = memoryBytes / 4096;
    words[W_NOTIFY_FD] = notifyFd;
    words[W_IRQ_FD] = irqFd ?? -1;
    new Uint8Array(shared, CONFIG_AT, CONFIG_BYTES).set(model.config);
    return shared;
  }

  get status(): number {
    return Atomics.load(this.#words, W_STATUS);
  }
  get memoryBytes(): number {
    return (this.#words[W_MEMORY_PAGES]! >>> 0) * 4096;
  }
  get resetGeneration(): number {
    return Atomics.load(this.#words, W_RESET_GENERATION);
  }
  get numQueues(): number {
    return this.#words[W_NUM_QUEUES]!;
  }
  get driverFeatures(): bigint {
    return BigInt(Atomics.load(this.#words, W_DRIVER_FEATURES_LO) >>> 0) | (BigInt(Atomics.load(this.#words, W_DRIVER_FEATURES_HI) >>> 0) << 32n);
  }
  get deviceFeatures(): bigint {
    return BigInt(this.#words[W_DEVICE_FEATURES_LO]! >>> 0) | (BigInt(this.#words[W_DEVICE_FEATURES_HI]! >>> 0) << 32n);
  }
  /** Whether the driver has set DRIVER_OK and the device does not need a reset: queues may run. */
  get live(): boolean {
    return (this.status & (Status.DriverOk | Status.NeedsReset | Status.Failed)) === Status.DriverOk;
  }

  /** A queue's register word (Q_*), for the device thread. */
  queueWord(queue: number, word: number): number {
    return Atomics.load(this.#words, QUEUES_AT + queue * QUEUE_WORDS + word);
  }
  setQueueWord(queue: number, word: number, value: number): void {
    Atomics.store(this.#words, QUEUES_AT + queue * QUEUE_WORDS + word, value);
  }
  queueAddress(queue: number, word: number): number {
    return (this.queueWord(queue, word) >>> 0) + (this.queueWord(queue, word + 1) >>> 0) * 0x1_0000_0000;
  }

  /** Raises `bits` of InterruptStatus and signals the interrupt line (through the irqfd, if any). */
  interrupt(bits: number): void {
    Atomics.or(this.#words, W_INTERRUPT_STATUS, bits);
    const irqFd = this.#words[W_IRQ_FD]!;
    if (irqFd >= 0) writeSync(irqFd, this.#eventWord, 0, 8);
  }

  /** The driver broke the protocol: the device stops until reset (virtio 1.x 2.1.2), and says so once. */
  needsReset(message: string): void {
    Atomics.or(this.#words, W_STATUS, Status.NeedsReset);
    this.interrupt(Interrupt.ConfigChange);
    this.#logOnce(message);
  }

  #logOnce(message: string): void {
    if (this.#logged.has(message) || this.#logged.size >= 32) return;
    this.#logged.add(message);
    this.#log(`${this.name}: ${message}`);
  }

  read(offset: number, data: Uint8Array): void {
    if (offset >= Reg.Config) {
      const at = offset - Reg.Config;
      for (let i = 0; i < data.length; i++) data[i] = at + i < CONFIG_BYTES ? this.#config[at + i]! : 0;
      return;
    }
    const value = data.length === 4 && (offset & 3) === 0 ? this.#readRegister(offset) : 0;
    for (let i = 0; i < data.length; i++) data[i] = (value >>> (8 * i)) & 0xff;
  }

  write(offset: number, data: Uint8Array): void {
    // Registers take aligned 32-bit writes; config space is read-only for a block device.
    if (offset >= Reg.Config || data.length !== 4 || (offset & 3) !== 0) {
      this.#logOnce(`ignored a ${data.length}-byte write at offset 0x${offset.toString(16)}`);
      return;
    }
    this.#writeRegister(offset, (data[0]! | (data[1]! << 8) | (data[2]! << 16) | (data[3]! << 24)) >>> 0);
  }

  #readRegister(offset: number): number {
    const w = this.#words;
    const queue = Atomics.load(w, W_QUEUE_SEL) >>> 0;
    const queueValid = queue < w[W_NUM_QUEUES]!;
    switch (offset) {
      case Reg.MagicValue: return VIRTIO_MMIO_MAGIC;
      case Reg.Version: return VIRTIO_MMIO_VERSION;
      case Reg.DeviceId: return w[W_DEVICE_ID]!;
      case Reg.VendorId: return VENDOR_ID;
      case Reg.DeviceFeatures: {
        const sel = Atomics.load(w, W_DEVICE_FEATURES_SEL);
        return sel === 0 ? w[W_DEVICE_FEATURES_LO]! : sel === 1 ? w[W_DEVICE_FEATURES_HI]! : 0;
      }
      case Reg.QueueNumMax: return queueValid ? w[W_QUEUE_NUM_MAX]! : 0;
      case Reg.QueueNum: return queueValid ? this.queueWord(queue, Q_NUM) : 0;
      case Reg.QueueReady: return queueValid ? this.queueWord(queue, Q_READY) : 0;
      case Reg.InterruptStatus: return Atomics.load(w, W_INTERRUPT_STATUS);
      case Reg.Status: return Atomics.load(w, W_STATUS);
      case Reg.QueueDescLow: case Reg.QueueDescHigh:
        return queueValid ? this.queueWord(queue, Q_DESC + ((offset - Reg.QueueDescLow) >> 2)) : 0;
      case Reg.QueueDriverLow: case Reg.QueueDriverHigh:
        return queueValid ? this.queueWord(queue, Q_DRIVER + ((offset - Reg.QueueDriverLow) >> 2)) : 0;
      case Reg.QueueDeviceLow: case Reg.QueueDeviceHigh:
        return queueValid ? this.queueWord(queue, Q_DEVICE + ((offset - Reg.QueueDeviceLow) >> 2)) : 0;
      case Reg.ConfigGeneration: return Atomics.load(w, W_CONFIG_GENERATION);
      default: return 0;
    }
  }

  #writeRegister(offset: number, value: number): void {
    const w = this.#words;
    const queue = Atomics.load(w, W_QUEUE_SEL) >>> 0;
    const queueValid = queue < w[W_NUM_QUEUES]!;
    switch (offset) {
      case Reg.DeviceFeaturesSel: Atomics.store(w, W_DEVICE_FEATURES_SEL, value); return;
      case Reg.DriverFeaturesSel: Atomics.store(w, W_DRIVER_FEATURES_SEL, value); return;
      case Reg.DriverFeatures: {
        // Features are fixed once FEATURES_OK is set (virtio 1.x 3.1.1).
        if (Atomics.load(w, W_STATUS) & Status.FeaturesOk) return;
        const sel = Atomics.load(w, W_DRIVER_FEATURES_SEL);
        if (sel === 0) Atomics.store(w, W_DRIVER_FEATURES_LO, value | 0);
        else if (sel === 1) Atomics.store(w, W_DRIVER_FEATURES_HI, value | 0);
        return;
      }
      case Reg.QueueSel: Atomics.store(w, W_QUEUE_SEL, value); return;
      case Reg.QueueNum: if (queueValid && !this.queueWord(queue, Q_READY)) this.setQueueWord(queue, Q_NUM, value | 0); return;
      case Reg.QueueReady: if (queueValid) this.#setQueueReady(queue, value !== 0); return;
      case Reg.QueueNotify: this.#notify(value); return;
      case Reg.InterruptAck: Atomics.and(w, W_INTERRUPT_STATUS, ~value); return;
      case Reg.Status: this.#setStatus(value); return;
      case Reg.QueueDescLow: case Reg.QueueDescHigh:
      case Reg.QueueDriverLow: case Reg.QueueDriverHigh:
      case Reg.QueueDeviceLow: case Reg.QueueDeviceHigh: {
        if (!queueValid || this.queueWord(queue, Q_READY)) return;
        const word = offset < Reg.QueueDriverLow ? Q_DESC : offset < Reg.QueueDeviceLow ? Q_DRIVER : Q_DEVICE;
        this.setQueueWord(queue, word + ((offset >> 2) & 1), value | 0);
        return;
      }
      default:
        this.#logOnce(`ignored a write to register 0x${offset.toString(16)}`);
    }
  }

  #setStatus(value: number): void {
    const w = this.#words;
    if (value === 0) {
      this.#reset();
      return;
    }
    let status = value & 0xff;
    const old = Atomics.load(w, W_STATUS);
    if (status & Status.FeaturesOk && !(old & Status.FeaturesOk)) {
      // Accept the features only if the driver asked for nothing we lack, and for VERSION_1.
      const wanted = this.driverFeatures;
      if ((wanted & ~this.deviceFeatures) !== 0n || !(wanted & (1n << VIRTIO_F_VERSION_1))) status &= ~Status.FeaturesOk;
    }
    // NEEDS_RESET is the device's to set and only a reset clears it.
    Atomics.store(w, W_STATUS, status | (old & Status.NeedsReset));
    if (status & Status.DriverOk && !(old & Status.DriverOk)) this.#wakeDevice();
  }

  #reset(): void {
    const w = this.#words;
    Atomics.add(w, W_RESET_GENERATION, 1);
    for (const word of [W_STATUS, W_DEVICE_FEATURES_SEL, W_DRIVER_FEATURES_SEL, W_DRIVER_FEATURES_LO, W_DRIVER_FEATURES_HI, W_QUEUE_SEL, W_INTERRUPT_STATUS]) {
      Atomics.store(w, word, 0);
    }
    for (let queue = 0; queue < MAX_QUEUES; queue++) {
      for (let word = 0; word < QUEUE_WORDS; word++) this.setQueueWord(queue, word, 0);
    }
  }

  #setQueueReady(queue: number, ready: boolean): void {
    if (!ready) {
      this.setQueueWord(queue, Q_READY, 0);
      return;
    }
    const problem = this.#checkQueue(queue);
    if (problem) {
      this.needsReset(`queue ${queue}: ${problem}`);
      return;
    }
    this.setQueueWord(queue, Q_LAST_AVAIL, 0);
    this.setQueueWord(queue, Q_NEXT_USED, 0);
    this.setQueueWord(queue, Q_READY, 1);
  }

  /** Why the selected queue's size or ring addresses cannot work, or null. */
  #checkQueue(queue: number): string | null {
    const num = this.queueWord(queue, Q_NUM);
    const max = this.#words[W_QUEUE_NUM_MAX]!;
    if (num < 1 || num > max || (num & (num - 1)) !== 0) return `size ${num} is not a power of two up to ${max}`;
    const ram = this.memoryBytes;
    const rings: [string, number, number, number][] = [
      ['descriptor table', this.queueAddress(queue, Q_DESC), 16 * num, 16],
      ['available ring', this.queueAddress(queue, Q_DRIVER), 6 + 2 * num, 2],
      ['used ring', this.queueAddress(queue, Q_DEVICE), 6 + 8 * num, 4],
    ];
    for (const [what, addr, bytes, align] of rings) {
      if (addr % align !== 0) return `${what} at 0x${addr.toString(16)} is not ${align}-byte aligned`;
      if (addr + bytes > ram) return `${what} at 0x${addr.toString(16)} is outside guest RAM`;
    }
    return null;
  }

  #notify(queue: number): void {
    if (queue >= this.#words[W_NUM_QUEUES]! || !this.queueWord(queue, Q_READY)) {
      this.#logOnce(`notify for queue ${queue}, which is not ready: ignored`);
      return;
    }
    this.#wakeDevice();
  }

  /** Signals the device thread (as the ioeventfd would). */
  #wakeDevice(): void {
    writeSync(this.#words[W_NOTIFY_FD]!, this.#eventWord, 0, 8);
  }

  saveState(): VirtioMmioState {
    const w = this.#words;
    const queues: VirtioQueueState[] = [];
    for (let queue = 0; queue < w[W_NUM_QUEUES]!; queue++) {
      queues.push({
        num: this.queueWord(queue, Q_NUM), ready: this.queueWord(queue, Q_READY) !== 0,
        desc: this.queueAddress(queue, Q_DESC), driver: this.queueAddress(queue, Q_DRIVER), device: this.queueAddress(queue, Q_DEVICE),
        lastAvail: this.queueWord(queue, Q_LAST_AVAIL), nextUsed: this.queueWord(queue, Q_NEXT_USED),
      });
    }
    return {
      status: Atomics.load(w, W_STATUS), deviceFeaturesSel: Atomics.load(w, W_DEVICE_FEATURES_SEL) >>> 0,
      driverFeaturesSel: Atomics.load(w, W_DRIVER_FEATURES_SEL) >>> 0,
      driverFeatures: [Atomics.load(w, W_DRIVER_FEATURES_LO) >>> 0, Atomics.load(w, W_DRIVER_FEATURES_HI) >>> 0],
      queueSel: Atomics.load(w, W_QUEUE_SEL) >>> 0, interruptStatus: Atomics.load(w, W_INTERRUPT_STATUS), configGeneration: Atomics.load(w, W_CONFIG_GENERATION),
      queues,
    };
  }

  /** Puts a saved state back; checks it as strictly as the guest's own register writes. */
  restoreState(state: VirtioMmioState): void {
    const w = this.#words;
    if (!Array.isArray(state.queues) || state.queues.length !== w[W_NUM_QUEUES]) {
      throw argValueError(`${this.name}: the saved state has ${Array.isArray(state.queues) ? state.queues.length : 'no'} queues, the device ${w[W_NUM_QUEUES]}`);
    }
    const u32 = (value: unknown, what: string): number => {
      if (!Number.isInteger(value) || (value as number) < 0 || (value as number) > 0xffffffff) throw argValueError(`${this.name}: bad ${what} in the saved state`);
      return value as number;
    };
    const addr = (value: unknown, what: string): number => {
      if (!Number.isSafeInteger(value) || (value as number) < 0) throw argValueError(`${this.name}: bad ${what} in the saved state`);
      return value as number;
    };
    if (!Array.isArray(state.driverFeatures) || state.driverFeatures.length !== 2) throw argValueError(`${this.name}: bad driver features in the saved state`);
    this.#reset();
    state.queues.forEach((queue, index) => {
      this.setQueueWord(index, Q_NUM, u32(queue.num, 'queue size'));
      const set64 = (word: number, value: number) => {
        this.setQueueWord(index, word, value % 0x1_0000_0000 | 0);
        this.setQueueWord(index, word + 1, Math.floor(value / 0x1_0000_0000) | 0);
      };
      set64(Q_DESC, addr(queue.desc, 'descriptor table address'));
      set64(Q_DRIVER, addr(queue.driver, 'available ring address'));
      set64(Q_DEVICE, addr(queue.device, 'used ring address'));
      if (queue.ready) {
        const problem = this.#checkQueue(index);
        if (problem) throw argValueError(`${this.name}: saved queue ${index}: ${problem}`);
      }
      this.setQueueWord(index, Q_LAST_AVAIL, u32(queue.lastAvail, 'available index') & 0xffff);
      this.setQueueWord(index, Q_NEXT_USED, u32(queue.nextUsed, 'used index') & 0xffff);
      this.setQueueWord(index, Q_READY, queue.ready ? 1 : 0);
    });
    Atomics.store(w, W_DEVICE_FEATURES_SEL, u32(state.deviceFeaturesSel, 'feature select') | 0);
    Atomics.store(w, W_DRIVER_FEATURES_SEL, u32(state.driverFeaturesSel, 'feature select') | 0);
    Atomics.store(w, W_DRIVER_FEATURES_LO, u32(state.driverFeatures[0], 'driver features') | 0);
    Atomics.store(w, W_DRIVER_FEATURES_HI, u32(state.driverFeatures[1], 'driver features') | 0);
    Atomics.store(w, W_QUEUE_SEL, u32(state.queueSel, 'queue select') | 0);
    Atomics.store(w, W_INTERRUPT_STATUS, u32(state.interruptStatus, 'interrupt status') & 3);
    Atomics.store(w, W_CONFIG_GENERATION, u32(state.configGeneration, 'config generation') | 0);
    Atomics.store(w, W_STATUS, u32(state.status, 'status') & 0xff);
  }
}
