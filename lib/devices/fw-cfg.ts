// QEMU's firmware configuration interface (fw_cfg), as QEMU's docs/specs/fw_cfg.rst describes it
// for x86: a selector port (0x510, 16-bit writes), a data port (0x511, byte reads that stream the
// selected item) and the DMA address register (0x514, 8 bytes, big-endian) through which the
// guest hands over a FWCfgDmaAccess descriptor. Kernels written for QEMU read the CPU count, RAM
// size, command line and memory map here.
//
// The items are plain bytes built once on the main thread (fwCfgItems()) into a SharedArrayBuffer
// that each vCPU thread copies on its first access (and again after a restore changed them); the
// selector, the offset into the item and the DMA address's high half live in a second one. A DMA transfer reads its descriptor from guest RAM and writes the
// item and the result there: every range is checked against guest RAM first, so a hostile
// descriptor gets the ERROR bit, never a touch of anything else (nor a throw).
import type { DirtyPageMarker, PortDevice } from './bus-device.js';
import { argTypeError, argValueError, outOfRangeError } from '../kvm/errors.js';

/** The selector (16-bit writes) at 0x510; the data register at 0x511. */
export const FW_CFG_PORT = 0x510;
export const FW_CFG_PORTS = 2;
/** The DMA address register: 0x514 (high half) and 0x518 (low half, which starts the transfer). */
export const FW_CFG_DMA_PORT = 0x514;
export const FW_CFG_DMA_PORTS = 8;

/** Selector keys (QEMU's include/standard-headers/linux/qemu_fw_cfg.h names). */
export const FwCfgKey = {
  Signature: 0x0000,
  Id: 0x0001,
  RamSize: 0x0003,
  NbCpus: 0x0005,
  MaxCpus: 0x000f,
  CmdlineSize: 0x0014,
  CmdlineData: 0x0015,
  FileDir: 0x0019,
  /** Files get keys from here up, in the order of their names. */
  FileFirst: 0x0020,
} as const;

/** FW_CFG_ID bits: the port interface, and the DMA interface. */
export const FW_CFG_ID_TRADITIONAL = 0x01;
export const FW_CFG_ID_DMA = 0x02;

/** FWCfgDmaAccess.control bits (fw_cfg.rst, "Guest-side DMA Interface"); SELECT's key is in bits 16-31. */
export const FwCfgDma = { Error: 0x01, Read: 0x02, Skip: 0x04, Select: 0x08, Write: 0x10 } as const;
/** FWCfgDmaAccess: u32 control, u32 length, u64 address, all big-endian. */
export const FW_CFG_DMA_ACCESS_BYTES = 16;
/** What the DMA address register reads as: "QEMU CFG", the first byte at 0x514. */
export const FW_CFG_DMA_SIGNATURE = new Uint8Array([0x51, 0x45, 0x4d, 0x55, 0x20, 0x43, 0x46, 0x47]);

/** A file directory entry: u32 size, u16 select, u16 reserved (big-endian), then the name. */
export const FW_CFG_FILE_ENTRY_BYTES = 64;
/** Name bytes per directory entry, including at least one NUL. */
export const FW_CFG_FILE_NAME_BYTES = 56;
/** An etc/e820 entry: u64 address, u64 length, u32 type, little-endian, packed. */
export const FW_CFG_E820_ENTRY_BYTES = 20;
/** Bytes of items a machine may hold (what a restored state may bring, too). */
export const MAX_FW_CFG_BYTES = 1024 * 1024;

/** One item: its selector key and its bytes. */
export interface FwCfgItem {
  key: number;
  data: Uint8Array;
}

/** A memory map entry as the loader reports it (lib/boot's MemoryMapEntry). */
export interface FwCfgMemoryMapEntry {
  addr: bigint;
  size: bigint;
  type: number;
}

/** What fw_cfg tells the guest about its machine. */
export interface FwCfgMachine {
  memoryBytes: number;
  vcpus: number;
  /** The kernel command line the machine was booted with; absent: none. */
  cmdline?: string;
  /** The machine's memory map, which etc/e820 carries. */
  memoryMap: readonly FwCfgMemoryMapEntry[];
}

