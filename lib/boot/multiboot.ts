// Multiboot v1 (the Multiboot Specification 0.6.96): the header a kernel carries in its first
// 8 KiB, and the multiboot_info the loader hands it in EBX.
import { BootInfoBlock, putString } from './boot-info.js';
import { BootImageError, hex } from './errors.js';
import { HIGH_RAM_START, LOW_RAM_END, memoryMap } from './layout.js';

export const MULTIBOOT_HEADER_MAGIC = 0x1badb002;
/** In EAX at entry: the kernel was loaded by a Multiboot-compliant loader. */
export const MULTIBOOT_BOOTLOADER_MAGIC = 0x2badb002;
const SEARCH_BYTES = 8192;

/** Header flags (section 3.1.2). Bits 0-15 are requirements the loader must meet or refuse. */
const HeaderFlag = { PageAlign: 1 << 0, MemoryInfo: 1 << 1, VideoMode: 1 << 2, AoutKludge: 1 << 16 } as const;
const SUPPORTED_REQUIREMENTS = HeaderFlag.PageAlign | HeaderFlag.MemoryInfo;

/** multiboot_info.flags (section 3.3). */
export const InfoFlag = { Memory: 1 << 0, Cmdline: 1 << 2, MemoryMap: 1 << 6, BootLoaderName: 1 << 9 } as const;
const INFO_BYTES = 120;
const MMAP_ENTRY_BYTES = 24;

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
  const limit = Math.min(SEARCH_BYTES, image.length) - 12;
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
 * struct multiboot_info with mem_lower/mem_upper, the memory map, the boot loader's name and the
 * command line (when given). Returns its address (for EBX).
 */
export function putMultibootInfo(block: BootInfoBlock, memoryBytes: number, cmdline: Uint8Array | null): number {
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
  const o = block.at(info);
  let flags = InfoFlag.Memory | InfoFlag.MemoryMap | InfoFlag.BootLoaderName;
  if (cmdline) flags |= InfoFlag.Cmdline;
  v.setUint32(o, flags, true);
  // mem_lower: KiB from 0; mem_upper: KiB from 1 MiB to the first hole (section 3.3).
  v.setUint32(o + 4, Math.min(memoryBytes, LOW_RAM_END) >>> 10, true);
  v.setUint32(o + 8, Math.min(Math.max(memoryBytes - HIGH_RAM_START, 0) / 1024, 0xffffffff), true);
  v.setUint32(o + 16, cmdlineAddr, true);
  v.setUint32(o + 44, map.length * MMAP_ENTRY_BYTES, true);
  v.setUint32(o + 48, mmap, true);
  v.setUint32(o + 64, name, true);
  return info;
}
