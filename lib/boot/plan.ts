// planBoot(): from an image file to everything the VMM copies into guest RAM and the register
// state vCPU 0 starts in, validated before any VM exists. The format comes from the file:
//   ELF with a XEN_ELFNOTE_PHYS32_ENTRY note   -> PVH (32-bit protected mode, EBX = hvm_start_info)
//   Linux setup header ("HdrS" at 0x202)       -> bzImage (bzimage.ts: Linux boot protocol, RSI = boot_params)
//   Multiboot v1 header in the first 8 KiB     -> Multiboot (protected mode, EAX magic, EBX = multiboot_info)
//   other ELF32 / ELF64                        -> protected mode / long mode at the entry point
//   anything else                              -> flat binary at loadAddr, in options.mode (default real)
import type { GuestMemory } from '../kvm/memory.js';
import { argTypeError, argValueError, outOfRangeError } from '../kvm/errors.js';
import { BootInfoBlock, encodeCmdline, putHvmStartInfo } from './boot-info.js';
import { isBzImage, notBzImageReason, planBzImage } from './bzimage.js';
import { gdtBytes, identityMap, longModeState, protectedModeState, realModeState, type BootState, type CpuMode } from './cpu-state.js';
import { isElf, parseElf, type ElfFile } from './elf.js';
import { BootImageError, formatBytes, hex } from './errors.js';
import { firmwareTables, type FirmwareTables } from './firmware-tables.js';
import { GDT_ADDR, checkMemoryBytes, checkRegions, type Region } from './layout.js';
import {
  MULTIBOOT_BOOTLOADER_MAGIC, aoutKludgeLayout, checkModules, findMultibootHeader, moduleRegions, notMultibootReason, placeModules, putMultibootInfo,
  type MultibootAddresses, type MultibootModule, type PlacedModule,
} from './multiboot.js';
import { pvhEntry } from './pvh.js';
import type { BootFormat, BootPlan, BootWrite } from './boot-plan.js';

export type { BootFormat, BootPlan, BootWrite } from './boot-plan.js';


/** How planBoot() lays out an image: guest RAM, a flat binary's mode and load address, the command line, an initrd or Multiboot modules, and whether to write firmware tables. */
export interface PlanOptions {
  memoryBytes: number;
  /** Entry mode of a flat binary (default 'real'). Ignored for formats that define their own. */
  mode?: CpuMode;
  /** Load address of a flat binary (default 0x7c00). */
  loadAddr?: number;
  /** Kernel command line, given to Multiboot, PVH, Linux and other non-real-mode boots. */
  cmdline?: string;
  /** An initial ramdisk (an initramfs: a cpio archive, see buildInitramfs()) for a Linux bzImage. */
  initrd?: Uint8Array;
  /**
   * Boot modules for a Multiboot kernel, loaded in order on page boundaries above the kernel and
   * listed in its multiboot_info (as QEMU's -initrd "FILE ARGS,FILE2 ..." does for one).
   */
  modules?: readonly MultibootModule[];
  vcpus: number;
  /**
   * The machine has the in-kernel irqchip (default false): the plan then also writes the ACPI
   * and MP tables that describe its vCPUs and interrupt controllers (firmware-tables.ts).
   */
  irqchip?: boolean;
}

/** Where a flat binary is loaded unless PlanOptions.loadAddr says otherwise (a boot sector's address). */
export const DEFAULT_LOAD_ADDR = 0x7c00;
const MODES: readonly CpuMode[] = ['real', 'protected', 'long'];

interface Loaded {
  writes: BootWrite[];
  regions: Region[];
  /** The ACPI RSDP's address for the boot information, or 0 for a machine without the tables. */
  rsdp?: number;
}

/** The image's writes with the firmware tables', if the machine has them. */
function withTables(loaded: Loaded, tables: FirmwareTables | null): Loaded {
  if (!tables) return loaded;
  return { writes: [...loaded.writes, ...tables.writes], regions: [...loaded.regions, ...tables.regions], rsdp: tables.rsdp };
}

/**
 * Parses and validates `image` and plans its boot. Pure: touches no VM. Throws BootImageError
 * for an image that cannot boot as given (with what and where), TypeError/RangeError for bad
 * options.
 */
