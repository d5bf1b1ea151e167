// What a loader makes of an image: the copies into guest RAM and the state vCPU 0 starts in.
// Plain data, so that it crosses to a vCPU thread as it is.
import type { BootState, CpuMode } from './cpu-state.js';

/** The image formats planBoot() recognises: a flat binary, ELF32, ELF64, Multiboot v1, PVH (an ELF note) or a Linux bzImage. */
export type BootFormat = 'flat' | 'elf32' | 'elf64' | 'multiboot' | 'pvh' | 'bzimage';

/**
 * One copy into guest RAM: bytes, or a run of zero bytes (an ELF segment's bss). `what` names it
 * ('segment 1', 'GDT', 'page tables', 'boot info', 'image').
 */
export type BootWrite =
  | { guestPhysAddr: number; data: Uint8Array; what: string }
  | { guestPhysAddr: number; zeroBytes: number; what: string };

/** Plain data (structured-cloneable): safe to post to a vCPU worker. */
export interface BootPlan {
  format: BootFormat;
  /** The mode vCPU 0 starts in. */
  mode: CpuMode;
  /** The guest-physical entry point. */
  entry: bigint;
  writes: BootWrite[];
  /** Register state of vCPU 0 (the other vCPUs start at KVM's reset state, waiting for INIT/SIPI). */
  bsp: BootState;
}
