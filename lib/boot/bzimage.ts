// The Linux x86 boot protocol (Documentation/x86/boot.rst, and zero-page.rst for boot_params), as
// QEMU's -kernel/-initrd/-append use it: a bzImage's protected-mode kernel loaded at 1 MiB and
// entered through the 64-bit boot protocol (the kernel's offset 0x200, long mode on the loader's
// identity map) where the kernel has that entry, else through the 32-bit one (offset 0,
// protected mode, paging off). Either way RSI/ESI holds the zero page (struct boot_params).
import { PAGE_SIZE } from '../kvm/constants.js';
import { argTypeError } from '../kvm/errors.js';
import { encodeCmdline } from './boot-info.js';
import { GDT_BYTES, Selector, gdtBytes, identityMap, longModeState, protectedModeState, type BootState, type SegmentedBootState } from './cpu-state.js';
import { BootImageError, formatBytes, hex } from './errors.js';
import type { FirmwareTables } from './firmware-tables.js';
import { GDT_ADDR, HIGH_RAM_START, LINUX_CMDLINE_ADDR, ZERO_PAGE_ADDR, checkRegions, memoryMap, type Region } from './layout.js';
import type { BootPlan, BootWrite } from './boot-plan.js';

/** "HdrS" at offset 0x202: the kernel has a setup header of protocol 2.00 or later. */
export const HDRS_MAGIC = 0x53726448;
export const BOOT_FLAG = 0xaa55;
/** The oldest protocol this loader boots: 2.06 has cmdline_size (and 2.05 the relocation fields). */
export const MIN_BOOT_PROTOCOL = 0x0206;
/** The protocol that added xloadflags, and with it the 64-bit entry (XLF_KERNEL_64). */
export const BOOT_PROTOCOL_64BIT_ENTRY = 0x020c;
/** type_of_loader for a loader without an assigned id. */
export const LOADER_TYPE_UNDEFINED = 0xff;
/** The protocol that added acpi_rsdp_addr (boot_params offset 0x070). */
export const BOOT_PROTOCOL_ACPI_RSDP = 0x020e;
/** Linux's boot selectors: boot.rst asks for these in the GDT at either protected-mode entry. */
export const LinuxSelector = { BootCs: 0x10, BootDs: 0x18 } as const;

/** Bits of the setup header's `loadflags` (Documentation/arch/x86/boot.rst). */
export const LoadFlag = { LoadedHigh: 1 << 0, QuietFlag: 1 << 5, CanUseHeap: 1 << 7 } as const;
/** Bits of the setup header's `xloadflags` (boot.rst). */
export const XLoadFlag = { Kernel64: 1 << 0, CanBeLoadedAbove4G: 1 << 1 } as const;

/** Where the 64-bit entry is, from the start of the protected-mode kernel. */
const ENTRY_64_OFFSET = 0x200;
const SECTOR_BYTES = 512;
const ZERO_PAGE_BYTES = 4096;
/** Before protocol 2.03 there was no initrd_addr_max, and this was the limit. */
const LEGACY_INITRD_ADDR_MAX = 0x37ffffff;

/** Setup header offsets, in the image and in boot_params alike (boot.rst, "The Real-Mode Kernel Header"). */
const Hdr = {
  setupSects: 0x1f1, syssize: 0x1f4, vidMode: 0x1fa, bootFlag: 0x1fe, jump: 0x200, header: 0x202, version: 0x206,
  typeOfLoader: 0x210, loadflags: 0x211, code32Start: 0x214, ramdiskImage: 0x218, ramdiskSize: 0x21c, heapEndPtr: 0x224,
  cmdLinePtr: 0x228, initrdAddrMax: 0x22c, kernelAlignment: 0x230, relocatableKernel: 0x234, xloadflags: 0x236,
  cmdlineSize: 0x238, setupData: 0x250, prefAddress: 0x258, initSize: 0x260,
} as const;
/** The setup header ends at or before here: after it come other boot_params fields (edd_mbr_sig_buffer). */
const SETUP_HEADER_LIMIT = 0x290;
/** The header up to init_size (protocol 2.10), the last field this loader reads. */
const HEADER_BYTES_READ = Hdr.initSize + 4;

