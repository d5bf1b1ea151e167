// A split virtqueue (virtio 1.x 2.7), device side, over guest RAM. Everything the driver wrote is
// untrusted: every index is checked against the queue size, every buffer against guest RAM, chain
// length is bounded (so a loop ends), and a broken ring is reported as a VirtqueueError for the
// device to stop on (NEEDS_RESET) rather than followed. Every byte written into guest RAM is
// marked in the VMM's dirty bitmap, so migrations carry it.
import type { DirtyPageMarker } from './bus-device.js';
import { Q_DESC, Q_DEVICE, Q_DRIVER, Q_LAST_AVAIL, Q_NEXT_USED, Q_NUM, Q_READY, VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC, type VirtioMmio } from './virtio-mmio.js';

const DESC_F_NEXT = 1;
const DESC_F_WRITE = 2;
const DESC_F_INDIRECT = 4;
const AVAIL_F_NO_INTERRUPT = 1;
const DESC_BYTES = 16;
/** The longest chain followed, indirect tables included; Linux never builds one longer than its queue. */
export const MAX_CHAIN = 1024;

export class VirtqueueError extends Error {}

/** One request's buffers, filled in place by pop() (no allocation per request). */
export class DescriptorChain {
  head = 0;
  length = 0;
  readonly addr = new Float64Array(MAX_CHAIN);
  readonly len = new Uint32Array(MAX_CHAIN);
  readonly writable = new Uint8Array(MAX_CHAIN);
  /** Bytes in the device-readable buffers, then in the device-writable ones. */
  readableBytes = 0;
  writableBytes = 0;
}

/**
 * Copies the chain's device-readable bytes, from `offset` into them, into `into` (as far as they
 * go: the caller checked the chain's readableBytes).
 */
export function readFromChain(ram: Uint8Array, chain: DescriptorChain, offset: number, into: Uint8Array): void {
  let filled = 0;
  for (let i = 0; i < chain.length && filled < into.length; i++) {
    if (chain.writable[i]) break;
    const len = chain.len[i]!;
    if (offset >= len) {
      offset -= len;
      continue;
    }
    const addr = chain.addr[i]! + offset;
    const n = Math.min(len - offset, into.length - filled);
    into.set(ram.subarray(addr, addr + n), filled);
    filled += n;
    offset = 0;
  }
}

/**
 * Writes `data` into the chain's device-writable buffers, from `offset` into them, marking every
 * byte written in `dirty` (as far as they go: the caller checked the chain's writableBytes).
 */
export function writeToChain(ram: Uint8Array, dirty: DirtyPageMarker, chain: DescriptorChain, offset: number, data: Uint8Array): void {
  let done = 0;
  for (let i = 0; i < chain.length && done < data.length; i++) {
    if (!chain.writable[i]) continue;
    const len = chain.len[i]!;
    if (offset >= len) {
      offset -= len;
      continue;
    }
    const addr = chain.addr[i]! + offset;
    const n = Math.min(len - offset, data.length - done);
    ram.set(data.subarray(done, done + n), addr);
    dirty.mark(addr, n);
    done += n;
    offset = 0;
  }
}

export class SplitQueue {
  readonly #view: DataView;
  /** The same RAM in 16-bit words, for the atomic store that publishes the used index. */
  readonly #words16: Uint16Array;
  readonly #ramBytes: number;
  readonly #mmio: VirtioMmio;
  readonly #index: number;
  readonly #dirty: DirtyPageMarker;
  #num = 0;
  #desc = 0;
  #avail = 0;
  #used = 0;
  #eventIdx = false;
  #indirect = false;
  #lastAvail = 0;
  #nextUsed = 0;
  /** The used index at the last interrupt (event idx): -1 before any. */
  #signalledUsed = -1;

  constructor(ram: Uint8Array, mmio: VirtioMmio, index: number, dirty: DirtyPageMarker) {
    this.#view = new DataView(ram.buffer, ram.byteOffset, ram.byteLength);
    this.#words16 = new Uint16Array(ram.buffer, ram.byteOffset, ram.byteLength >> 1);
    this.#ramBytes = ram.byteLength;
    this.#mmio = mmio;
    this.#index = index;
    this.#dirty = dirty;
  }

