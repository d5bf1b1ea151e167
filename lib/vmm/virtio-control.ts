// What the machine and a virtio device's thread share: the control words and the thread's data.
import type { GuestMemoryHandle } from '../kvm/memory.js';

/**
 * Int32 indices in the control buffer. DEVICE_STATE holds a RunState (control.ts), as the vCPU
 * threads' control block does: the thread parks unless Running, and ends once Stopping.
 */
export const DEVICE_STATE = 0;
export const DEVICE_PARKED = 1;
export const DEVICE_CONTROL_BYTES = 8;


export interface VirtioWorkerData {
  /** Thread name and log prefix: 'virtio-blk0'. */
  name: string;
  mmio: SharedArrayBuffer;
  control: SharedArrayBuffer;
  notifyFd: number;
  memory: GuestMemoryHandle;
  dirtyBitmap: SharedArrayBuffer;
  memoryPages: number;
  disk: { fd: number; path: string; sectors: number; readOnly: boolean; id: Uint8Array };
}

export type VirtioWorkerMessage = { type: 'log'; message: string } | { type: 'done'; error?: string };
