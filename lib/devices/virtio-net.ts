// virtio-net (virtio 1.x 5.1) over a TAP device: one receive queue and one transmit queue, the
// MAC and the link status in config space, no offloads. Frames move on the device's own thread
// (lib/vmm/virtio-worker.ts) with readv/writev straight between the TAP and the guest's buffers.
// The TAP's IFF_VNET_HDR header (12 bytes, TUNSETVNETHDRSZ) has the layout of virtio_net_hdr_v1,
// so a received frame lands in the guest's buffer header and all. While the guest has posted no
// receive buffer the device stops watching the TAP: frames wait in the TAP's queue (its
// txqueuelen; beyond it the kernel drops, as a full NIC does) until the guest posts more.
import { readvSync, writevSync } from 'node:fs';
import { argTypeError, argValueError } from '../kvm/errors.js';
import type { VirtioDeviceContext, VirtioQueueDevice } from './virtio-device.js';
import {
  Interrupt, Q_LAST_AVAIL, VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC, type VirtioDeviceModel, type VirtioMmio,
} from './virtio-mmio.js';
import { DescriptorChain, SplitQueue, VirtqueueError } from './virtqueue.js';

export const VIRTIO_ID_NET = 1;
export const NET_QUEUE_SIZE = 256;
export const NetFeature = { Mac: 5n, Status: 16n } as const;
/** virtio_net_config.status: the link is up. */
export const NET_S_LINK_UP = 1;
/** struct virtio_net_hdr_v1: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers. */
export const NET_HDR_BYTES = 12;
export const RECEIVE_QUEUE = 0;
export const TRANSMIT_QUEUE = 1;
const ETHERNET_HEADER_BYTES = 14;
/** The largest frame either way: an IPv4/IPv6 packet of 64 KiB and its Ethernet header. */
const MAX_FRAME_BYTES = 65535 + ETHERNET_HEADER_BYTES;
/** Buffers of one chain handed to readv/writev; a chain of more is refused (Linux builds 1 or 2). */
const MAX_SEGMENTS = 64;
/** Frames received per readable event: the thread's loop gets a turn (the guest's notifies) in between. */
const RECEIVE_BUDGET = 64;

/** A MAC address as text: six hex bytes separated by ':' (or '-'). */
export function parseMac(text: string): Uint8Array {
  if (typeof text !== 'string') throw argTypeError('a MAC address must be a string');
  const parts = text.split(/[:-]/);
  if (parts.length !== 6 || parts.some((part) => !/^[0-9a-fA-F]{2}$/.test(part))) {
    throw argValueError(`a MAC address is six hex bytes such as 52:54:00:12:34:56, got ${JSON.stringify(text)}`);
  }
  const mac = Uint8Array.from(parts, (part) => parseInt(part, 16));
  if (mac[0]! & 1) throw argValueError(`${text} is a multicast address; a NIC needs a unicast one`);
  return mac;
}

export function formatMac(mac: Uint8Array): string {
  return [...mac].map((byte) => byte.toString(16).padStart(2, '0')).join(':');
}

/** The MAC of the `index`th NIC when the configuration names none (QEMU's: 52:54:00:12:34:56, ...). */
export function defaultMac(index: number): string {
  return formatMac(Uint8Array.of(0x52, 0x54, 0x00, 0x12, 0x34, (0x56 + index) & 0xff));
}

/** The features and config space (struct virtio_net_config: mac, status) of a NIC. */
export function netModel(options: { mac: string }): VirtioDeviceModel {
  const config = new Uint8Array(8);
  config.set(parseMac(options.mac), 0);
  new DataView(config.buffer).setUint16(6, NET_S_LINK_UP, true);
  const features = (1n << NetFeature.Mac) | (1n << NetFeature.Status) | (1n << VIRTIO_F_RING_INDIRECT_DESC) | (1n << VIRTIO_F_RING_EVENT_IDX);
  return { deviceId: VIRTIO_ID_NET, features, numQueues: 2, queueNumMax: NET_QUEUE_SIZE, config };
}

/** How frames reach the host: the TAP by default; a test gives its own. */
export interface FrameIo {
  /** Reads one frame (header first) into `views`; its full length, or -1 when none waits. */
  read(views: Uint8Array[]): number;
  /** Writes one frame (header first); throws what the host refused it with. */
  write(views: Uint8Array[]): void;
}

/** A TAP fd opened with IFF_VNET_HDR (12 bytes) and O_NONBLOCK (lib/kvm/tap.ts). */
export function tapFrameIo(fd: number): FrameIo {
  return {
    read(views) {
      try {
        return readvSync(fd, views);
      } catch (error) {
        if ((error as NodeJS.ErrnoException).code === 'EAGAIN') return -1;
        throw error;
      }
    },
    write(views) {
      writevSync(fd, views);
    },
  };
}

/** What the device thread needs of a NIC (structured-cloneable). */
export interface NetDeviceConfig {
  /** The TAP's fd (opened by the machine, which closes it). */
  fd: number;
  /** The TAP's name, for messages. */
  tap: string;
}