/** fw_cfg's state in a snapshot: its registers and its items (so a migrated guest reads the same answers). */
export interface FwCfgState {
  selector: number;
  offset: number;
  dmaAddressHigh: number;
  items: FwCfgItem[];
}

export interface FwCfgShared {
  /** Int32Array: the selector, the offset into the selected item, the DMA address's high half. */
  readonly registers: SharedArrayBuffer;
  /** The items (growable, so a restored state may bring more than this machine was built with). */
  readonly contents: SharedArrayBuffer;
}

/** Guest RAM, as a DMA transfer reaches it. */
export interface FwCfgGuestRam {
  /** All of guest RAM from guest-physical 0; asked for on the first transfer only. */
  bytes(): Uint8Array;
  /** Where the pages a transfer writes are marked. */
  readonly dirty: DirtyPageMarker;
}

// Registers, one Int32 each.
const R_SELECTOR = 0;
const R_OFFSET = 1;
const R_DMA_HIGH = 2;
/** Counts restores: an instance whose copy of the items is older makes a new one. */
const R_GENERATION = 3;
const REGISTER_INTS = 4;

// The contents: u32 count, then per item u32 key, u32 offset, u32 length (little-endian), then the bytes.
const CONTENTS_HEADER_BYTES = 4;
const CONTENTS_ENTRY_BYTES = 12;

const littleEndian = (bytes: number, write: (view: DataView) => void): Uint8Array => {
  const data = new Uint8Array(bytes);
  write(new DataView(data.buffer));
  return data;
};

/** The file directory item (FW_CFG_FILE_DIR) for files given keys FileFirst, FileFirst + 1, ... in this order. */
export function encodeFileDir(files: readonly { name: string; size: number }[]): Uint8Array {
  const dir = new Uint8Array(4 + files.length * FW_CFG_FILE_ENTRY_BYTES);
  const view = new DataView(dir.buffer);
  view.setUint32(0, files.length);
  const encoder = new TextEncoder();
  files.forEach((file, index) => {
    const at = 4 + index * FW_CFG_FILE_ENTRY_BYTES;
    const name = encoder.encode(file.name);
    if (name.length >= FW_CFG_FILE_NAME_BYTES || name.includes(0)) throw argValueError(`fw_cfg file name '${file.name}' must be 1..${FW_CFG_FILE_NAME_BYTES - 1} bytes without NUL`);
    view.setUint32(at, file.size);
    view.setUint16(at + 4, FwCfgKey.FileFirst + index);
    dir.set(name, at + 8);
  });
  return dir;
}

/** etc/e820: the memory map as QEMU's struct e820_entry array. */
export function encodeE820(map: readonly FwCfgMemoryMapEntry[]): Uint8Array {
  const data = new Uint8Array(map.length * FW_CFG_E820_ENTRY_BYTES);
  const view = new DataView(data.buffer);
  map.forEach((entry, index) => {
    const at = index * FW_CFG_E820_ENTRY_BYTES;
    view.setBigUint64(at, entry.addr, true);
    view.setBigUint64(at + 8, entry.size, true);
    view.setUint32(at + 16, entry.type, true);
  });
  return data;
}

