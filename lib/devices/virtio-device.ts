// What a virtio device's own thread gives the device it serves, and what it asks of it.
import type { DirtyPageMarker } from './bus-device.js';
import type { VirtioMmio } from './virtio-mmio.js';

/** What a device's thread gives a device. */
export interface VirtioDeviceContext {
  readonly mmio: VirtioMmio;
  readonly ram: Uint8Array;
  readonly dirty: DirtyPageMarker;
  log(message: string): void;
  watch(fd: number, onReadable: () => void): { close(): void };
}

/** A virtio device served on its own thread's event loop. */
export interface VirtioQueueDevice {
  notified(): void;
  parking(): void;
  resumed(restored: boolean): void;
  close(): void;
}
