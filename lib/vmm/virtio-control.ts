// What the machine and a virtio device's thread share: the control words and the thread's data.
import type { BlockDisk } from '../devices/virtio-blk.js';
import type { VirtioDeviceModel } from '../devices/virtio-mmio.js';
import type { VsockConfig } from '../devices/virtio-vsock.js';
import type { GuestMemoryHandle } from '../kvm/memory.js';

/**
 * Int32 indices in the control buffer. DEVICE_STATE holds a RunState (control.ts), as the vCPU
 * threads' control block does: the thread parks unless Running, and ends once Stopping.
 * DEVICE_RESTORES counts the register restores, so a device learns, unparking, that its state
 * came from a saved machine.
 */
export const DEVICE_STATE = 0;
export const DEVICE_PARKED = 1;
export const DEVICE_RESTORES = 2;
export const DEVICE_CONTROL_BYTES = 12;

/** What a device's thread needs of its kind, beside the register file: cloned to the thread. */
export type VirtioDeviceData =
  | { kind: 'blk'; disk: BlockDisk }
  | { kind: 'vsock'; vsock: VsockConfig }
  | { kind: 'rng' }
  | { kind: 'net'; fd: number; tap: string };

export type VirtioKind = VirtioDeviceData['kind'];

/** What opening one device gives: its model, what its thread needs, what to close at the end. */
export interface OpenedDevice {
  /** Thread name and log prefix: 'virtio-blk0'. */
  name: string;
  model: VirtioDeviceModel;
  data: VirtioDeviceData;
  /** A disk's image, whose lock the machine takes and gives up. */
  disk?: { readonly shape: { path: string; readOnly: boolean; sectors: number; id: string }; readonly fd: number; locked: boolean };
  /** Closes what was opened for the device (after its thread has ended). */
  close(): void;
}

export interface VirtioWorkerData {
  /** Thread name and log prefix: 'virtio-blk0'. */
  name: string;
  mmio: SharedArrayBuffer;
  control: SharedArrayBuffer;
  /** The eventfd every queue's notify signals (non-blocking, except for a disk's). */
  notifyFd: number;
  memory: GuestMemoryHandle;
  dirtyBitmap: SharedArrayBuffer;
  memoryPages: number;
  device: VirtioDeviceData;
}

export type VirtioWorkerMessage = { type: 'log'; message: string } | { type: 'done'; error?: string };