export function planBoot(image: Uint8Array, options: PlanOptions): BootPlan {
  if (!(image instanceof Uint8Array)) throw argTypeError('image must be a Uint8Array');
  if (typeof options !== 'object' || options === null) throw argTypeError('options must be an object');
  const { memoryBytes, mode, loadAddr = DEFAULT_LOAD_ADDR, cmdline, vcpus, initrd, irqchip = false } = options;
  const modules = options.modules === undefined ? [] : checkModules(options.modules);
  checkMemoryBytes(memoryBytes);
  if (!Number.isSafeInteger(vcpus) || vcpus < 1) throw outOfRangeError(`vcpus must be a positive integer, got ${vcpus}`);
  if (typeof irqchip !== 'boolean') throw argTypeError(`irqchip must be a boolean, got ${typeof irqchip}`);
  const tables = irqchip ? firmwareTables({ vcpus, irqchip }, memoryBytes) : null;
  if (mode !== undefined && !MODES.includes(mode)) throw argValueError(`mode must be 'real', 'protected' or 'long', got ${String(mode)}`);
  if (!Number.isSafeInteger(loadAddr) || loadAddr < 0) throw outOfRangeError(`loadAddr must be a non-negative integer, got ${loadAddr}`);
  const cmdlineBytes = cmdline === undefined ? null : encodeCmdline(cmdline);
  if (initrd !== undefined && !(initrd instanceof Uint8Array)) throw argTypeError('initrd must be a Uint8Array');
  if (image.length === 0) throw new BootImageError('not a bootable image: the file is empty');
  if (initrd !== undefined && !isBzImage(image)) {
    if (findMultibootHeader(image)) throw new BootImageError('an initrd is for a Linux bzImage kernel, and this image is a Multiboot kernel: give it its files as modules');
    throw new BootImageError(`an initrd is for a Linux bzImage kernel, and this image is not one: ${isElf(image) ? 'it is an ELF file' : notBzImageReason(image)}`);
  }
  if (modules.length > 0 && (isBzImage(image) || !findMultibootHeader(image))) {
    throw new BootImageError(`modules are for a Multiboot kernel, and this image is not one: it is ${notMultibootReason(image)}`);
  }

  if (isElf(image)) {
    const elf = parseElf(image);
    // A kernel with both entries boots by PVH, unless given modules, which only Multiboot carries
    // here (QEMU always prefers the Multiboot entry).
    const pvh = modules.length > 0 ? null : pvhEntry(elf.notes);
    if (pvh !== null) {
      const loaded = withTables(loadElf(elf, image, memoryBytes), tables);
      if (!elf.segments.some((s) => BigInt(pvh) >= s.paddr && BigInt(pvh) < s.paddr + s.memBytes)) {
        throw new BootImageError(`the PVH entry point ${hex(pvh)} is not inside any loaded segment`);
      }
      return protectedPlan('pvh', BigInt(pvh), loaded, memoryBytes, cmdlineBytes, 'hvm');
    }
    const multiboot = findMultibootHeader(image);
    if (multiboot?.addresses) return multibootAoutPlan(image, { ...multiboot, addresses: multiboot.addresses }, memoryBytes, cmdlineBytes, modules, tables);
    if (multiboot) {
      if (elf.elfClass !== 32) {
        throw new BootImageError('Multiboot v1 loads ELF32 kernels, and this one is ELF64: link it as ELF32, or give its header address fields (flags bit 16)');
      }
      return multibootPlan(elfEntry(elf), withTables(loadElf(elf, image, memoryBytes), tables), memoryBytes, cmdlineBytes, modules);
    }
    const loaded = withTables(loadElf(elf, image, memoryBytes), tables);
    if (elf.elfClass === 32) return protectedPlan('elf32', elfEntry(elf), loaded, memoryBytes, cmdlineBytes, 'hvm');
    return longPlan('elf64', elfEntry(elf), loaded, memoryBytes, cmdlineBytes);
  }

  if (isBzImage(image)) return planBzImage(image, { memoryBytes, cmdline: cmdlineBytes, initrd, tables }).plan;

  const multiboot = findMultibootHeader(image);
  if (multiboot?.addresses) return multibootAoutPlan(image, { ...multiboot, addresses: multiboot.addresses }, memoryBytes, cmdlineBytes, modules, tables);
  if (multiboot) {
    throw new BootImageError(
      `the Multiboot header at offset ${hex(multiboot.offset)} has no address fields (flags bit 16), so the kernel must be an ELF32 file, and this is not ELF`,
    );
  }
  return flatPlan(image, mode ?? 'real', loadAddr, memoryBytes, cmdlineBytes, tables);
}