/**
 * A virtio-net device's queue side. Transmit: each chain's header is checked (no offload was
 * negotiated, so none may be asked for) and the frame written to the TAP with one writev. Receive:
 * when the TAP is readable and the guest has posted buffers, one frame per chain is read straight
 * into them.
 */
export class VirtioNetDevice implements VirtioQueueDevice {
  readonly #context: VirtioDeviceContext;
  readonly #mmio: VirtioMmio;
  readonly #ram: Uint8Array;
  readonly #io: FrameIo;
  readonly #fd: number;
  readonly #tap: string;
  readonly #rx: SplitQueue;
  readonly #tx: SplitQueue;
  readonly #rxChain = new DescriptorChain();
  readonly #txChain = new DescriptorChain();
  /** The header of the frame being sent: a copy, so the guest cannot change it under the check. */
  readonly #txHeader = new Uint8Array(NET_HDR_BYTES);
  /** One byte past the guest's buffers: a frame that reaches it did not fit. */
  readonly #overflow = new Uint8Array(1);
  readonly #logged = new Set<string>();
  #watch: { close(): void } | null = null;
  #parked = false;

  constructor(context: VirtioDeviceContext, config: NetDeviceConfig, io?: FrameIo) {
    this.#context = context;
    this.#mmio = context.mmio;
    this.#ram = context.ram;
    this.#fd = config.fd;
    this.#tap = config.tap;
    this.#io = io ?? tapFrameIo(config.fd);
    this.#rx = new SplitQueue(context.ram, context.mmio, RECEIVE_QUEUE, context.dirty);
    this.#tx = new SplitQueue(context.ram, context.mmio, TRANSMIT_QUEUE, context.dirty);
  }

  /** Whether the device waits for the TAP to become readable (the guest has buffers posted). */
  get watching(): boolean {
    return this.#watch !== null;
  }

  notified(): void {
    if (this.#parked) return;
    if (!this.#mmio.live) {
      this.#stopWatching();
      return;
    }
    this.#transmit();
    if (this.#watch === null && this.#receiveBuffersPosted()) {
      this.#watch = this.#context.watch(this.#fd, () => this.#receive());
    }
  }

  parking(): void {
    this.#parked = true;
    this.#stopWatching();
  }

  resumed(): void {
    // Frames that arrived meanwhile wait in the TAP; the notified() that follows watches it again.
    this.#parked = false;
  }

  close(): void {
    this.#stopWatching();
  }

  #problem(message: string): void {
    if (this.#logged.has(message) || this.#logged.size >= 32) return;
    this.#logged.add(message);
    this.#context.log(`${this.#mmio.name}: ${message}`);
  }

  #stopWatching(): void {
    this.#watch?.close();
    this.#watch = null;
  }