/** Every item of a machine, sorted by key: the fixed items, the command line, the file directory and its files. */
export function fwCfgItems(machine: FwCfgMachine): FwCfgItem[] {
  const { memoryBytes, vcpus, cmdline, memoryMap } = machine;
  if (!Number.isSafeInteger(memoryBytes) || memoryBytes < 0) throw outOfRangeError(`memoryBytes must be a non-negative integer, got ${memoryBytes}`);
  if (!Number.isInteger(vcpus) || vcpus < 1 || vcpus > 0xffff) throw outOfRangeError(`vcpus must be an integer 1..65535, got ${vcpus}`);
  let cmdlineData = new Uint8Array(0);
  if (cmdline !== undefined) {
    if (typeof cmdline !== 'string') throw argTypeError(`cmdline must be a string, got ${typeof cmdline}`);
    const text = new TextEncoder().encode(cmdline);
    if (text.includes(0)) throw argValueError('the command line contains a NUL character');
    cmdlineData = new Uint8Array(text.length + 1); // NUL-terminated, as QEMU's fw_cfg_add_string
    cmdlineData.set(text);
  }
  // Files in the order of their names, as QEMU's (non-legacy) machines sort them.
  const files = [{ name: 'etc/e820', data: encodeE820(memoryMap) }];
  files.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  const items: FwCfgItem[] = [
    { key: FwCfgKey.Signature, data: new Uint8Array([0x51, 0x45, 0x4d, 0x55]) }, // "QEMU"
    { key: FwCfgKey.Id, data: littleEndian(4, (v) => v.setUint32(0, FW_CFG_ID_TRADITIONAL | FW_CFG_ID_DMA, true)) },
    { key: FwCfgKey.RamSize, data: littleEndian(8, (v) => (v.setUint32(0, memoryBytes % 2 ** 32, true), v.setUint32(4, Math.floor(memoryBytes / 2 ** 32), true))) },
    { key: FwCfgKey.NbCpus, data: littleEndian(2, (v) => v.setUint16(0, vcpus, true)) },
    // No CPU hotplug: the most CPUs the guest may see are the ones it has.
    { key: FwCfgKey.MaxCpus, data: littleEndian(2, (v) => v.setUint16(0, vcpus, true)) },
    { key: FwCfgKey.CmdlineSize, data: littleEndian(4, (v) => v.setUint32(0, cmdlineData.length, true)) },
    { key: FwCfgKey.CmdlineData, data: cmdlineData },
    { key: FwCfgKey.FileDir, data: encodeFileDir(files.map((file) => ({ name: file.name, size: file.data.length }))) },
    ...files.map((file, index) => ({ key: FwCfgKey.FileFirst + index, data: file.data })),
  ];
  return items;
}

/** Checks items (keys 0..0xffff, each once; bytes; at most MAX_FW_CFG_BYTES in all) and returns the bytes they need. */
function contentsBytes(items: readonly FwCfgItem[]): number {
  if (!Array.isArray(items)) throw argTypeError('fw_cfg items must be an array');
  const keys = new Set<number>();
  let bytes = CONTENTS_HEADER_BYTES;
  for (const item of items) {
    if (typeof item !== 'object' || item === null || !(item.data instanceof Uint8Array)) throw argTypeError('each fw_cfg item must be { key, data: Uint8Array }');
    if (!Number.isInteger(item.key) || item.key < 0 || item.key > 0xffff) throw outOfRangeError(`fw_cfg item key must be 0..0xffff, got ${String(item.key)}`);
    if (keys.has(item.key)) throw argValueError(`fw_cfg item key 0x${item.key.toString(16)} appears twice`);
    keys.add(item.key);
    bytes += CONTENTS_ENTRY_BYTES + item.data.length;
    if (bytes > MAX_FW_CFG_BYTES) throw outOfRangeError(`fw_cfg items must fit in ${MAX_FW_CFG_BYTES} bytes`);
  }
  return bytes;
}

function writeContents(contents: SharedArrayBuffer, items: readonly FwCfgItem[]): void {
  const view = new DataView(contents);
  const bytes = new Uint8Array(contents);
  view.setUint32(0, items.length, true);
  let dataAt = CONTENTS_HEADER_BYTES + items.length * CONTENTS_ENTRY_BYTES;
  items.forEach((item, index) => {
    const at = CONTENTS_HEADER_BYTES + index * CONTENTS_ENTRY_BYTES;
    view.setUint32(at, item.key, true);
    view.setUint32(at + 4, dataAt, true);
    view.setUint32(at + 8, item.data.length, true);
    bytes.set(item.data, dataAt);
    dataAt += item.data.length;
  });
}

const isUint32 = (value: unknown): value is number => Number.isInteger(value) && (value as number) >= 0 && (value as number) <= 0xffffffff;

/** Whether `value` has the structure of a saved FwCfgState (a stream from elsewhere is checked before use). */
export function isFwCfgState(value: unknown): value is FwCfgState {
  if (typeof value !== 'object' || value === null) return false;
  const state = value as Record<string, unknown>;
  return Number.isInteger(state.selector) && (state.selector as number) >= 0 && (state.selector as number) <= 0xffff &&
    isUint32(state.offset) && isUint32(state.dmaAddressHigh) && Array.isArray(state.items) &&
    state.items.every((item: unknown) => typeof item === 'object' && item !== null && Number.isInteger((item as FwCfgItem).key) && (item as FwCfgItem).data instanceof Uint8Array);
}