/** boot_params fields outside the setup header (zero-page.rst). */
const ZeroPage = { acpiRsdpAddr: 0x070, extRamdiskImage: 0x0c0, extRamdiskSize: 0x0c4, extCmdLinePtr: 0x0c8, e820Entries: 0x1e8, e820Table: 0x2d0 } as const;
const E820_ENTRY_BYTES = 20;
const E820_MAX_ENTRIES = 128;

/** The fields of a bzImage's setup header the loader reads (boot.rst, "The real-mode kernel header"). */
export interface SetupHeader {
  /** setup_sects as the kernel means it: 0 reads as 4. */
  setupSects: number;
  /** Boot protocol version, (major << 8) | minor. */
  version: number;
  loadflags: number;
  /** 0 before protocol 2.12. */
  xloadflags: number;
  code32Start: number;
  /** The longest command line the kernel takes, without its NUL. */
  cmdlineSize: number;
  /** The highest address the initrd may occupy. */
  initrdAddrMax: number;
  kernelAlignment: number;
  relocatable: boolean;
  /** 0 before protocol 2.10. */
  prefAddress: bigint;
  /** Memory the kernel needs from its runtime start address (0 before protocol 2.10). */
  initSize: number;
  /** syssize in bytes: the size of the protected-mode kernel. */
  kernelBytes: number;
  /** File offset of the protected-mode kernel: (setup_sects + 1) * 512. */
  kernelOffset: number;
  /** End of the setup header in the image: 0x202 + the byte at 0x201 (boot.rst, "32-bit Boot Protocol"). */
  headerEnd: number;
}

/** Whether `image` carries a Linux setup header: boot_flag 0xAA55 at 0x1fe and "HdrS" at 0x202. */
export function isBzImage(image: Uint8Array): boolean {
  return notBzImageReason(image) === null;
}

/** Why `image` is not a bzImage (its magic numbers), or null if it is one. */
export function notBzImageReason(image: Uint8Array): string | null {
  if (image.length < Hdr.header + 4) return `the file has ${image.length} bytes, too few for a setup header (its "HdrS" magic is at offset ${hex(Hdr.header)})`;
  const view = viewOf(image);
  if (view.getUint16(Hdr.bootFlag, true) !== BOOT_FLAG) return `no boot_flag 0xaa55 at offset ${hex(Hdr.bootFlag)}`;
  if (view.getUint32(Hdr.header, true) !== HDRS_MAGIC) return `no "HdrS" magic at offset ${hex(Hdr.header)}`;
  return null;
}

/**
 * Reads and checks a bzImage's setup header. Throws a BootImageError for a file that is not a
 * bzImage, is truncated, or needs what this loader does not do (protocol before 2.06, a zImage).
 */
export function parseSetupHeader(image: Uint8Array): SetupHeader {
  const reason = notBzImageReason(image);
  if (reason !== null) throw new BootImageError(`not a Linux bzImage: ${reason}`);
  if (image.length < HEADER_BYTES_READ) {
    throw new BootImageError(`truncated bzImage: the file has ${image.length} bytes, its setup header needs ${HEADER_BYTES_READ}`);
  }
  const view = viewOf(image);
  const version = view.getUint16(Hdr.version, true);
  if (version < MIN_BOOT_PROTOCOL) {
    const protocol = `${version >> 8}.${(version & 0xff).toString(16).padStart(2, '0')}`;
    throw new BootImageError(`the kernel speaks boot protocol ${protocol}; this loader needs 2.06 or later (Linux 2.6.22 and later)`);
  }
  const loadflags = image[Hdr.loadflags]!;
  if (!(loadflags & LoadFlag.LoadedHigh)) {
    throw new BootImageError('the kernel is not loaded high (loadflags bit 0, LOADED_HIGH, is clear): a zImage, which this loader does not boot; build a bzImage');
  }
  const setupSects = image[Hdr.setupSects] || 4;
  const kernelOffset = (setupSects + 1) * SECTOR_BYTES;
  const kernelBytes = view.getUint32(Hdr.syssize, true) * 16;
  if (image.length <= kernelOffset) {
    throw new BootImageError(
      `truncated bzImage: the file has ${image.length} bytes, and its real-mode part (setup_sects ${setupSects}) takes ${kernelOffset} of them, leaving no protected-mode kernel`,
    );
  }
  // syssize is rounded up to whole paragraphs: up to 15 bytes of it may be past the end of the file.
  if (image.length - kernelOffset < kernelBytes - 15) {
    throw new BootImageError(
      `truncated bzImage: syssize says the protected-mode kernel at offset ${hex(kernelOffset)} has ${kernelBytes} bytes, the file holds ${image.length - kernelOffset}`,
    );
  }
  // A field newer than the kernel's protocol is not there: the value the protocol says to assume.
  const since = (protocolVersion: number, assumed: number, read: () => number) => (version >= protocolVersion ? read() : assumed);
  const prefAddress = version >= 0x020a ? view.getBigUint64(Hdr.prefAddress, true) : 0n;
  return {
    setupSects,
    version,
    loadflags,
    xloadflags: since(0x020c, 0, () => view.getUint16(Hdr.xloadflags, true)),
    code32Start: view.getUint32(Hdr.code32Start, true),
    cmdlineSize: view.getUint32(Hdr.cmdlineSize, true),
    initrdAddrMax: since(0x0203, LEGACY_INITRD_ADDR_MAX, () => view.getUint32(Hdr.initrdAddrMax, true)),
    kernelAlignment: view.getUint32(Hdr.kernelAlignment, true),
    relocatable: image[Hdr.relocatableKernel] !== 0,
    prefAddress,
    initSize: since(0x020a, 0, () => view.getUint32(Hdr.initSize, true)),
    kernelBytes,
    kernelOffset,
    headerEnd: Math.min(Hdr.header + image[Hdr.jump + 1]!, SETUP_HEADER_LIMIT),
  };
}

