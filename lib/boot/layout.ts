// Where the loader puts its own structures in low guest RAM, and the memory map it reports.
//
//   0x0000-0x04ff  real-mode IVT and BIOS data area (left alone)
//   0x0500-0x052f  GDT (see cpu-state.ts for the selectors)
//   0x5000-0x5fff  never written by the loader: host-to-guest parameters of test guests
//   0x6000-0x7bff  boot information: hvm_start_info or multiboot_info, memory map, command line,
//                  Multiboot module list and strings;
//                  for a Linux bzImage, the zero page (boot_params, 0x6000-0x6fff)
//   0x7c00         default load address of a flat binary (the boot-sector convention)
//   0x9000-        long-mode identity-map page tables (PML4, PDPT, one PD per GiB)
//   0x20000-0x20fff a Linux bzImage's command line (up to 4095 bytes and its NUL)
//   0x9fc00-0x9ffff reserved (EBDA), as the memory map says; 0xa0000-0xdffff VGA and option ROMs
//   0xe0000-0xfffff reserved (BIOS area): the ACPI tables from 0xe0000, the MP tables from 0xf0000,
//                  where the standard scans find them (machines with the in-kernel irqchip)
//   0x100000-      where kernels are usually linked (1 MiB), and where a bzImage's protected-mode
//                  kernel is loaded; its initrd goes at the top of RAM, page-aligned
//                  (a Multiboot kernel's modules go right above the kernel, page-aligned)
import { argTypeError, argValueError } from '../kvm/errors.js';
import { BootImageError, formatBytes, hex } from './errors.js';

/** Where the loader puts the GDT of a protected- or long-mode boot. */
export const GDT_ADDR = 0x500;
/** A page the loader never writes, for parameters a host passes to its test guests. */
export const GUEST_PARAMS_ADDR = 0x5000;
/** Where the loader puts the boot information (hvm_start_info, multiboot_info, a bzImage's boot_params) and its memory map, up to BOOT_INFO_END. */
export const BOOT_INFO_ADDR = 0x6000;
export const BOOT_INFO_END = 0x7c00;
/** A Linux bzImage's boot_params, in place of the boot information the other formats get. */
export const ZERO_PAGE_ADDR = BOOT_INFO_ADDR;
/** A Linux bzImage's command line: a page of its own, below 0xa0000 as boot.rst asks. */
export const LINUX_CMDLINE_ADDR = 0x20000;
/** Where the loader puts the identity-mapping page tables of a long-mode boot. */
export const PAGE_TABLES_ADDR = 0x9000;
/** End of conventional memory: the EBDA starts here. */
export const LOW_RAM_END = 0x9fc00;
/** The BIOS area, reserved in the memory map: where the firmware tables are. */
export const BIOS_AREA = 0xe0000;
/** The RSDP and the ACPI tables after it (the RSDP scan covers 0xe0000-0xfffff). */
export const ACPI_TABLES_ADDR = 0xe0000;
/** The MP floating pointer and configuration table (the MP scan covers 0xf0000-0xfffff). */
export const MP_TABLE_ADDR = 0xf0000;
export const HIGH_RAM_START = 0x100000;

/** E820 / hvm_memmap_table_entry / multiboot mmap types. */
export const MemoryType = { Ram: 1, Reserved: 2 } as const;

/** One range of the guest's physical memory map (E820), as memoryMap() gives it. */
export interface MemoryMapEntry {
  addr: bigint;
  size: bigint;
  type: 1 | 2;
}

/**
 * The E820-style map the loader gives the guest (multiboot mmap, hvm_start_info memmap):
 * [0, 0x9fc00) RAM, [0x9fc00, 0xa0000) and [0xe0000, 0x100000) reserved, [1 MiB, memoryBytes) RAM.
 * The low RAM entry is shortened when memoryBytes is below 0x9fc00; the high one is absent then.
 */
export function memoryMap(memoryBytes: number): MemoryMapEntry[] {
  checkMemoryBytes(memoryBytes);
  const map: MemoryMapEntry[] = [
    { addr: 0n, size: BigInt(Math.min(memoryBytes, LOW_RAM_END)), type: MemoryType.Ram },
    { addr: BigInt(LOW_RAM_END), size: BigInt(0xa0000 - LOW_RAM_END), type: MemoryType.Reserved },
    { addr: BigInt(BIOS_AREA), size: BigInt(HIGH_RAM_START - BIOS_AREA), type: MemoryType.Reserved },
  ];
  if (memoryBytes > HIGH_RAM_START) map.push({ addr: BigInt(HIGH_RAM_START), size: BigInt(memoryBytes - HIGH_RAM_START), type: MemoryType.Ram });
  return map;
}

export function checkMemoryBytes(memoryBytes: number): void {
  if (typeof memoryBytes !== 'number') throw argTypeError(`memoryBytes must be a number, got ${typeof memoryBytes}`);
  if (!Number.isSafeInteger(memoryBytes) || memoryBytes <= 0 || memoryBytes % 4096 !== 0) {
    throw argValueError(`memoryBytes must be a positive multiple of 4096, got ${memoryBytes}`);
  }
}

/** A range of guest-physical memory that something occupies, for collision checks. */
export interface Region {
  start: number;
  end: number;
  /** What occupies it, for messages: 'segment 1', 'the GDT'. */
  what: string;
  /** A structure the loader builds (GDT, page tables, boot info), rather than part of the image. */
  loader?: boolean;
}

export const describeRange = (region: Region): string => `[${hex(region.start)}, ${hex(region.end)})`;

/** Throws a BootImageError naming the first region outside RAM or the first two that overlap. */
export function checkRegions(regions: readonly Region[], memoryBytes: number): void {
  for (const region of regions) {
    if (region.end > memoryBytes) {
      throw new BootImageError(`${region.what} ${describeRange(region)} is outside guest RAM (${formatBytes(memoryBytes)})`);
    }
  }
  const sorted = regions.filter((r) => r.end > r.start).sort((a, b) => a.start - b.start);
  for (let i = 1; i < sorted.length; i++) {
    const previous = sorted[i - 1]!;
    const current = sorted[i]!;
    if (current.start < previous.end) {
      throw new BootImageError(
        `${current.what} ${describeRange(current)} overlaps ${previous.what} ${describeRange(previous)}` +
          (!!previous.loader !== !!current.loader ? ': link or load the image at 1 MiB or above, clear of the loader\'s structures in low memory' : ''),
      );
    }
  }
}
