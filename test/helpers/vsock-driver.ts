// A virtio-vsock guest driver in TypeScript over a fake guest RAM: sets the device up register by
// register as a vCPU thread would, posts RX and EVENT buffers, sends packets on TX (well-formed or
// not) and reads back what the device put in the guest's buffers. The device runs on this
// thread's event loop, as on its own thread.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Reg, Status, VirtioMmio } from '../../lib/devices/virtio-mmio.js';
import { VirtioVsockDevice, vsockModel } from '../../lib/devices/virtio-vsock.js';
import { VSOCK_HEADER_BYTES, VSOCK_HOST_CID, VsockHeader, VsockOp } from '../../lib/devices/virtio-vsock-packet.js';
import { EventFd } from '../../lib/kvm/eventfd.js';
import { DirtyBitmap } from '../../lib/vmm/dirty-bitmap.js';

export const RAM_BYTES = 8 * 1024 * 1024;
export const QUEUE_SIZE = 64;
export const GUEST_CID = 3;
export const RX_BUFFER_BYTES = 4096;
const RINGS = 0x10000; // queue q: desc at RINGS + q * 0x4000, avail + 0x1000, used + 0x2000
const RX_BUFFERS = 0x100000;
const TX_BUFFERS = 0x200000;
const TX_SLOT_BYTES = 0x11000;
const EVENT_BUFFERS = 0x180000;
const F_NEXT = 1, F_WRITE = 2;

export interface Packet {
  header: VsockHeader;
  payload: Buffer;
}

interface Ring {
  desc: number;
  avail: number;
  used: number;
  availIdx: number;
  usedSeen: number;
}

export class FakeVsockGuest {
  readonly ram = new Uint8Array(RAM_BYTES);
  readonly view = new DataView(this.ram.buffer);
  readonly dirty = DirtyBitmap.create(RAM_BYTES / 4096);
  readonly notify = EventFd.create();
  readonly logs: string[] = [];
  readonly mmio: VirtioMmio;
  readonly device: VirtioVsockDevice;
  readonly dir: string;
  readonly uds: string;
  readonly rings: Ring[] = [0, 1, 2].map((q) => ({ desc: RINGS + q * 0x4000, avail: RINGS + q * 0x4000 + 0x1000, used: RINGS + q * 0x4000 + 0x2000, availIdx: 0, usedSeen: 0 }));
  /** RX packets read so far and not yet taken by a test. */
  readonly inbox: Packet[] = [];
  readonly events: number[] = [];
  #txSlot = 0;
  /** The credit this guest advertises on every packet. */
  bufAlloc = 64 * 1024;
  fwdCnt = 0;

  constructor(options: { cid?: number } = {}) {
    this.dir = mkdtempSync(join(tmpdir(), 'node-kvm-vsock-'));
    this.uds = join(this.dir, 'v.sock');
    const log = (message: string) => this.logs.push(message);
    const shared = VirtioMmio.createShared(vsockModel(options.cid ?? GUEST_CID), RAM_BYTES, this.notify.fd, null);
    this.mmio = new VirtioMmio(shared, 'virtio-vsock', log);
    this.device = new VirtioVsockDevice(
      { mmio: new VirtioMmio(shared, 'virtio-vsock', log), ram: this.ram, dirty: this.dirty, log, watch: () => ({ close() {} }) },
      { cid: options.cid ?? GUEST_CID, uds: this.uds },
    );
  }

  close(): void {
    this.device.close();
    this.notify.close();
    rmSync(this.dir, { recursive: true, force: true });
  }

  read32(offset: number): number {
    const data = new Uint8Array(4);
    this.mmio.read(offset, data);
    return new DataView(data.buffer).getUint32(0, true);
  }

  write32(offset: number, value: number): void {
    const data = new Uint8Array(4);
    new DataView(data.buffer).setUint32(0, value >>> 0, true);
    this.mmio.write(offset, data);
  }

