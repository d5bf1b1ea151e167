// The boot information block at BOOT_INFO_ADDR: what a kernel is told about its machine. PVH's
// hvm_start_info (Xen's public arch-x86/hvm/start_info.h, version 1) is built here; the
// Multiboot info is in multiboot.ts. Both go into one BootInfoBlock.
import { argTypeError } from '../kvm/errors.js';
import { BootImageError } from './errors.js';
import { BOOT_INFO_ADDR, BOOT_INFO_END, memoryMap } from './layout.js';

/** `hvm_start_info.magic` ("xEn3" with bit 7 of the "E" set), as the PVH boot protocol defines it. */
export const HVM_START_MAGIC = 0x336ec578;
const HVM_START_INFO_BYTES = 56;
const HVM_MEMMAP_ENTRY_BYTES = 24;
/** Longest command line accepted, in bytes without the terminating NUL. */
export const MAX_CMDLINE_BYTES = 4095;

/** Space for boot information in [BOOT_INFO_ADDR, BOOT_INFO_END), handed out front to back. */
export class BootInfoBlock {
  readonly base = BOOT_INFO_ADDR;
  readonly #bytes = new Uint8Array(BOOT_INFO_END - BOOT_INFO_ADDR);
  readonly view = new DataView(this.#bytes.buffer);
  #used = 0;

  /** Reserves `size` bytes aligned to `align`; returns their guest-physical address. */
  alloc(size: number, align = 8, what = 'boot information'): number {
    const start = (this.#used + align - 1) & ~(align - 1);
    if (start + size > this.#bytes.length) {
      throw new BootImageError(`${what} (${size} bytes) does not fit in the boot information area [0x${this.base.toString(16)}, 0x${BOOT_INFO_END.toString(16)})`);
    }
    this.#used = start + size;
    return this.base + start;
  }

  /** Offset into view of guest-physical address `addr`. */
  at(addr: number): number {
    return addr - this.base;
  }

  put(addr: number, data: Uint8Array): void {
    this.#bytes.set(data, addr - this.base);
  }

  /** Bytes not handed out yet, before any alignment. */
  get bytesLeft(): number {
    return this.#bytes.length - this.#used;
  }

  /** The used part of the block. */
  get data(): Uint8Array {
    return this.#bytes.slice(0, this.#used);
  }
}

/** The command line as the NUL-terminated bytes a kernel reads. */
export function encodeCmdline(cmdline: string): Uint8Array {
  if (typeof cmdline !== 'string') throw argTypeError(`cmdline must be a string, got ${typeof cmdline}`);
  const text = new TextEncoder().encode(cmdline);
  if (text.includes(0)) throw new BootImageError('the command line contains a NUL character');
  if (text.length > MAX_CMDLINE_BYTES) throw new BootImageError(`the command line is ${text.length} bytes; at most ${MAX_CMDLINE_BYTES} fit`);
  const bytes = new Uint8Array(text.length + 1);
  bytes.set(text);
  return bytes;
}

/** Places a NUL-terminated string in `block`; returns its address. */
export function putString(block: BootInfoBlock, bytes: Uint8Array, what: string): number {
  const addr = block.alloc(bytes.length, 1, what);
  block.put(addr, bytes);
  return addr;
}

/**
 * struct hvm_start_info with its memory map (hvm_memmap_table_entry[]) and command line.
 * `rsdp` is the ACPI RSDP's address (0: no ACPI tables). Returns the structure's address (for EBX).
 */
export function putHvmStartInfo(block: BootInfoBlock, memoryBytes: number, cmdline: Uint8Array | null, rsdp = 0): number {
  const info = block.alloc(HVM_START_INFO_BYTES, 8, 'hvm_start_info');
  const map = memoryMap(memoryBytes);
  const memmap = block.alloc(map.length * HVM_MEMMAP_ENTRY_BYTES, 8, 'the memory map');
  const v = block.view;
  map.forEach((entry, i) => {
    const o = block.at(memmap) + i * HVM_MEMMAP_ENTRY_BYTES;
    v.setBigUint64(o, entry.addr, true);
    v.setBigUint64(o + 8, entry.size, true);
    v.setUint32(o + 16, entry.type, true);
    v.setUint32(o + 20, 0, true);
  });
  const cmdlineAddr = cmdline ? putString(block, cmdline, 'the command line') : 0;
  const o = block.at(info);
  v.setUint32(o, HVM_START_MAGIC, true);
  v.setUint32(o + 4, 1, true); // version: 1 has the memmap fields
  v.setUint32(o + 8, 0, true); // flags
  v.setUint32(o + 12, 0, true); // nr_modules
  v.setBigUint64(o + 16, 0n, true); // modlist_paddr
  v.setBigUint64(o + 24, BigInt(cmdlineAddr), true);
  v.setBigUint64(o + 32, BigInt(rsdp), true); // rsdp_paddr
  v.setBigUint64(o + 40, BigInt(memmap), true);
  v.setUint32(o + 48, map.length, true);
  v.setUint32(o + 52, 0, true);
  return info;
}
