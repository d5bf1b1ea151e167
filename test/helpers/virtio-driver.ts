// A virtio-mmio driver in TypeScript, over a fake guest RAM, for testing device models without a
// guest: it writes registers through VirtioMmio as a vCPU thread would, lays out a split queue in
// RAM, and lets the test build any chain, well-formed or not. FakeVirtioDriver drives queue 0 of
// any device model; FakeDriver is the block device's.
import { closeSync, mkdtempSync, openSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { blkModel, diskIdBytes, VirtioBlkDevice } from '../../lib/devices/virtio-blk.js';
import { Reg, Status, VirtioMmio, type VirtioDeviceModel } from '../../lib/devices/virtio-mmio.js';
import { EventFd } from '../../lib/kvm/eventfd.js';
import { DirtyBitmap } from '../../lib/vmm/dirty-bitmap.js';

export const RAM_BYTES = 4 * 1024 * 1024;
export const QUEUE_SIZE = 16;
export const DESC = 0x10000;
export const AVAIL = 0x11000;
export const USED = 0x12000;
/** Request headers and status bytes live here, data buffers from DATA up. */
export const HEADERS = 0x20000;
export const DATA = 0x100000;
export const F_NEXT = 1, F_WRITE = 2, F_INDIRECT = 4;
export const FEATURE_INDIRECT = 28n, FEATURE_EVENT_IDX = 29n, FEATURE_VERSION_1 = 32n;

export interface Descriptor {
  addr: number | bigint;
  len: number;
  flags: number;
  next?: number;
}

export class FakeVirtioDriver {
  readonly ram = new Uint8Array(RAM_BYTES);
  readonly view = new DataView(this.ram.buffer);
  readonly dirty = DirtyBitmap.create(RAM_BYTES / 4096);
  readonly notify = EventFd.create();
  readonly logs: string[] = [];
  readonly log = (message: string) => this.logs.push(message);
  /** The driver's side of the registers; `shared` builds the device's own VirtioMmio. */
  readonly mmio: VirtioMmio;
  readonly shared: SharedArrayBuffer;
  #availIdx = 0;
  #usedSeen = 0;

  constructor(model: VirtioDeviceModel, name: string) {
    this.shared = VirtioMmio.createShared(model, RAM_BYTES, this.notify.fd, null);
    this.mmio = new VirtioMmio(this.shared, name, this.log);
  }

  close(): void {
    this.notify.close();
  }

  read32(offset: number): number {
    const data = new Uint8Array(4);
    this.mmio.read(offset, data);
    return new DataView(data.buffer).getUint32(0, true);
  }

  readBytes(offset: number, size: number): Uint8Array {
    const data = new Uint8Array(size);
    this.mmio.read(offset, data);
    return data;
  }

  write32(offset: number, value: number): void {
    const data = new Uint8Array(4);
    new DataView(data.buffer).setUint32(0, value >>> 0, true);
    this.mmio.write(offset, data);
  }

  get status(): number {
    return this.read32(Reg.Status);
  }

  deviceFeatures(): bigint {
    this.write32(Reg.DeviceFeaturesSel, 0);
    const lo = this.read32(Reg.DeviceFeatures);
    this.write32(Reg.DeviceFeaturesSel, 1);
    return BigInt(lo) | (BigInt(this.read32(Reg.DeviceFeatures)) << 32n);
  }

  /** Reset, negotiate `features` (default: everything offered), and set up queue 0 of `size`. */
  init(options: { features?: bigint; size?: number; desc?: number } = {}): boolean {
    this.write32(Reg.Status, 0);
    this.write32(Reg.Status, Status.Acknowledge | Status.Driver);
    const features = options.features ?? this.deviceFeatures();
    this.write32(Reg.DriverFeaturesSel, 0);
    this.write32(Reg.DriverFeatures, Number(features & 0xffffffffn));
    this.write32(Reg.DriverFeaturesSel, 1);
    this.write32(Reg.DriverFeatures, Number(features >> 32n));
    this.write32(Reg.Status, Status.Acknowledge | Status.Driver | Status.FeaturesOk);
    if (!(this.status & Status.FeaturesOk)) return false;
    this.write32(Reg.QueueSel, 0);
    this.write32(Reg.QueueNum, options.size ?? QUEUE_SIZE);
    const desc = options.desc ?? DESC;
    this.write32(Reg.QueueDescLow, desc % 2 ** 32);
    this.write32(Reg.QueueDescHigh, Math.floor(desc / 2 ** 32));
    this.write32(Reg.QueueDriverLow, AVAIL);
    this.write32(Reg.QueueDriverHigh, 0);
    this.write32(Reg.QueueDeviceLow, USED);
    this.write32(Reg.QueueDeviceHigh, 0);
    this.write32(Reg.QueueReady, 1);
    this.ram.fill(0, AVAIL, USED + 0x1000);
    this.#availIdx = 0;
    this.#usedSeen = 0;
    this.write32(Reg.Status, Status.Acknowledge | Status.Driver | Status.FeaturesOk | Status.DriverOk);
    return this.read32(Reg.QueueReady) === 1;
  }

  setDescriptor(table: number, index: number, d: Descriptor): void {
    const at = table + 16 * index;
    this.view.setBigUint64(at, BigInt(d.addr), true);
    this.view.setUint32(at + 8, d.len >>> 0, true);
    this.view.setUint16(at + 12, d.flags, true);
    this.view.setUint16(at + 14, d.next ?? 0, true);
  }

  /** Lays out `descriptors` as one chain from descriptor `first` (next links filled in) and makes it available. */
  submit(descriptors: Descriptor[], first = 0): void {
    descriptors.forEach((d, i) => {
      const last = i === descriptors.length - 1;
      this.setDescriptor(DESC, first + i, { ...d, flags: last ? d.flags : d.flags | F_NEXT, next: d.next ?? (last ? 0 : first + i + 1) });
    });
    this.offer(first);
  }

  /** Puts `head` in the available ring and publishes it. */
  offer(head: number): void {
    this.view.setUint16(AVAIL + 4 + 2 * (this.#availIdx % QUEUE_SIZE), head, true);
    this.#availIdx = (this.#availIdx + 1) & 0xffff;
    this.view.setUint16(AVAIL + 2, this.#availIdx, true);
  }

  setAvailIdx(value: number): void {
    this.#availIdx = value & 0xffff;
    this.view.setUint16(AVAIL + 2, this.#availIdx, true);
  }

  /** Used entries since the last call: [head, written]. */
  takeUsed(): [number, number][] {
    const idx = this.view.getUint16(USED + 2, true);
    const out: [number, number][] = [];
    while (this.#usedSeen !== idx) {
      const at = USED + 4 + 8 * (this.#usedSeen % QUEUE_SIZE);
      out.push([this.view.getUint32(at, true), this.view.getUint32(at + 4, true)]);
      this.#usedSeen = (this.#usedSeen + 1) & 0xffff;
    }
    return out;
  }

}

export class FakeDriver extends FakeVirtioDriver {
  readonly device: VirtioBlkDevice;
  readonly fd: number;
  readonly path: string;

  constructor(options: { sectors?: number; readOnly?: boolean; id?: string; image?: Uint8Array } = {}) {
    const sectors = Math.floor((options.image?.length ?? (options.sectors ?? 64) * 512) / 512);
    super(blkModel(sectors, !!options.readOnly), 'virtio-blk0');
    const dir = mkdtempSync(join(tmpdir(), 'node-kvm-blk-'));
    this.path = join(dir, 'disk.img');
    writeFileSync(this.path, options.image ?? new Uint8Array((options.sectors ?? 64) * 512));
    this.fd = openSync(this.path, options.readOnly ? 'r' : 'r+');
    this.device = new VirtioBlkDevice({
      mmio: new VirtioMmio(this.shared, 'virtio-blk0', this.log), ram: this.ram, dirty: this.dirty, log: this.log,
      disk: { fd: this.fd, path: this.path, sectors, readOnly: !!options.readOnly, id: diskIdBytes({ path: this.path, id: options.id }) },
    });
  }

  override close(): void {
    closeSync(this.fd);
    super.close();
  }

  /** Runs the device as its thread would after a notify. */
  serve(): number {
    return this.device.serve(() => true);
  }

  /** Writes a request header at HEADERS + 32 * slot; returns its address. */
  header(slot: number, type: number, sector: number | bigint): number {
    const at = HEADERS + 32 * slot;
    this.view.setUint32(at, type, true);
    this.view.setUint32(at + 4, 0, true);
    this.view.setBigUint64(at + 8, BigInt(sector), true);
    return at;
  }

  /** A status byte's address for request slot `slot`, preset to 0xff (so a write shows). */
  statusByte(slot: number): number {
    const at = HEADERS + 32 * slot + 16;
    this.ram[at] = 0xff;
    return at;
  }
}
