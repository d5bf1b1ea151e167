// What a virtio device's thread (lib/vmm/virtio-worker.ts) gives a device, and what it asks of
// one: a device serves its queues on that thread's event loop, beside whatever host fds and
// sockets it talks to, and never on a vCPU thread.
import type { DirtyPageMarker } from './bus-device.js';
import type { VirtioMmio } from './virtio-mmio.js';

export interface VirtioDeviceContext {
  /** The register file, shared with the vCPU threads. */
  readonly mmio: VirtioMmio;
  /** All of guest RAM. */
  readonly ram: Uint8Array;
  /** Every byte the device writes into guest RAM is marked here, so that migrations carry it. */
  readonly dirty: DirtyPageMarker;
  log(message: string): void;
  /**
   * Calls `onReadable` on the thread's event loop each time `fd` is readable (level-triggered:
   * until what is there has been read); close() stops it. For fds Node has no stream for (a TAP).
   */
  watch(fd: number, onReadable: () => void): { close(): void };
}

/** A virtio device served on its own thread's event loop. */
export interface VirtioQueueDevice {
  /**
   * The guest notified a queue, or the device resumed: look at every queue. One eventfd stands
   * for all of a device's queues.
   */
  notified(): void;
  /**
   * The thread parks next (a pause, a snapshot, a migration, the machine's end): stop touching
   * guest RAM, and take no host input until resumed(). The thread blocks while parked; host
   * input waits in the kernel's buffers.
   */
  parking(): void;
  /**
   * After a park, before notified(). `restored`: the registers were loaded from a saved state
   * meanwhile (a restore, or the destination of a migration), so whatever the device held of
   * the host side belongs to another machine.
   */
  resumed(restored: boolean): void;
  /** The machine ends: close what the device opened itself. */
  close(): void;
}
