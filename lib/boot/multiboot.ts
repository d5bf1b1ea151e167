// Multiboot v1 (the Multiboot Specification 0.6.96): the header a kernel carries in its first
// 8 KiB, and the multiboot_info the loader hands it in EBX.
import { PAGE_SIZE } from '../kvm/constants.js';
import { argTypeError } from '../kvm/errors.js';
import { BootInfoBlock, putString } from './boot-info.js';
import { isBzImage } from './bzimage.js';
import { isElf } from './elf.js';
import { BootImageError, formatBytes, hex } from './errors.js';
import { BOOT_INFO_ADDR, BOOT_INFO_END, HIGH_RAM_START, LOW_RAM_END, memoryMap, type Region } from './layout.js';

/** The magic of a Multiboot v1 header, found in the image's first 8 KiB. */
export const MULTIBOOT_HEADER_MAGIC = 0x1badb002;
/** In EAX at entry: the kernel was loaded by a Multiboot-compliant loader. */
export const MULTIBOOT_BOOTLOADER_MAGIC = 0x2badb002;
/** The header must lie in the file's first 8 KiB (section 3.1.1). */
export const MULTIBOOT_SEARCH_BYTES = 8192;

/** Header flags (section 3.1.2). Bits 0-15 are requirements the loader must meet or refuse. */
const HeaderFlag = { PageAlign: 1 << 0, MemoryInfo: 1 << 1, VideoMode: 1 << 2, AoutKludge: 1 << 16 } as const;
const SUPPORTED_REQUIREMENTS = HeaderFlag.PageAlign | HeaderFlag.MemoryInfo;

/** multiboot_info.flags (section 3.3). */
export const InfoFlag = { Memory: 1 << 0, Cmdline: 1 << 2, Modules: 1 << 3, MemoryMap: 1 << 6, BootLoaderName: 1 << 9 } as const;
const INFO_BYTES = 120;
const MMAP_ENTRY_BYTES = 24;
/** struct multiboot_mod_list: mod_start, mod_end, cmdline, pad. */
export const MODULE_ENTRY_BYTES = 16;
const FOUR_GIB = 2 ** 32;

/** A boot module (section 3.3, mods_addr): bytes the kernel finds in RAM, with a string. */
export interface MultibootModule {
  data: Uint8Array;
  /**
   * The module's string, which by GRUB's and QEMU's convention is its file name followed by its
   * arguments (default: empty).
   */
  cmdline?: string;
}

/** A module where the loader put it: [start, end) in guest RAM, and its NUL-terminated string. */
export interface PlacedModule {
  start: number;
  end: number;
  data: Uint8Array;
  string: Uint8Array;
  /** For messages: 'Multiboot module 1 ("initrd.img quiet")'. */
  what: string;
}

export interface MultibootAddresses {
  headerAddr: number;
  loadAddr: number;
  loadEndAddr: number;
  bssEndAddr: number;
  entryAddr: number;
}

export interface MultibootHeader {
  /** File offset of the header. */
  offset: number;
  flags: number;
  /** The address fields, present when flags bit 16 is set. */
  addresses: MultibootAddresses | null;
}

/**
 * The first header with a valid checksum in the first 8 KiB (4-byte aligned), or null if the
 * magic is absent. A magic with a bad checksum and none valid is an error: the file meant to be
 * a Multiboot kernel and is damaged.
 */
export function findMultibootHeader(image: Uint8Array): MultibootHeader | null {
  const view = new DataView(image.buffer, image.byteOffset, image.byteLength);
  const limit = Math.min(MULTIBOOT_SEARCH_BYTES, image.length) - 12;
  let badChecksumAt = -1;
  for (let offset = 0; offset <= limit; offset += 4) {
    if (view.getUint32(offset, true) !== MULTIBOOT_HEADER_MAGIC) continue;
    const flags = view.getUint32(offset + 4, true);
    const checksum = view.getUint32(offset + 8, true);
    if (((MULTIBOOT_HEADER_MAGIC + flags + checksum) >>> 0) !== 0) {
      if (badChecksumAt < 0) badChecksumAt = offset;
      continue;
    }
    let addresses: MultibootAddresses | null = null;
    if (flags & HeaderFlag.AoutKludge) {
      if (offset + 32 > image.length) throw new BootImageError(`truncated Multiboot header at offset ${hex(offset)}: its address fields are beyond the end of the file`);
      addresses = {
        headerAddr: view.getUint32(offset + 12, true),
        loadAddr: view.getUint32(offset + 16, true),
        loadEndAddr: view.getUint32(offset + 20, true),
        bssEndAddr: view.getUint32(offset + 24, true),
        entryAddr: view.getUint32(offset + 28, true),
      };
    }
    const unsupported = flags & 0xffff & ~SUPPORTED_REQUIREMENTS;
    if (unsupported) {
      const video = unsupported & HeaderFlag.VideoMode ? ' (bit 2 asks for a video mode; this machine has a serial console only)' : '';
      throw new BootImageError(`the Multiboot header at offset ${hex(offset)} requires flags ${hex(unsupported)}, which this loader cannot meet${video}`);
    }
    return { offset, flags, addresses };
  }
  if (badChecksumAt >= 0) {
    throw new BootImageError(`the Multiboot header at offset ${hex(badChecksumAt)} has a bad checksum (magic + flags + checksum must be 0 mod 2^32)`);
  }
  return null;
}