export class FwCfg {
  /** Ports 0x510-0x511: a 16-bit write at 0x510 selects; byte reads at either port stream the item. */
  readonly port: PortDevice;
  /** Ports 0x514-0x51b: the DMA address register. */
  readonly dmaPort: PortDevice;
  readonly #registers: Int32Array;
  readonly #contents: SharedArrayBuffer;
  readonly #ram: FwCfgGuestRam | null;
  #ramBytes: Uint8Array | null = null;
  // This thread's copy of the items, read without touching shared memory on every byte.
  #items = new Map<number, Uint8Array>();
  #itemsGeneration = -1;

  /** `ram` absent: no DMA (a transfer sets nothing; the main thread's instance, which only saves and restores). */
  constructor(shared: FwCfgShared, ram: FwCfgGuestRam | null = null) {
    this.#registers = new Int32Array(shared.registers);
    this.#contents = shared.contents;
    this.#ram = ram;
    this.port = {
      name: 'fw-cfg',
      read: (_offset, size) => (size === 1 ? this.#readData() : 0),
      write: (offset, size, value) => {
        // Data writes are ignored, as in QEMU since 2.4.
        if (offset === 0 && size === 2) this.#select(value & 0xffff);
      },
    };
    this.dmaPort = {
      name: 'fw-cfg-dma',
      read: (offset, size) => {
        let value = 0;
        for (let i = size - 1; i >= 0; i--) value = value * 256 + (FW_CFG_DMA_SIGNATURE[offset + i] ?? 0);
        return value;
      },
      write: (offset, size, value) => {
        if (size !== 4) return;
        // The register is big-endian: the guest's first byte is the most significant.
        const half = swap32(value);
        if (offset === 0) Atomics.store(this.#registers, R_DMA_HIGH, half | 0);
        else if (offset === 4) this.#transfer((Atomics.exchange(this.#registers, R_DMA_HIGH, 0) >>> 0) * 2 ** 32 + half);
      },
    };
  }

  /** Shared state for a machine's items (from fwCfgItems()), selector 0 (the signature) at offset 0. */
  static createShared(items: readonly FwCfgItem[]): FwCfgShared {
    const bytes = contentsBytes(items);
    const contents = new SharedArrayBuffer(bytes, { maxByteLength: MAX_FW_CFG_BYTES });
    writeContents(contents, items);
    return { registers: new SharedArrayBuffer(REGISTER_INTS * 4), contents };
  }

  get selector(): number {
    return Atomics.load(this.#registers, R_SELECTOR) & 0xffff;
  }

  get offset(): number {
    return Atomics.load(this.#registers, R_OFFSET) >>> 0;
  }

  /** A copy of the bytes of the item under `key`, or null where there is none. */
  item(key: number): Uint8Array | null {
    return this.#item(key)?.slice() ?? null;
  }

  /** The machine must be paused: the vCPUs read the contents without a lock. */
  saveState(): FwCfgState {
    const items = [...this.#currentItems()].map(([key, data]) => ({ key, data: data.slice() }));
    return { selector: this.selector, offset: this.offset, dmaAddressHigh: Atomics.load(this.#registers, R_DMA_HIGH) >>> 0, items };
  }

  /** The machine must be paused. Throws (and changes nothing) for a state that does not hold together. */
  restoreState(state: FwCfgState): void {
    if (!isFwCfgState(state)) throw argTypeError('not an fw_cfg state: { selector, offset, dmaAddressHigh, items }');
    const bytes = contentsBytes(state.items);
    if (bytes > this.#contents.byteLength) this.#contents.grow(bytes);
    writeContents(this.#contents, state.items);
    Atomics.add(this.#registers, R_GENERATION, 1);
    Atomics.store(this.#registers, R_SELECTOR, state.selector);
    Atomics.store(this.#registers, R_OFFSET, state.offset | 0);
    Atomics.store(this.#registers, R_DMA_HIGH, state.dmaAddressHigh | 0);
  }

  /** The items as the shared contents hold them now (copied again after a restore). */
  #currentItems(): Map<number, Uint8Array> {
    const generation = Atomics.load(this.#registers, R_GENERATION);
    if (generation !== this.#itemsGeneration) {
      const view = new DataView(this.#contents);
      const items = new Map<number, Uint8Array>();
      for (let index = 0, at = CONTENTS_HEADER_BYTES; index < view.getUint32(0, true); index++, at += CONTENTS_ENTRY_BYTES) {
        const start = view.getUint32(at + 4, true);
        items.set(view.getUint32(at, true), new Uint8Array(this.#contents, start, view.getUint32(at + 8, true)).slice());
      }
      this.#items = items;
      this.#itemsGeneration = generation;
    }
    return this.#items;
  }

  #item(key: number): Uint8Array | undefined {
    return this.#currentItems().get(key);
  }

  #select(key: number): void {
    Atomics.store(this.#registers, R_SELECTOR, key);
    Atomics.store(this.#registers, R_OFFSET, 0);
  }

  /** The next byte of the selected item; 0 past its end (and for a key with no item). */
  #readData(): number {
    const item = this.#item(this.selector);
    const offset = this.offset;
    if (item === undefined || offset >= item.length) return 0;
    Atomics.store(this.#registers, R_OFFSET, (offset + 1) | 0);
    return item[offset]!;
  }

  /**
   * Runs the transfer the FWCfgDmaAccess at `descriptorAddr` asks for, as QEMU does: SELECT
   * first, then READ (or else WRITE, or else SKIP) `length` bytes at the offset, zeros past the
   * item's end; the control word is written back 0, or ERROR. No item is writable, so a WRITE
   * of any bytes fails. A transfer whose target is not all in guest RAM fails whole, moving
   * nothing.
   */
  #transfer(descriptorAddr: number): void {
    const ram = this.#guestRam();
    if (ram === null) return;
    const inRam = (addr: number, length: number) => addr <= ram.length && length <= ram.length - addr;
    if (!inRam(descriptorAddr, FW_CFG_DMA_ACCESS_BYTES)) {
      // Nowhere to read the request from: the error goes where its control word would be, if that much is RAM.
      if (inRam(descriptorAddr, 4)) this.#complete(ram, descriptorAddr, FwCfgDma.Error);
      return;
    }
    const descriptor = new DataView(ram.buffer, ram.byteOffset + descriptorAddr, FW_CFG_DMA_ACCESS_BYTES);
    const control = descriptor.getUint32(0);
    const length = descriptor.getUint32(4);
    const address = descriptor.getUint32(8) * 2 ** 32 + descriptor.getUint32(12);
    if (control & FwCfgDma.Select) this.#select(control >>> 16);
    if (!(control & (FwCfgDma.Read | FwCfgDma.Write | FwCfgDma.Skip)) || length === 0) {
      this.#complete(ram, descriptorAddr, 0);
      return;
    }
    if (!(control & FwCfgDma.Read) && control & FwCfgDma.Write) {
      this.#complete(ram, descriptorAddr, FwCfgDma.Error);
      return;
    }
    const item = this.#item(this.selector);
    const offset = this.offset;
    const moved = Math.min(length, Math.max((item?.length ?? 0) - offset, 0));
    if (control & FwCfgDma.Read) {
      if (!inRam(address, length)) {
        this.#complete(ram, descriptorAddr, FwCfgDma.Error);
        return;
      }
      if (item !== undefined) ram.set(item.subarray(offset, offset + moved), address);
      ram.fill(0, address + moved, address + length);
      this.#ram!.dirty.mark(address, length);
    }
    Atomics.store(this.#registers, R_OFFSET, (offset + moved) | 0);
    this.#complete(ram, descriptorAddr, 0);
  }

  #complete(ram: Uint8Array, descriptorAddr: number, control: number): void {
    new DataView(ram.buffer, ram.byteOffset + descriptorAddr, 4).setUint32(0, control);
    this.#ram!.dirty.mark(descriptorAddr, 4);
  }

  /** Guest RAM, or null where this instance has none (or it cannot be had: the transfer then does nothing). */
  #guestRam(): Uint8Array | null {
    if (this.#ramBytes === null && this.#ram !== null) {
      try {
        this.#ramBytes = this.#ram.bytes();
      } catch {
        return null;
      }
    }
    return this.#ramBytes;
  }
}

const swap32 = (value: number): number => (((value & 0xff) << 24) | ((value & 0xff00) << 8) | ((value >>> 8) & 0xff00) | (value >>> 24)) >>> 0;