/** What planBzImage() needs besides the image: guest RAM, the command line, an initrd and the firmware tables. */
export interface BzImageOptions {
  memoryBytes: number;
  /** The command line, encoded with its NUL (encodeCmdline), or null for an empty one. */
  cmdline: Uint8Array | null;
  initrd?: Uint8Array;
  /** The machine's ACPI and MP tables (firmwareTables()), or null/absent for none. */
  tables?: FirmwareTables | null;
}

/** Everything a bzImage boot puts in guest RAM, and where: for tests and tools. */
export interface BzImageLayout {
  header: SetupHeader;
  /** Where the protected-mode kernel is loaded. */
  loadAddr: number;
  /** [loadAddr, kernelEnd): the loaded kernel and the memory it needs while it starts (init_size). */
  kernelEnd: number;
  zeroPage: number;
  cmdline: number;
  initrd: { addr: number; bytes: number } | null;
  entry: 64 | 32;
}

/** Plans a bzImage boot (planBoot() calls it for the images isBzImage() accepts). */
export function planBzImage(image: Uint8Array, options: BzImageOptions): { plan: BootPlan; layout: BzImageLayout } {
  const { memoryBytes, initrd, tables = null } = options;
  const header = parseSetupHeader(image);
  const cmdline = options.cmdline ?? encodeCmdline('');
  const cmdlineChars = cmdline.length - 1;
  if (cmdlineChars > header.cmdlineSize) {
    throw new BootImageError(`the command line is ${cmdlineChars} bytes; this kernel takes at most ${header.cmdlineSize} (its cmdline_size)`);
  }

  const loadAddr = HIGH_RAM_START;
  const kernelData = image.slice(header.kernelOffset);
  const kernelEnd = Math.max(loadAddr + kernelData.length, runtimeStart(header, loadAddr) + header.initSize);
  if (kernelEnd > memoryBytes) {
    throw new BootImageError(
      `the kernel needs guest RAM up to ${hex(kernelEnd)} (loaded at ${hex(loadAddr)}, init_size ${hex(header.initSize)}${header.prefAddress ? `, pref_address ${hex(header.prefAddress)}` : ''}), and guest RAM is ${formatBytes(memoryBytes)}`,
    );
  }
  const placedInitrd = initrd === undefined ? null : placeInitrd(initrd, header, kernelEnd, memoryBytes);
  const entry64 = header.version >= BOOT_PROTOCOL_64BIT_ENTRY && (header.xloadflags & XLoadFlag.Kernel64) !== 0;
  if (entry64 && kernelData.length <= ENTRY_64_OFFSET) {
    throw new BootImageError(`the 64-bit entry (offset ${hex(ENTRY_64_OFFSET)}) is beyond the protected-mode kernel's ${kernelData.length} bytes`);
  }
  const layout: BzImageLayout = { header, loadAddr, kernelEnd, zeroPage: ZERO_PAGE_ADDR, cmdline: LINUX_CMDLINE_ADDR, initrd: placedInitrd, entry: entry64 ? 64 : 32 };

  const zeroPage = buildZeroPage(image, layout, memoryBytes, tables?.rsdp ?? 0);
  const writes: BootWrite[] = [
    { guestPhysAddr: loadAddr, data: kernelData, what: 'kernel' },
    { guestPhysAddr: GDT_ADDR, data: linuxGdt(entry64), what: 'GDT' },
    { guestPhysAddr: ZERO_PAGE_ADDR, data: zeroPage, what: 'zero page' },
    { guestPhysAddr: LINUX_CMDLINE_ADDR, data: cmdline, what: 'command line' },
  ];
  const regions: Region[] = [
    { start: loadAddr, end: kernelEnd, what: 'the kernel' },
    { start: GDT_ADDR, end: GDT_ADDR + GDT_BYTES, what: 'the GDT', loader: true },
    { start: ZERO_PAGE_ADDR, end: ZERO_PAGE_ADDR + ZERO_PAGE_BYTES, what: 'the zero page', loader: true },
    { start: LINUX_CMDLINE_ADDR, end: LINUX_CMDLINE_ADDR + cmdline.length, what: 'the command line', loader: true },
  ];
  if (tables) {
    writes.push(...tables.writes);
    regions.push(...tables.regions);
  }
  if (placedInitrd) {
    writes.push({ guestPhysAddr: placedInitrd.addr, data: initrd!.slice(), what: 'initrd' });
    regions.push({ start: placedInitrd.addr, end: placedInitrd.addr + placedInitrd.bytes, what: 'the initrd' });
  }

  let bsp: BootState;
  let entry: bigint;
  if (entry64) {
    const tables = identityMap(memoryBytes);
    writes.push({ guestPhysAddr: tables.guestPhysAddr, data: tables.data, what: 'page tables' });
    regions.push({ start: tables.guestPhysAddr, end: tables.guestPhysAddr + tables.data.length, what: 'the page tables', loader: true });
    entry = BigInt(loadAddr + ENTRY_64_OFFSET);
    bsp = withLinuxSelectors(longModeState(entry, tables.cr3, { rsi: BigInt(ZERO_PAGE_ADDR) }));
  } else {
    entry = BigInt(loadAddr);
    bsp = withLinuxSelectors(protectedModeState(entry, { rsi: BigInt(ZERO_PAGE_ADDR), rbx: 0n, rbp: 0n, rdi: 0n }));
  }
  checkRegions(regions, memoryBytes);
  return { plan: { format: 'bzimage', mode: entry64 ? 'long' : 'protected', entry, writes, bsp }, layout };
}