/**
 * The image bytes and placement a header with address fields (flags bit 16, the "a.out kludge")
 * describes: file data from header offset - (header_addr - load_addr) up to load_end_addr (or the
 * end of the file), then zeroes up to bss_end_addr.
 */
export function aoutKludgeLayout(image: Uint8Array, header: MultibootHeader & { addresses: MultibootAddresses }) {
  const { headerAddr, loadAddr, loadEndAddr, bssEndAddr, entryAddr } = header.addresses;
  if (loadAddr > headerAddr) throw new BootImageError(`Multiboot load_addr ${hex(loadAddr)} is above header_addr ${hex(headerAddr)}`);
  const fileStart = header.offset - (headerAddr - loadAddr);
  if (fileStart < 0) throw new BootImageError(`Multiboot header_addr - load_addr (${hex(headerAddr - loadAddr)}) is larger than the header's file offset ${hex(header.offset)}`);
  const fileBytes = loadEndAddr === 0 ? image.length - fileStart : loadEndAddr - loadAddr;
  if (loadEndAddr !== 0 && loadEndAddr < loadAddr) throw new BootImageError(`Multiboot load_end_addr ${hex(loadEndAddr)} is below load_addr ${hex(loadAddr)}`);
  if (fileStart + fileBytes > image.length) {
    throw new BootImageError(`Multiboot load_end_addr ${hex(loadEndAddr)} asks for file data up to offset ${hex(fileStart + fileBytes)}, beyond the end of the file (${hex(image.length)} bytes)`);
  }
  const loadEnd = loadAddr + fileBytes;
  if (bssEndAddr !== 0 && bssEndAddr < loadEnd) throw new BootImageError(`Multiboot bss_end_addr ${hex(bssEndAddr)} is below the end of the loaded data ${hex(loadEnd)}`);
  const memEnd = bssEndAddr === 0 ? loadEnd : bssEndAddr;
  if (entryAddr < loadAddr || entryAddr >= memEnd) {
    throw new BootImageError(`Multiboot entry_addr ${hex(entryAddr)} is outside the kernel [${hex(loadAddr)}, ${hex(memEnd)})`);
  }
  return { loadAddr, data: image.subarray(fileStart, fileStart + fileBytes), zeroBytes: memEnd - loadEnd, entry: entryAddr };
}

/**
 * Whether `head` (a file's first 8 KiB at least) starts a Multiboot kernel: one with a valid
 * header, and not a Linux bzImage (which planBoot() boots as Linux).
 */
export function isMultibootKernel(head: Uint8Array): boolean {
  try {
    return !isBzImage(head) && findMultibootHeader(head) !== null;
  } catch {
    return false; // a damaged header: planBoot() says what is wrong with it
  }
}

/** Why `image` cannot take Multiboot modules: what it is instead. */
export function notMultibootReason(image: Uint8Array): string {
  if (isBzImage(image)) return 'a Linux bzImage, which takes one initrd';
  return `${isElf(image) ? 'an ELF file' : 'a file'} without a Multiboot header in its first 8 KiB`;
}

/** Checks the modules option's shape; returns it as an array. */
export function checkModules(modules: unknown): readonly MultibootModule[] {
  if (!Array.isArray(modules)) throw argTypeError('modules must be an array of { data, cmdline }');
  modules.forEach((module: unknown, index) => {
    if (typeof module !== 'object' || module === null) throw argTypeError(`modules[${index}] must be an object { data, cmdline }`);
    const { data, cmdline } = module as { data?: unknown; cmdline?: unknown };
    if (!(data instanceof Uint8Array)) throw argTypeError(`modules[${index}].data must be a Uint8Array`);
    if (cmdline !== undefined && typeof cmdline !== 'string') throw argTypeError(`modules[${index}].cmdline must be a string`);
  });
  return modules as MultibootModule[];
}

/**
 * Places `modules` in order, each on a page boundary (as header flags bit 0 may require, and as
 * QEMU and GRUB always do), from the first page at or above both `above` and 1 MiB: clear of the
 * kernel and of the loader's structures in low memory. The caller checks the regions against RAM.
 */
