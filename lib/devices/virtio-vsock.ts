// virtio-vsock (virtio 1.2 5.10), the device in user space with Firecracker's hybrid host side
// (virtio-vsock-muxer.ts): packets move between the guest's queues and host unix sockets on the
// device's own thread. Queues: RX (0) takes the guest's empty buffers for what the host sends,
// TX (1) brings the guest's packets, EVENT (2) carries the transport reset after a restore.
// Everything in the rings is the guest's and untrusted: a short header, a length beyond the
// buffers or a broken ring sets NEEDS_RESET; the machine runs on.
import type { DirtyPageMarker } from './bus-device.js';
import type { VirtioDeviceContext, VirtioQueueDevice } from './virtio-device.js';
import { Interrupt, VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC, type VirtioDeviceModel, type VirtioMmio } from './virtio-mmio.js';
import { VsockMuxer } from './virtio-vsock-muxer.js';
import {
  VIRTIO_ID_VSOCK, VSOCK_EVENT_BYTES, VSOCK_EVENT_TRANSPORT_RESET, VSOCK_HEADER_BYTES, VsockHeader, VsockOp,
} from './virtio-vsock-packet.js';
import { DescriptorChain, readFromChain, SplitQueue, VirtqueueError, writeToChain } from './virtqueue.js';
import { argTypeError, argValueError } from '../kvm/errors.js';

export { VIRTIO_ID_VSOCK, VSOCK_HOST_CID } from './virtio-vsock-packet.js';
export const VSOCK_QUEUE_SIZE = 256;
export const VsockQueue = { Rx: 0, Tx: 1, Event: 2 } as const;
/** VIRTIO_VSOCK_F_STREAM (virtio 1.2 5.10.3). */
export const VSOCK_F_STREAM = 0n;
/** The largest payload taken from one TX packet (Linux sends at most 64 KiB). */
export const VSOCK_MAX_PAYLOAD_BYTES = 64 * 1024;

/** The vsock device as the machine's configuration names it. */
export interface VsockConfig {
  /** The guest's context id: 3 to 2^32 - 2 (0-2 and -1 are reserved). */
  cid: number;
  /** The host side's unix socket: host programs connect here; guest connections to port P reach `${uds}_${P}`. */
  uds: string;
}

/** Throws unless `config` is a usable vsock configuration. */
export function checkVsockConfig(config: unknown): asserts config is VsockConfig {
  if (typeof config !== 'object' || config === null) throw argTypeError('vsock must be an object { cid, uds }');
  const { cid, uds } = config as Partial<VsockConfig>;
  if (!Number.isInteger(cid) || (cid as number) < 3 || (cid as number) > 0xfffffffe) {
    throw argValueError(`vsock.cid must be an integer from 3 to ${0xfffffffe} (0-2 are reserved), got ${String(cid)}`);
  }
  if (typeof uds !== 'string' || uds.length === 0) throw argTypeError('vsock.uds must be a socket path');
  // sun_path holds 107 bytes; the per-port listeners add "_<port>" to it.
  if (Buffer.byteLength(uds) > 96) throw argValueError(`vsock.uds is too long for a unix socket path (with "_<port>" added): ${uds}`);
}

/** The config space (guest_cid, u64) and features of a vsock device. */
export function vsockModel(cid: number): VirtioDeviceModel {
  const config = new Uint8Array(8);
  new DataView(config.buffer).setBigUint64(0, BigInt(cid), true);
  const features = (1n << VSOCK_F_STREAM) | (1n << VIRTIO_F_RING_INDIRECT_DESC) | (1n << VIRTIO_F_RING_EVENT_IDX);
  return { deviceId: VIRTIO_ID_VSOCK, features, numQueues: 3, queueNumMax: VSOCK_QUEUE_SIZE, config };
}

