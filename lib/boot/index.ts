// Loaders and CPU setup for booting a guest: image formats (flat, ELF32/64, Multiboot v1, PVH,
// Linux bzImage with an initramfs), the structures they need in guest RAM, the entry register
// state, CPUID and MSRs.
export { planBoot, writeBootPlan, DEFAULT_LOAD_ADDR } from './plan.js';
export type { BootPlan, BootWrite, BootFormat, PlanOptions } from './plan.js';
export { Selector, applyBootState, type BootState, type CpuMode } from './cpu-state.js';
export { guestCpuid } from './cpuid.js';
export { bootMsrs, PAT_DEFAULT } from './msrs.js';
export {
  memoryMap, MemoryType, GDT_ADDR, GUEST_PARAMS_ADDR, BOOT_INFO_ADDR, PAGE_TABLES_ADDR, ZERO_PAGE_ADDR, LINUX_CMDLINE_ADDR, type MemoryMapEntry,
} from './layout.js';
export { HVM_START_MAGIC, MAX_CMDLINE_BYTES } from './boot-info.js';
export { MULTIBOOT_HEADER_MAGIC, MULTIBOOT_BOOTLOADER_MAGIC, type MultibootModule } from './multiboot.js';
export { XEN_ELFNOTE_PHYS32_ENTRY } from './pvh.js';
export {
  isBzImage, parseSetupHeader, planBzImage, HDRS_MAGIC, LinuxSelector, LoadFlag, XLoadFlag, LOADER_TYPE_UNDEFINED,
  type SetupHeader, type BzImageLayout, type BzImageOptions,
} from './bzimage.js';
export type { FirmwareTables } from './firmware-tables.js';
export type { Region } from './layout.js';
export { buildInitramfs, CPIO_NEWC_MAGIC, CPIO_TRAILER, type InitramfsEntry } from './initramfs.js';
export { BootImageError } from './errors.js';
export { guestPath, guestImages } from './guests.js';