/**
 * Where the kernel will run from while it starts (boot.rst, init_size): a relocatable kernel at
 * its load address rounded up to kernel_alignment, but Linux never goes below pref_address (its
 * LOAD_PHYSICAL_ADDR); any other kernel at pref_address.
 */
function runtimeStart(header: SetupHeader, loadAddr: number): number {
  const pref = Number(header.prefAddress);
  if (!header.relocatable) return pref === 0 ? loadAddr : pref;
  const alignment = header.kernelAlignment > 0 ? header.kernelAlignment : 1;
  return Math.max(Math.ceil(loadAddr / alignment) * alignment, pref);
}

/** The initrd at the top of RAM below initrd_addr_max, page-aligned, above the kernel (as QEMU places it). */
function placeInitrd(initrd: Uint8Array, header: SetupHeader, kernelEnd: number, memoryBytes: number): { addr: number; bytes: number } {
  if (!(initrd instanceof Uint8Array)) throw argTypeError('initrd must be a Uint8Array');
  if (initrd.length === 0) throw new BootImageError('the initrd is empty');
  const limit = Math.min(header.initrdAddrMax + 1, memoryBytes);
  const addr = Math.floor((limit - initrd.length) / PAGE_SIZE) * PAGE_SIZE;
  if (addr < kernelEnd) {
    const ceiling = header.initrdAddrMax + 1 < memoryBytes ? `initrd_addr_max + 1 (${hex(limit)})` : `the end of guest RAM (${formatBytes(memoryBytes)})`;
    throw new BootImageError(
      `the initrd (${initrd.length} bytes) does not fit between the kernel's end ${hex(kernelEnd)} and ${ceiling}: ${Math.max(limit - kernelEnd, 0)} bytes are free there`,
    );
  }
  return { addr, bytes: initrd.length };
}