export class VirtioVsockDevice implements VirtioQueueDevice {
  readonly #mmio: VirtioMmio;
  readonly #ram: Uint8Array;
  readonly #dirty: DirtyPageMarker;
  readonly #rx: SplitQueue;
  readonly #tx: SplitQueue;
  readonly #event: SplitQueue;
  readonly #chain = new DescriptorChain();
  readonly #headerBytes = new Uint8Array(VSOCK_HEADER_BYTES);
  readonly #header = new VsockHeader();
  readonly #muxer: VsockMuxer;
  readonly #log: (message: string) => void;
  readonly #logged = new Set<string>();
  #generation: number;
  #parked = false;
  #serving = false;
  #again = false;
  #resetEventPending = false;

  constructor(context: VirtioDeviceContext, config: VsockConfig) {
    this.#mmio = context.mmio;
    this.#ram = context.ram;
    this.#dirty = context.dirty;
    this.#log = (message) => context.log(message);
    this.#rx = new SplitQueue(context.ram, context.mmio, VsockQueue.Rx, context.dirty);
    this.#tx = new SplitQueue(context.ram, context.mmio, VsockQueue.Tx, context.dirty);
    this.#event = new SplitQueue(context.ram, context.mmio, VsockQueue.Event, context.dirty);
    this.#generation = context.mmio.resetGeneration;
    this.#muxer = new VsockMuxer({
      guestCid: config.cid,
      uds: config.uds,
      // Not before the guest has had the transport reset: a stale connection of its could take the new one's packets.
      guestReady: () => !this.#parked && this.#mmio.live && this.#mmio.resetGeneration === this.#generation && !this.#resetEventPending,
      wake: () => this.#pass(false),
      problem: (message) => this.#problem(message),
    });
    this.#muxer.listen();
  }

  /** Connections open now (for tests and statistics). */
  get connectionCount(): number {
    return this.#muxer.connectionCount;
  }

  notified(): void {
    this.#pass(true);
  }

  parking(): void {
    this.#parked = true;
    this.#muxer.setParked(true);
  }

  resumed(restored: boolean): void {
    this.#parked = false;
    if (restored) {
      // The connections' other ends stayed with the old host; the guest must drop its side
      // (virtio 1.2 5.10.6.7), as after a Firecracker snapshot restore.
      this.#muxer.reset();
      this.#generation = this.#mmio.resetGeneration;
      this.#resetEventPending = true;
    }
    this.#muxer.setParked(false);
  }

  close(): void {
    this.#parked = true;
    this.#muxer.close();
  }

  #problem(message: string): void {
    if (this.#logged.has(message) || this.#logged.size >= 32) return;
    this.#logged.add(message);
    this.#log(`${this.#mmio.name}: ${message}`);
  }

  /** Serves the queues: TX first (when the guest notified), then whatever waits for RX and EVENT. */
  #pass(takeTx: boolean): void {
    if (this.#serving) {
      this.#again = true;
      return;
    }
    if (this.#parked) return;
    const mmio = this.#mmio;
    if (mmio.resetGeneration !== this.#generation) {
      // The driver reset the device: its connections went with it.
      this.#generation = mmio.resetGeneration;
      this.#muxer.reset();
      this.#resetEventPending = false;
    }
    if (!mmio.live) return;
    const generation = this.#generation;
    this.#serving = true;
    try {
      do {
        this.#again = false;
        if (takeTx) this.#serveTx();
        this.#fillRx();
        if (this.#resetEventPending) this.#sendResetEvent();
        takeTx = this.#again;
      } while (this.#again && mmio.live && mmio.resetGeneration === generation);
    } catch (e) {
      if (mmio.resetGeneration === generation) {
        mmio.needsReset(e instanceof VirtqueueError ? e.message : `device error: ${(e as Error).message}`);
        this.#muxer.reset();
      }
    } finally {
      this.#serving = false;
    }
  }

  #serveTx(): void {
    const queue = this.#tx;
    const chain = this.#chain;
    if (!queue.load()) return;
    let used = 0;
    for (;;) {
      let count = queue.pending();
      if (count === 0) {
        if (queue.armNotification()) continue;
        break;
      }
      for (; count > 0; count--) {
        queue.pop(chain);
        if (chain.readableBytes < VSOCK_HEADER_BYTES) {
          throw new VirtqueueError(`TX: a packet of ${chain.readableBytes} device-readable bytes, shorter than the ${VSOCK_HEADER_BYTES}-byte header`);
        }
        readFromChain(this.#ram, chain, 0, this.#headerBytes);
        const header = this.#header.decode(this.#headerBytes);
        if (header.len > chain.readableBytes - VSOCK_HEADER_BYTES) {
          throw new VirtqueueError(`TX: a packet of len ${header.len} in ${chain.readableBytes - VSOCK_HEADER_BYTES} bytes of buffers after the header`);
        }
        let payload: Uint8Array | null = null;
        if (header.op === VsockOp.Rw && header.len > 0) {
          if (header.len > VSOCK_MAX_PAYLOAD_BYTES) throw new VirtqueueError(`TX: a packet of len ${header.len} (at most ${VSOCK_MAX_PAYLOAD_BYTES})`);
          // A copy: the guest may reuse its buffer once the packet is used, before the socket takes it.
          payload = Buffer.allocUnsafe(header.len);
          readFromChain(this.#ram, chain, VSOCK_HEADER_BYTES, payload);
        }
        queue.pushUsed(chain.head, 0);
        used++;
        this.#muxer.fromGuest(header, payload);
      }
    }
    this.#muxer.flushWrites();
    if (used > 0 && queue.needsInterrupt()) this.#mmio.interrupt(Interrupt.UsedBuffer);
  }

  #fillRx(): void {
    const muxer = this.#muxer;
    if (!muxer.hasOutput) return;
    const queue = this.#rx;
    const chain = this.#chain;
    if (!queue.load()) return;
    let used = 0;
    while (muxer.hasOutput) {
      if (queue.pending() === 0 && !queue.armNotification()) break;
      queue.pop(chain);
      if (chain.writableBytes < VSOCK_HEADER_BYTES || chain.readableBytes > 0) {
        throw new VirtqueueError(`RX: a buffer of ${chain.writableBytes} device-writable bytes (needs at least ${VSOCK_HEADER_BYTES}, and no device-readable ones)`);
      }
      const room = Math.min(chain.writableBytes - VSOCK_HEADER_BYTES, VSOCK_MAX_PAYLOAD_BYTES);
      const payload = muxer.takeOutput(this.#header, room);
      if (payload === undefined) {
        // Nothing after all: the buffer goes back unused (0 bytes), which drivers skip.
        queue.pushUsed(chain.head, 0);
        used++;
        break;
      }
      writeToChain(this.#ram, this.#dirty, chain, 0, this.#header.encode(this.#headerBytes));
      if (payload !== null) writeToChain(this.#ram, this.#dirty, chain, VSOCK_HEADER_BYTES, payload);
      queue.pushUsed(chain.head, VSOCK_HEADER_BYTES + (payload?.length ?? 0));
      used++;
    }
    if (used > 0 && queue.needsInterrupt()) this.#mmio.interrupt(Interrupt.UsedBuffer);
  }

  #sendResetEvent(): void {
    const queue = this.#event;
    if (!queue.load()) return;
    if (queue.pending() === 0 && !queue.armNotification()) return;
    const chain = this.#chain;
    queue.pop(chain);
    if (chain.writableBytes < VSOCK_EVENT_BYTES) throw new VirtqueueError(`EVENT: a buffer of ${chain.writableBytes} device-writable bytes (needs ${VSOCK_EVENT_BYTES})`);
    const event = new Uint8Array(VSOCK_EVENT_BYTES);
    new DataView(event.buffer).setUint32(0, VSOCK_EVENT_TRANSPORT_RESET, true);
    writeToChain(this.#ram, this.#dirty, chain, 0, event);
    queue.pushUsed(chain.head, VSOCK_EVENT_BYTES);
    this.#resetEventPending = false;
    if (queue.needsInterrupt()) this.#mmio.interrupt(Interrupt.UsedBuffer);
  }


}
