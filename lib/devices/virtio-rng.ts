// virtio-rng (virtio 1.x 5.4): one queue of device-writable buffers, each filled with random
// bytes from the host kernel's CSPRNG (/dev/urandom, the pool getrandom(2) reads), read straight
// into guest RAM.
import { closeSync, openSync, readSync } from 'node:fs';
import type { VirtioDeviceContext, VirtioQueueDevice } from './virtio-device.js';
import { Interrupt, VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC, type VirtioDeviceModel } from './virtio-mmio.js';
import { DescriptorChain, SplitQueue, VirtqueueError } from './virtqueue.js';

export const VIRTIO_ID_RNG = 4;
export const RNG_QUEUE_SIZE = 64;
/** The most filled per request: a driver that posts all of its RAM gets this much at a time. */
export const RNG_MAX_BYTES_PER_REQUEST = 64 * 1024;

export function rngModel(): VirtioDeviceModel {
  const features = (1n << VIRTIO_F_RING_INDIRECT_DESC) | (1n << VIRTIO_F_RING_EVENT_IDX);
  return { deviceId: VIRTIO_ID_RNG, features, numQueues: 1, queueNumMax: RNG_QUEUE_SIZE, config: new Uint8Array(0) };
}

export class VirtioRngDevice implements VirtioQueueDevice {
  readonly #context: VirtioDeviceContext;
  readonly #queue: SplitQueue;
  readonly #chain = new DescriptorChain();
  readonly #random: number;
  #parked = false;

  constructor(context: VirtioDeviceContext) {
    this.#context = context;
    this.#queue = new SplitQueue(context.ram, context.mmio, 0, context.dirty);
    this.#random = openSync('/dev/urandom', 'r');
  }

  notified(): void {
    const { mmio, ram, dirty } = this.#context;
    if (this.#parked || !mmio.live) return;
    const generation = mmio.resetGeneration;
    const queue = this.#queue;
    const chain = this.#chain;
    let used = 0;
    try {
      if (!queue.load()) return;
      for (;;) {
        if (queue.pending() === 0) {
          if (queue.armNotification()) continue;
          break;
        }
        queue.pop(chain);
        if (chain.readableBytes > 0) throw new VirtqueueError('queue 0: a request with a device-readable buffer (the device only writes)');
        let written = 0;
        for (let i = 0; i < chain.length && written < RNG_MAX_BYTES_PER_REQUEST; i++) {
          const length = Math.min(chain.len[i]!, RNG_MAX_BYTES_PER_REQUEST - written);
          const at = chain.addr[i]!;
          // The kernel's pool never runs short once booted; a short read still fills what it says.
          const got = readSync(this.#random, ram, at, length, null);
          dirty.mark(at, got);
          written += got;
          if (got < length) break;
        }
        if (mmio.resetGeneration !== generation) return;
        queue.pushUsed(chain.head, written);
        used++;
      }
    } catch (e) {
      if (mmio.resetGeneration === generation) mmio.needsReset(e instanceof VirtqueueError ? e.message : `device error: ${(e as Error).message}`);
      return;
    }
    if (used > 0 && queue.needsInterrupt()) mmio.interrupt(Interrupt.UsedBuffer);
  }

  parking(): void {
    this.#parked = true;
  }

  resumed(): void {
    this.#parked = false;
  }

  close(): void {
    closeSync(this.#random);
  }
}
