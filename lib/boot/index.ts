// Loaders and CPU setup for booting a guest: image formats (flat, ELF32/64, Multiboot v1, PVH),
// the structures they need in guest RAM, the entry register state, CPUID and MSRs.
export { planBoot, writeBootPlan, DEFAULT_LOAD_ADDR } from './plan.js';
export type { BootPlan, BootWrite, BootFormat, PlanOptions } from './plan.js';
export { Selector, applyBootState, type BootState, type CpuMode } from './cpu-state.js';
export { guestCpuid } from './cpuid.js';
export { bootMsrs, PAT_DEFAULT } from './msrs.js';
export { memoryMap, MemoryType, GDT_ADDR, GUEST_PARAMS_ADDR, BOOT_INFO_ADDR, PAGE_TABLES_ADDR, type MemoryMapEntry } from './layout.js';
export { HVM_START_MAGIC, MAX_CMDLINE_BYTES } from './boot-info.js';
export { MULTIBOOT_HEADER_MAGIC, MULTIBOOT_BOOTLOADER_MAGIC } from './multiboot.js';
export { XEN_ELFNOTE_PHYS32_ENTRY } from './pvh.js';
export { BootImageError } from './errors.js';