export function placeModules(modules: readonly MultibootModule[], above: number): PlacedModule[] {
  let next = alignUp(Math.max(above, HIGH_RAM_START), PAGE_SIZE);
  return modules.map((module, index) => {
    const text = module.cmdline ?? '';
    const shown = text.length > 60 ? `${text.slice(0, 57)}...` : text;
    const what = `Multiboot module ${index}${text ? ` (${JSON.stringify(shown)})` : ''}`;
    const encoded = new TextEncoder().encode(text);
    if (encoded.includes(0)) throw new BootImageError(`the string of ${what} contains a NUL character`);
    const string = new Uint8Array(encoded.length + 1);
    string.set(encoded);
    const start = next;
    const end = start + module.data.length;
    if (end > FOUR_GIB) {
      throw new BootImageError(`${what} (${formatBytes(module.data.length)}) would end at ${hex(end)}, above 4 GiB, where Multiboot's 32-bit mod_end cannot reach`);
    }
    next = alignUp(end, PAGE_SIZE);
    return { start, end, data: module.data, string, what };
  });
}

/** The guest RAM each placed module occupies, for the loader's region checks. */
export const moduleRegions = (modules: readonly PlacedModule[]): Region[] => modules.map(({ start, end, what }) => ({ start, end, what }));

const alignUp = (value: number, align: number): number => Math.ceil(value / align) * align;

/**
 * The module list (mods_addr) and the modules' strings, in the boot information area; throws a
 * BootImageError when they do not fit beside what is there already. Returns mods_addr.
 */
function putModuleList(block: BootInfoBlock, modules: readonly PlacedModule[]): number {
  const bytesLeft = block.bytesLeft;
  try {
    const list = block.alloc(modules.length * MODULE_ENTRY_BYTES, 8, 'the Multiboot module list');
    modules.forEach((module, index) => {
      const o = block.at(list) + index * MODULE_ENTRY_BYTES;
      block.view.setUint32(o, module.start, true);
      block.view.setUint32(o + 4, module.end, true);
      block.view.setUint32(o + 8, putString(block, module.string, `the string of ${module.what}`), true);
      block.view.setUint32(o + 12, 0, true);
    });
    return list;
  } catch (error) {
    if (!(error instanceof BootImageError)) throw error;
    const stringBytes = modules.reduce((sum, module) => sum + module.string.length, 0);
    throw new BootImageError(
      `${modules.length} Multiboot modules do not fit in the boot information area [${hex(BOOT_INFO_ADDR)}, ${hex(BOOT_INFO_END)}): ` +
        `their list (${MODULE_ENTRY_BYTES} bytes a module) and strings (${stringBytes} bytes with their NULs) need ${modules.length * MODULE_ENTRY_BYTES + stringBytes} bytes, ` +
        `and ${bytesLeft} are left beside the multiboot_info, memory map and command line: give fewer modules, or shorter strings`,
    );
  }
}

/**
 * struct multiboot_info with mem_lower/mem_upper, the memory map, the boot loader's name, the
 * command line (when given) and the module list (when there are modules, placed by
 * placeModules()). Returns its address (for EBX).
 */
export function putMultibootInfo(block: BootInfoBlock, memoryBytes: number, cmdline: Uint8Array | null, modules: readonly PlacedModule[] = []): number {
  const info = block.alloc(INFO_BYTES, 8, 'multiboot_info');
  const map = memoryMap(memoryBytes);
  const mmap = block.alloc(map.length * MMAP_ENTRY_BYTES, 8, 'the memory map');
  const v = block.view;
  map.forEach((entry, i) => {
    // Each entry starts with its size, which does not count the size field itself.
    const o = block.at(mmap) + i * MMAP_ENTRY_BYTES;
    v.setUint32(o, MMAP_ENTRY_BYTES - 4, true);
    v.setBigUint64(o + 4, entry.addr, true);
    v.setBigUint64(o + 12, entry.size, true);
    v.setUint32(o + 20, entry.type, true);
  });
  const name = putString(block, new TextEncoder().encode('node-kvm\0'), 'the boot loader name');
  const cmdlineAddr = cmdline ? putString(block, cmdline, 'the command line') : 0;
  const modsAddr = modules.length > 0 ? putModuleList(block, modules) : 0;
  const o = block.at(info);
  let flags = InfoFlag.Memory | InfoFlag.MemoryMap | InfoFlag.BootLoaderName;
  if (cmdline) flags |= InfoFlag.Cmdline;
  if (modules.length > 0) flags |= InfoFlag.Modules;
  v.setUint32(o, flags, true);
  // mem_lower: KiB from 0; mem_upper: KiB from 1 MiB to the first hole (section 3.3).
  v.setUint32(o + 4, Math.min(memoryBytes, LOW_RAM_END) >>> 10, true);
  v.setUint32(o + 8, Math.min(Math.max(memoryBytes - HIGH_RAM_START, 0) / 1024, 0xffffffff), true);
  v.setUint32(o + 16, cmdlineAddr, true);
  v.setUint32(o + 20, modules.length, true);
  v.setUint32(o + 24, modsAddr, true);
  v.setUint32(o + 44, map.length * MMAP_ENTRY_BYTES, true);
  v.setUint32(o + 48, mmap, true);
  v.setUint32(o + 64, name, true);
  return info;
}