  /**
   * Reads the queue's configuration from the registers, at the start of every pass (a reset or a
   * restore may have changed it). False if the queue is not ready.
   */
  load(): boolean {
    const mmio = this.#mmio;
    if (!mmio.queueWord(this.#index, Q_READY)) return false;
    this.#num = mmio.queueWord(this.#index, Q_NUM);
    this.#desc = mmio.queueAddress(this.#index, Q_DESC);
    this.#avail = mmio.queueAddress(this.#index, Q_DRIVER);
    this.#used = mmio.queueAddress(this.#index, Q_DEVICE);
    // The transport checked these when the queue was made ready; a second look costs nothing.
    if (this.#num < 1 || (this.#num & (this.#num - 1)) !== 0 || this.#desc + DESC_BYTES * this.#num > this.#ramBytes ||
      this.#avail + 6 + 2 * this.#num > this.#ramBytes || this.#used + 6 + 8 * this.#num > this.#ramBytes) {
      throw new VirtqueueError(`queue ${this.#index} is configured outside guest RAM`);
    }
    const features = mmio.driverFeatures;
    this.#eventIdx = (features & (1n << VIRTIO_F_RING_EVENT_IDX)) !== 0n;
    this.#indirect = (features & (1n << VIRTIO_F_RING_INDIRECT_DESC)) !== 0n;
    this.#lastAvail = mmio.queueWord(this.#index, Q_LAST_AVAIL) & 0xffff;
    const nextUsed = mmio.queueWord(this.#index, Q_NEXT_USED) & 0xffff;
    if (nextUsed !== this.#nextUsed) this.#signalledUsed = -1;
    this.#nextUsed = nextUsed;
    return true;
  }

  /** Requests the driver has made available and we have not taken. */
  pending(): number {
    const availIdx = this.#view.getUint16(this.#avail + 2, true);
    const count = (availIdx - this.#lastAvail) & 0xffff;
    if (count > this.#num) throw new VirtqueueError(`queue ${this.#index}: the available index moved ${count} entries ahead of a ${this.#num}-entry queue`);
    return count;
  }

  /** Takes the next available chain into `chain`. Call only while pending() > 0. */
  pop(chain: DescriptorChain): void {
    const view = this.#view;
    const head = view.getUint16(this.#avail + 4 + 2 * (this.#lastAvail % this.#num), true);
    if (head >= this.#num) throw new VirtqueueError(`queue ${this.#index}: available entry names descriptor ${head} of ${this.#num}`);
    chain.head = head;
    chain.length = 0;
    chain.readableBytes = 0;
    chain.writableBytes = 0;
    let index = head;
    let table = this.#desc;
    let tableSize = this.#num;
    let inIndirect = false;
    for (let followed = 0; ; followed++) {
      // A well-formed chain visits each descriptor of its table at most once.
      if (followed >= tableSize || chain.length >= MAX_CHAIN) throw new VirtqueueError(`queue ${this.#index}: descriptor chain from ${head} loops or is too long`);
      const at = table + DESC_BYTES * index;
      const addr = view.getUint32(at, true) + view.getUint32(at + 4, true) * 0x1_0000_0000;
      const len = view.getUint32(at + 8, true);
      const flags = view.getUint16(at + 12, true);
      const next = view.getUint16(at + 14, true);
      if (flags & DESC_F_INDIRECT) {
        if (!this.#indirect) throw new VirtqueueError(`queue ${this.#index}: an indirect descriptor, but the driver did not accept VIRTIO_F_RING_INDIRECT_DESC`);
        if (inIndirect) throw new VirtqueueError(`queue ${this.#index}: an indirect descriptor inside an indirect table`);
        if (flags & DESC_F_NEXT) throw new VirtqueueError(`queue ${this.#index}: an indirect descriptor with NEXT set`);
        if (len === 0 || len % DESC_BYTES !== 0) throw new VirtqueueError(`queue ${this.#index}: an indirect table of ${len} bytes (not a positive multiple of 16)`);
        if (addr + len > this.#ramBytes) throw new VirtqueueError(`queue ${this.#index}: an indirect table outside guest RAM`);
        table = addr;
        tableSize = len / DESC_BYTES;
        index = 0;
        inIndirect = true;
        followed = -1;
        continue;
      }
      if (addr + len > this.#ramBytes) {
        throw new VirtqueueError(`queue ${this.#index}: a buffer at 0x${addr.toString(16)} of ${len} bytes is outside guest RAM`);
      }
      const writable = (flags & DESC_F_WRITE) !== 0;
      if (!writable && chain.writableBytes > 0) throw new VirtqueueError(`queue ${this.#index}: a device-readable buffer after a device-writable one`);
      const n = chain.length++;
      chain.addr[n] = addr;
      chain.len[n] = len;
      chain.writable[n] = writable ? 1 : 0;
      if (writable) chain.writableBytes += len;
      else chain.readableBytes += len;
      if (!(flags & DESC_F_NEXT)) break;
      if (next >= tableSize) throw new VirtqueueError(`queue ${this.#index}: descriptor ${index} points at ${next}, beyond its ${tableSize}-entry table`);
      index = next;
    }
    this.#lastAvail = (this.#lastAvail + 1) & 0xffff;
    this.#mmio.setQueueWord(this.#index, Q_LAST_AVAIL, this.#lastAvail);
  }

  /** Returns a chain to the driver, `written` bytes filled in its writable buffers. */
  pushUsed(head: number, written: number): void {
    const view = this.#view;
    const slot = this.#used + 4 + 8 * (this.#nextUsed % this.#num);
    view.setUint32(slot, head, true);
    view.setUint32(slot + 4, written, true);
    this.#dirty.mark(slot, 8);
    this.#nextUsed = (this.#nextUsed + 1) & 0xffff;
    // The element before the index that publishes it (x86 keeps stores in order; Atomics orders JS).
    Atomics.store(this.#words16, (this.#used + 2) >> 1, this.#nextUsed);
    this.#dirty.mark(this.#used + 2, 2);
    this.#mmio.setQueueWord(this.#index, Q_NEXT_USED, this.#nextUsed);
  }

  /**
   * Tells the driver (event idx) to notify once it adds past what we have taken; returns whether
   * more arrived meanwhile, so the caller goes round again instead of missing them.
   */
  armNotification(): boolean {
    if (!this.#eventIdx) return false;
    const at = this.#used + 4 + 8 * this.#num;
    if (at + 2 <= this.#ramBytes) {
      this.#view.setUint16(at, this.#lastAvail, true);
      this.#dirty.mark(at, 2);
    }
    return this.pending() > 0;
  }

  /**
   * Asks the driver (event idx) not to notify for what it adds next: the device is polling the
   * ring anyway. armNotification() undoes it.
   */
  suppressNotification(): void {
    if (!this.#eventIdx) return;
    const at = this.#used + 4 + 8 * this.#num;
    if (at + 2 > this.#ramBytes) return;
    this.#view.setUint16(at, (this.#lastAvail - 1) & 0xffff, true);
    this.#dirty.mark(at, 2);
  }

  /** Whether the driver wants an interrupt for what was used since the last one. */
  needsInterrupt(): boolean {
    if (!this.#eventIdx) return (this.#view.getUint16(this.#avail, true) & AVAIL_F_NO_INTERRUPT) === 0;
    const at = this.#avail + 4 + 2 * this.#num;
    if (at + 2 > this.#ramBytes) return true;
    const usedEvent = this.#view.getUint16(at, true);
    const old = this.#signalledUsed;
    const now = this.#nextUsed;
    this.#signalledUsed = now;
    // vring_need_event: the driver's event index lies in (old, now].
    return old < 0 || ((now - usedEvent - 1) & 0xffff) < ((now - old) & 0xffff);
  }
}