  #receiveBuffersPosted(): boolean {
    try {
      return this.#rx.load() && this.#rx.pending() > 0;
    } catch {
      return true; // #receive() reports what is wrong
    }
  }

  #transmit(): void {
    const mmio = this.#mmio;
    const generation = mmio.resetGeneration;
    const queue = this.#tx;
    const chain = this.#txChain;
    let used = 0;
    try {
      if (!queue.load()) return;
      for (;;) {
        if (queue.pending() === 0) {
          if (queue.armNotification()) continue;
          break;
        }
        queue.pop(chain);
        if (chain.writableBytes > 0) throw new VirtqueueError(`queue ${TRANSMIT_QUEUE}: a transmit chain with a device-writable buffer`);
        this.#send(chain);
        if (mmio.resetGeneration !== generation) return;
        queue.pushUsed(chain.head, 0);
        used++;
      }
    } catch (e) {
      this.#failed(e, generation);
      return;
    }
    if (used > 0 && queue.needsInterrupt()) mmio.interrupt(Interrupt.UsedBuffer);
  }

  /** Writes one chain's frame to the TAP, or drops it (and says why, once). */
  #send(chain: DescriptorChain): void {
    const frameBytes = chain.readableBytes - NET_HDR_BYTES;
    if (frameBytes < ETHERNET_HEADER_BYTES || frameBytes > MAX_FRAME_BYTES) {
      this.#problem(`dropped a transmitted frame of ${frameBytes} bytes (${ETHERNET_HEADER_BYTES}..${MAX_FRAME_BYTES} after the ${NET_HDR_BYTES}-byte header)`);
      return;
    }
    const header = this.#txHeader;
    const views: Uint8Array[] = [header];
    let skip = NET_HDR_BYTES;
    let filled = 0;
    for (let i = 0; i < chain.length; i++) {
      const addr = chain.addr[i]!;
      const len = chain.len[i]!;
      if (filled < NET_HDR_BYTES) {
        const n = Math.min(len, NET_HDR_BYTES - filled);
        header.set(this.#ram.subarray(addr, addr + n), filled);
        filled += n;
      }
      if (skip >= len) {
        skip -= len;
        continue;
      }
      if (views.length > MAX_SEGMENTS) {
        this.#problem(`dropped a transmitted frame in more than ${MAX_SEGMENTS} buffers`);
        return;
      }
      views.push(this.#ram.subarray(addr + skip, addr + len));
      skip = 0;
    }
    // flags and gso_type: checksum and segmentation offloads were not negotiated.
    if (header[0] !== 0 || header[1] !== 0) {
      this.#problem(`dropped a transmitted frame asking for an offload that was not negotiated (flags ${header[0]}, gso_type ${header[1]})`);
      return;
    }
    header.fill(0, 2);
    try {
      this.#io.write(views);
    } catch (error) {
      // EIO: the TAP is down in its namespace; the frame is lost as on a cable that is unplugged.
      this.#problem(`the TAP ${this.#tap} refused a frame: ${(error as NodeJS.ErrnoException).code ?? (error as Error).message}`);
    }
  }

  #receive(): void {
    const mmio = this.#mmio;
    if (this.#parked || !mmio.live) {
      this.#stopWatching();
      return;
    }
    const generation = mmio.resetGeneration;
    const queue = this.#rx;
    const chain = this.#rxChain;
    const views: Uint8Array[] = [];
    let used = 0;
    try {
      if (!queue.load()) {
        this.#stopWatching();
        return;
      }
      for (let frames = 0; frames < RECEIVE_BUDGET;) {
        if (queue.pending() === 0) {
          if (queue.armNotification()) continue;
          // The guest notifies when it posts more; until then the TAP keeps what arrives.
          this.#stopWatching();
          break;
        }
        queue.pop(chain);
        if (chain.readableBytes > 0) throw new VirtqueueError(`queue ${RECEIVE_QUEUE}: a receive chain with a device-readable buffer`);
        if (chain.writableBytes < NET_HDR_BYTES) throw new VirtqueueError(`queue ${RECEIVE_QUEUE}: a receive chain of ${chain.writableBytes} bytes, too short for the ${NET_HDR_BYTES}-byte header`);
        views.length = 0;
        let room = 0;
        for (let i = 0; i < chain.length && views.length < MAX_SEGMENTS; i++) {
          if (chain.len[i] === 0) continue;
          views.push(this.#ram.subarray(chain.addr[i]!, chain.addr[i]! + chain.len[i]!));
          room += chain.len[i]!;
        }
        views.push(this.#overflow);
        let n: number;
        try {
          n = this.#io.read(views);
        } catch (error) {
          this.#unpop();
          this.#problem(`reading the TAP ${this.#tap} failed: ${(error as NodeJS.ErrnoException).code ?? (error as Error).message}`);
          this.#stopWatching();
          break;
        }
        if (n < 0) {
          this.#unpop(); // nothing waits: the chain serves the next frame
          break;
        }
        if (mmio.resetGeneration !== generation) return;
        frames++;
        this.#markWritten(views, Math.min(n, room));
        if (n > room) {
          this.#problem(`dropped a received frame of more than ${room - NET_HDR_BYTES} bytes: the guest's receive buffers are smaller (post ${NET_HDR_BYTES + 1514} bytes or more)`);
          this.#unpop();
          continue;
        }
        this.#setNumBuffers(chain);
        queue.pushUsed(chain.head, n);
        used++;
      }
    } catch (e) {
      this.#failed(e, generation);
      return;
    }
    if (used > 0 && queue.needsInterrupt()) mmio.interrupt(Interrupt.UsedBuffer);
  }

  /** Gives the chain just popped back to the available ring: the next pop takes it again. */
  #unpop(): void {
    const mmio = this.#mmio;
    mmio.setQueueWord(RECEIVE_QUEUE, Q_LAST_AVAIL, (mmio.queueWord(RECEIVE_QUEUE, Q_LAST_AVAIL) - 1) & 0xffff);
    this.#rx.load();
  }

  #markWritten(views: Uint8Array[], bytes: number): void {
    const base = this.#ram.byteOffset;
    for (const view of views) {
      if (bytes <= 0 || view === this.#overflow) break;
      const n = Math.min(view.length, bytes);
      this.#context.dirty.mark(view.byteOffset - base, n);
      bytes -= n;
    }
  }

  /** num_buffers (bytes 10-11 of the header) is 1: the TAP leaves it as the guest had it. */
  #setNumBuffers(chain: DescriptorChain): void {
    this.#setHeaderByte(chain, 10, 1);
    this.#setHeaderByte(chain, 11, 0);
  }

  #setHeaderByte(chain: DescriptorChain, offset: number, value: number): void {
    for (let i = 0; i < chain.length; i++) {
      const len = chain.len[i]!;
      if (offset < len) {
        this.#ram[chain.addr[i]! + offset] = value;
        this.#context.dirty.mark(chain.addr[i]! + offset, 1);
        return;
      }
      offset -= len;
    }
  }

  #failed(e: unknown, generation: number): void {
    if (this.#mmio.resetGeneration !== generation) return;
    this.#stopWatching();
    this.#mmio.needsReset(e instanceof VirtqueueError ? e.message : `device error: ${(e as Error).message}`);
  }
}