  get status(): number {
    return this.read32(Reg.Status);
  }

  /** Reset, VERSION_1 only, three queues, DRIVER_OK; then `rxBuffers` RX buffers and one EVENT buffer. */
  init(rxBuffers = 32): void {
    this.write32(Reg.Status, 0);
    this.write32(Reg.Status, Status.Acknowledge | Status.Driver);
    this.write32(Reg.DriverFeaturesSel, 0);
    this.write32(Reg.DriverFeatures, 0);
    this.write32(Reg.DriverFeaturesSel, 1);
    this.write32(Reg.DriverFeatures, 1);
    this.write32(Reg.Status, Status.Acknowledge | Status.Driver | Status.FeaturesOk);
    for (const [q, ring] of this.rings.entries()) {
      this.ram.fill(0, ring.desc, ring.desc + 0x3000);
      ring.availIdx = 0;
      ring.usedSeen = 0;
      this.write32(Reg.QueueSel, q);
      this.write32(Reg.QueueNum, QUEUE_SIZE);
      this.write32(Reg.QueueDescLow, ring.desc);
      this.write32(Reg.QueueDescHigh, 0);
      this.write32(Reg.QueueDriverLow, ring.avail);
      this.write32(Reg.QueueDriverHigh, 0);
      this.write32(Reg.QueueDeviceLow, ring.used);
      this.write32(Reg.QueueDeviceHigh, 0);
      this.write32(Reg.QueueReady, 1);
    }
    this.#txSlot = 0;
    this.write32(Reg.Status, Status.Acknowledge | Status.Driver | Status.FeaturesOk | Status.DriverOk);
    for (let i = 0; i < rxBuffers; i++) this.postRx(i);
    this.postEvent();
    this.device.notified();
  }

  /** Makes RX buffer `index` (descriptor `index`) available again. */
  postRx(index: number, bytes = RX_BUFFER_BYTES): void {
    this.#setDescriptor(0, index, RX_BUFFERS + index * RX_BUFFER_BYTES, bytes, F_WRITE);
    this.#offer(0, index);
  }

  postEvent(): void {
    this.#setDescriptor(2, 0, EVENT_BUFFERS, 4, F_WRITE);
    this.ram.fill(0xff, EVENT_BUFFERS, EVENT_BUFFERS + 4);
    this.#offer(2, 0);
  }

  /** A header from the guest to the host: our CID and credit, the rest from `fields`. */
  header(fields: Partial<VsockHeader>): VsockHeader {
    return Object.assign(new VsockHeader(), { srcCid: GUEST_CID, dstCid: VSOCK_HOST_CID, type: 1, bufAlloc: this.bufAlloc, fwdCnt: this.fwdCnt }, fields);
  }

  /** Puts a packet on TX as the given descriptors (default: header and payload in one buffer) and notifies. */
  send(fields: Partial<VsockHeader>, payload: Uint8Array = new Uint8Array(0), options: { split?: boolean; notify?: boolean } = {}): void {
    const header = this.header({ len: payload.length, ...fields });
    const slot = this.#txSlot;
    this.#txSlot = (this.#txSlot + 2) % QUEUE_SIZE;
    const at = TX_BUFFERS + (slot / 2) * TX_SLOT_BYTES;
    header.encode(this.ram.subarray(at, at + VSOCK_HEADER_BYTES));
    this.ram.set(payload, at + VSOCK_HEADER_BYTES);
    if (options.split && payload.length > 0) {
      this.#setDescriptor(1, slot, at, VSOCK_HEADER_BYTES, F_NEXT, slot + 1);
      this.#setDescriptor(1, slot + 1, at + VSOCK_HEADER_BYTES, payload.length, 0);
    } else {
      this.#setDescriptor(1, slot, at, VSOCK_HEADER_BYTES + payload.length, 0);
    }
    this.#offer(1, slot);
    if (options.notify ?? true) this.device.notified();
  }