function flatPlan(image: Uint8Array, mode: CpuMode, loadAddr: number, memoryBytes: number, cmdline: Uint8Array | null, tables: FirmwareTables | null): BootPlan {
  const loaded = withTables({
    writes: [{ guestPhysAddr: loadAddr, data: image.slice(), what: 'image' }],
    regions: [{ start: loadAddr, end: loadAddr + image.length, what: 'the image' }],
  }, tables);
  const entry = BigInt(loadAddr);
  if (mode === 'protected') return protectedPlan('flat', entry, loaded, memoryBytes, cmdline, 'hvm');
  if (mode === 'long') return longPlan('flat', entry, loaded, memoryBytes, cmdline);
  if (loadAddr > 0xffff && (loadAddr % 16 !== 0 || loadAddr > 0xffff0)) {
    throw new BootImageError(`a real-mode image must be loaded below 64 KiB, or 16-byte aligned below 1 MiB; the load address is ${hex(loadAddr)}`);
  }
  checkRegions(loaded.regions, memoryBytes);
  return { format: 'flat', mode: 'real', entry, writes: loaded.writes, bsp: realModeState(loadAddr) };
}

/** PT_LOAD segments at their physical addresses, with their bss as zero runs. */
function loadElf(elf: ElfFile, image: Uint8Array, memoryBytes: number): Loaded {
  const loaded: Loaded = { writes: [], regions: [] };
  for (const segment of elf.segments) {
    if (segment.paddr + segment.memBytes > BigInt(memoryBytes)) {
      throw new BootImageError(`segment ${hex(segment.paddr)}+${hex(segment.memBytes)} is outside guest RAM (${formatBytes(memoryBytes)})`);
    }
    const start = Number(segment.paddr);
    const memBytes = Number(segment.memBytes);
    const what = `segment ${segment.index}`;
    loaded.regions.push({ start, end: start + memBytes, what });
    if (segment.fileBytes > 0) {
      loaded.writes.push({ guestPhysAddr: start, data: image.slice(segment.offset, segment.offset + segment.fileBytes), what });
    }
    if (memBytes > segment.fileBytes) {
      loaded.writes.push({ guestPhysAddr: start + segment.fileBytes, zeroBytes: memBytes - segment.fileBytes, what: `${what} (bss)` });
    }
  }
  return loaded;
}

/**
 * The physical entry point: e_entry translated through the segment whose virtual range holds it
 * (as GRUB does, so a higher-half kernel linked with AT() starts at its physical copy), or e_entry
 * itself where it lies in a segment's physical range.
 */
function elfEntry(elf: ElfFile): bigint {
  const entry = elf.entry;
  for (const s of elf.segments) if (entry >= s.vaddr && entry < s.vaddr + s.memBytes) return entry - s.vaddr + s.paddr;
  for (const s of elf.segments) if (entry >= s.paddr && entry < s.paddr + s.memBytes) return entry;
  throw new BootImageError(`the ELF entry point ${hex(entry)} is not inside any loaded segment`);
}

function multibootAoutPlan(
  image: Uint8Array,
  header: { offset: number; flags: number; addresses: MultibootAddresses },
  memoryBytes: number,
  cmdline: Uint8Array | null,
  modules: readonly MultibootModule[],
  tables: FirmwareTables | null,
): BootPlan {
  const layout = aoutKludgeLayout(image, header);
  const end = layout.loadAddr + layout.data.length + layout.zeroBytes;
  if (end > memoryBytes) {
    throw new BootImageError(`the Multiboot kernel [${hex(layout.loadAddr)}, ${hex(end)}) is outside guest RAM (${formatBytes(memoryBytes)})`);
  }
  const loaded: Loaded = {
    writes: [{ guestPhysAddr: layout.loadAddr, data: layout.data.slice(), what: 'image' }],
    regions: [{ start: layout.loadAddr, end, what: 'the image' }],
  };
  if (layout.zeroBytes > 0) {
    loaded.writes.push({ guestPhysAddr: layout.loadAddr + layout.data.length, zeroBytes: layout.zeroBytes, what: 'image (bss)' });
  }
  return multibootPlan(BigInt(layout.entry), withTables(loaded, tables), memoryBytes, cmdline, modules);
}