/** struct boot_params: the image's setup header, updated as a loader must (boot.rst), and the E820 map. */
function buildZeroPage(image: Uint8Array, layout: BzImageLayout, memoryBytes: number, rsdp: number): Uint8Array {
  const page = new Uint8Array(ZERO_PAGE_BYTES);
  const view = viewOf(page);
  page.set(image.subarray(Hdr.setupSects, layout.header.headerEnd), Hdr.setupSects);
  view.setUint16(Hdr.vidMode, 0xffff, true); // "normal": no video mode change (boot.rst, vga=)
  page[Hdr.typeOfLoader] = LOADER_TYPE_UNDEFINED;
  // LOADED_HIGH stays; no CAN_USE_HEAP (heap_end_ptr is for the real-mode entry, not used here), not quiet.
  page[Hdr.loadflags] = LoadFlag.LoadedHigh;
  view.setUint16(Hdr.heapEndPtr, 0, true);
  view.setUint32(Hdr.code32Start, layout.loadAddr, true);
  view.setBigUint64(Hdr.setupData, 0n, true); // no setup_data list
  putAddress(view, Hdr.cmdLinePtr, ZeroPage.extCmdLinePtr, layout.cmdline);
  if (layout.initrd) {
    putAddress(view, Hdr.ramdiskImage, ZeroPage.extRamdiskImage, layout.initrd.addr);
    putAddress(view, Hdr.ramdiskSize, ZeroPage.extRamdiskSize, layout.initrd.bytes);
  }
  // Protocol 2.14 added acpi_rsdp_addr; older kernels find the RSDP by the BIOS-area scan.
  if (rsdp !== 0 && layout.header.version >= BOOT_PROTOCOL_ACPI_RSDP) view.setBigUint64(ZeroPage.acpiRsdpAddr, BigInt(rsdp), true);
  const map = memoryMap(memoryBytes);
  if (map.length > E820_MAX_ENTRIES) throw new BootImageError(`the memory map has ${map.length} entries; boot_params holds ${E820_MAX_ENTRIES}`);
  page[ZeroPage.e820Entries] = map.length;
  map.forEach((entry, i) => {
    const at = ZeroPage.e820Table + i * E820_ENTRY_BYTES;
    view.setBigUint64(at, entry.addr, true);
    view.setBigUint64(at + 8, entry.size, true);
    view.setUint32(at + 16, entry.type, true);
  });
  return page;
}

/** A 64-bit value split into a setup-header field (low 32 bits) and its ext_ field (high 32 bits). */
function putAddress(view: DataView, low: number, high: number, value: number): void {
  view.setUint32(low, value >>> 0, true);
  view.setUint32(high, Math.floor(value / 2 ** 32), true);
}

/**
 * The loader's flat descriptors at Linux's selectors: __BOOT_CS (0x10) the 64-bit or 32-bit code
 * segment, __BOOT_DS (0x18) the data segment, and the TSS where the loader's own GDT has it.
 */
function linuxGdt(entry64: boolean): Uint8Array {
  const loader = gdtBytes();
  const gdt = new Uint8Array(GDT_BYTES);
  const code = entry64 ? Selector.Code64 : Selector.Code32;
  gdt.set(loader.subarray(code, code + 8), LinuxSelector.BootCs);
  gdt.set(loader.subarray(Selector.Data, Selector.Data + 8), LinuxSelector.BootDs);
  gdt.set(loader.subarray(Selector.Tss, GDT_BYTES), Selector.Tss);
  return gdt;
}

function withLinuxSelectors(state: SegmentedBootState): BootState {
  const { cs, ds } = state.sregs;
  const data = { ...ds, selector: LinuxSelector.BootDs };
  return {
    regs: state.regs,
    sregs: { ...state.sregs, cs: { ...cs, selector: LinuxSelector.BootCs }, ds: data, es: { ...data }, fs: { ...data }, gs: { ...data }, ss: { ...data } },
  };
}

function viewOf(bytes: Uint8Array): DataView {
  return new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}