  /** Puts a hand-made TX chain (one buffer of `bytes` at a fresh slot, header fields written there) on TX. */
  sendRaw(bytes: number, fields: Partial<VsockHeader> = {}): void {
    const slot = this.#txSlot;
    this.#txSlot = (this.#txSlot + 2) % QUEUE_SIZE;
    const at = TX_BUFFERS + (slot / 2) * TX_SLOT_BYTES;
    const header = new Uint8Array(VSOCK_HEADER_BYTES);
    this.header(fields).encode(header);
    this.ram.set(header.subarray(0, Math.min(bytes, VSOCK_HEADER_BYTES)), at);
    this.#setDescriptor(1, slot, at, bytes, 0);
    this.#offer(1, slot);
    this.device.notified();
  }

  /** Reads the RX packets the device used into the inbox, reposting their buffers. */
  collect(): Packet[] {
    const ring = this.rings[0]!;
    const idx = this.view.getUint16(ring.used + 2, true);
    while (ring.usedSeen !== idx) {
      const at = ring.used + 4 + 8 * (ring.usedSeen % QUEUE_SIZE);
      const head = this.view.getUint32(at, true);
      const len = this.view.getUint32(at + 4, true);
      ring.usedSeen = (ring.usedSeen + 1) & 0xffff;
      const buffer = RX_BUFFERS + head * RX_BUFFER_BYTES;
      if (len >= VSOCK_HEADER_BYTES) {
        const header = new VsockHeader().decode(this.ram.subarray(buffer, buffer + VSOCK_HEADER_BYTES));
        this.inbox.push({ header, payload: Buffer.from(this.ram.subarray(buffer + VSOCK_HEADER_BYTES, buffer + len)) });
      }
      this.postRx(head);
    }
    const eventRing = this.rings[2]!;
    const eventIdx = this.view.getUint16(eventRing.used + 2, true);
    while (eventRing.usedSeen !== eventIdx) {
      eventRing.usedSeen = (eventRing.usedSeen + 1) & 0xffff;
      this.events.push(this.view.getUint32(EVENT_BUFFERS, true));
    }
    return this.inbox;
  }

  /** Waits for the next RX packet (polling the used ring each turn of the event loop). */
  async next(what = 'a packet', ms = 5000): Promise<Packet> {
    await until(() => this.collect().length > 0, `${what} from the device`, ms);
    return this.inbox.shift()!;
  }

  /** Waits for an RX packet with `op`, skipping (and returning) the ones before. */
  async nextOp(op: number, ms = 5000): Promise<Packet> {
    for (;;) {
      const packet = await this.next(`op ${op}`, ms);
      if (packet.header.op === op) return packet;
    }
  }

  /** Reposts nothing: RX buffers used stay with the guest (a guest that stops reading). */
  usedRxCount(): number {
    return (this.view.getUint16(this.rings[0]!.used + 2, true) - this.rings[0]!.usedSeen) & 0xffff;
  }

  #setDescriptor(q: number, index: number, addr: number, len: number, flags: number, next = 0): void {
    const at = this.rings[q]!.desc + 16 * index;
    this.view.setBigUint64(at, BigInt(addr), true);
    this.view.setUint32(at + 8, len, true);
    this.view.setUint16(at + 12, flags, true);
    this.view.setUint16(at + 14, next, true);
  }

  #offer(q: number, head: number): void {
    const ring = this.rings[q]!;
    this.view.setUint16(ring.avail + 4 + 2 * (ring.availIdx % QUEUE_SIZE), head, true);
    ring.availIdx = (ring.availIdx + 1) & 0xffff;
    this.view.setUint16(ring.avail + 2, ring.availIdx, true);
  }
}

/** Waits, a turn of the event loop at a time, until `condition()` holds; fails after `ms`. */
export async function until(condition: () => boolean, what: string, ms = 5000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setImmediate(resolve));
  }
}

export { VsockOp };