/** A Multiboot kernel as loaded, with its modules placed above it and everything else. */
function multibootPlan(entry: bigint, kernel: Loaded, memoryBytes: number, cmdline: Uint8Array | null, modules: readonly MultibootModule[]): BootPlan {
  const placed = placeModules(modules, Math.max(0, ...kernel.regions.map((region) => region.end)));
  const loaded: Loaded = {
    ...kernel,
    writes: [...kernel.writes, ...placed.map(({ start, data, what }): BootWrite => ({ guestPhysAddr: start, data, what }))],
    regions: [...kernel.regions, ...moduleRegions(placed)],
  };
  return protectedPlan('multiboot', entry, loaded, memoryBytes, cmdline, 'multiboot', placed);
}

function bootInfo(kind: 'hvm' | 'multiboot', memoryBytes: number, cmdline: Uint8Array | null, rsdp: number, modules: readonly PlacedModule[] = []) {
  const block = new BootInfoBlock();
  // Multiboot v1 has no RSDP field: its kernels find the RSDP by the BIOS-area scan.
  const addr = kind === 'multiboot' ? putMultibootInfo(block, memoryBytes, cmdline, modules) : putHvmStartInfo(block, memoryBytes, cmdline, rsdp);
  const data = block.data;
  return {
    addr,
    write: { guestPhysAddr: block.base, data, what: 'boot info' },
    region: { start: block.base, end: block.base + data.length, what: 'the boot information', loader: true },
  };
}

const gdtWrite = (): BootWrite => ({ guestPhysAddr: GDT_ADDR, data: gdtBytes(), what: 'GDT' });
const gdtRegion = (): Region => ({ start: GDT_ADDR, end: GDT_ADDR + gdtBytes().length, what: 'the GDT', loader: true });

/**
 * Protected mode, paging off. EBX = boot information: multiboot_info (with EAX = the Multiboot
 * magic) for Multiboot, hvm_start_info for everything else (PVH, ELF32, flat).
 */
function protectedPlan(
  format: BootFormat,
  entry: bigint,
  loaded: Loaded,
  memoryBytes: number,
  cmdline: Uint8Array | null,
  info: 'hvm' | 'multiboot',
  modules: readonly PlacedModule[] = [],
): BootPlan {
  if (entry > 0xffffffffn) throw new BootImageError(`the entry point ${hex(entry)} is above 4 GiB, out of reach of 32-bit protected mode`);
  const boot = bootInfo(info, memoryBytes, cmdline, loaded.rsdp ?? 0, modules);
  checkRegions([...loaded.regions, gdtRegion(), boot.region], memoryBytes);
  const regs = info === 'multiboot' ? { rax: BigInt(MULTIBOOT_BOOTLOADER_MAGIC), rbx: BigInt(boot.addr) } : { rbx: BigInt(boot.addr) };
  return {
    format,
    mode: 'protected',
    entry,
    writes: [...loaded.writes, gdtWrite(), boot.write],
    bsp: protectedModeState(entry, regs),
  };
}

/** Long mode on identity-mapped page tables; RBX = hvm_start_info. */
function longPlan(format: BootFormat, entry: bigint, loaded: Loaded, memoryBytes: number, cmdline: Uint8Array | null): BootPlan {
  const tables = identityMap(memoryBytes);
  const boot = bootInfo('hvm', memoryBytes, cmdline, loaded.rsdp ?? 0);
  checkRegions([
    ...loaded.regions, gdtRegion(), boot.region,
    { start: tables.guestPhysAddr, end: tables.guestPhysAddr + tables.data.length, what: 'the page tables', loader: true },
  ], memoryBytes);
  return {
    format,
    mode: 'long',
    entry,
    writes: [...loaded.writes, gdtWrite(), { guestPhysAddr: tables.guestPhysAddr, data: tables.data, what: 'page tables' }, boot.write],
    bsp: longModeState(entry, tables.cr3, { rbx: BigInt(boot.addr) }),
  };
}

/** Copies the plan's writes into guest RAM (zero runs included). Throws RangeError if one does not fit. */
export function writeBootPlan(plan: BootPlan, memory: GuestMemory): void {
  for (const write of plan.writes) {
    const bytes = 'data' in write ? write.data.length : write.zeroBytes;
    if (write.guestPhysAddr + bytes > memory.size) {
      throw outOfRangeError(`${write.what} [${hex(write.guestPhysAddr)}, ${hex(write.guestPhysAddr + bytes)}) is outside guest memory (${formatBytes(memory.size)})`);
    }
    if ('data' in write) memory.write(write.guestPhysAddr, write.data);
    else memory.fill(write.guestPhysAddr, write.zeroBytes);
  }
}
