// Guest-virtual (linear) to guest-physical addresses, through the vCPU's page tables as its
// control registers describe them (Intel SDM vol. 3A, chapter 4 "Paging"): no paging, 32-bit
// paging (4 KiB and, with CR4.PSE, 4 MiB pages), PAE, and 4-level or (CR4.LA57) 5-level long-mode
// paging with 2 MiB and 1 GiB pages. The walk runs on the main thread over guest RAM, with the
// state the vCPU had when it stopped: KVM_TRANSLATE would have to run on the vCPU's own thread.
// A table outside guest RAM, or an entry not present, is a fault: gdb shows the address as not
// accessible.

const CR0_PG = 1n << 31n;
const CR4_PSE = 1n << 4n;
const CR4_PAE = 1n << 5n;
const CR4_LA57 = 1n << 12n;
const EFER_LMA = 1n << 10n;
const PRESENT = 1n;
const PAGE_SIZE_BIT = 1n << 7n;
/** Bits 12-51 of a 64-bit entry: the next table's or the page's frame (bit 63, NX, excluded). */
const ADDRESS_MASK = 0x000ffffffffff000n;

export interface PagingState {
  cr0: bigint;
  cr3: bigint;
  cr4: bigint;
  efer: bigint;
}

export type PagingMode = 'none' | '32-bit' | 'pae' | '4-level' | '5-level';

export function pagingMode(state: PagingState): PagingMode {
  if ((state.cr0 & CR0_PG) === 0n) return 'none';
  if ((state.efer & EFER_LMA) !== 0n) return (state.cr4 & CR4_LA57) !== 0n ? '5-level' : '4-level';
  return (state.cr4 & CR4_PAE) !== 0n ? 'pae' : '32-bit';
}

/** Reads guest RAM: an entry of `bytes` (4 or 8) at a guest-physical address, null outside RAM. */
export type PhysicalReader = (guestPhysAddr: bigint, bytes: 4 | 8) => bigint | null;

/**
 * The guest-physical address behind `linear`, or null if the vCPU could not reach it (not
 * mapped, not canonical, or a table outside RAM).
 */
export function translate(linear: bigint, state: PagingState, read: PhysicalReader): bigint | null {
  const mode = pagingMode(state);
  switch (mode) {
    case 'none':
      // Without paging, linear addresses are physical (32 bits wide outside long mode).
      return linear & 0xffffffffn;
    case '32-bit':
      return walk32(linear & 0xffffffffn, state, read);
    case 'pae':
      return walkPae(linear & 0xffffffffn, state, read);
    default:
      return walkLong(linear, mode === '5-level' ? 5 : 4, state, read);
  }
}

function walk32(linear: bigint, state: PagingState, read: PhysicalReader): bigint | null {
  const pde = read((state.cr3 & 0xfffff000n) + ((linear >> 22n) & 0x3ffn) * 4n, 4);
  if (pde === null || (pde & PRESENT) === 0n) return null;
  if ((pde & PAGE_SIZE_BIT) !== 0n && (state.cr4 & CR4_PSE) !== 0n) {
    // A 4 MiB page: bits 22-31 of the frame from the entry, 32-39 from its bits 13-20 (PSE-36).
    const frame = (pde & 0xffc00000n) | (((pde >> 13n) & 0xffn) << 32n);
    return frame | (linear & 0x3fffffn);
  }
  const pte = read((pde & 0xfffff000n) + ((linear >> 12n) & 0x3ffn) * 4n, 4);
  if (pte === null || (pte & PRESENT) === 0n) return null;
  return (pte & 0xfffff000n) | (linear & 0xfffn);
}

function walkPae(linear: bigint, state: PagingState, read: PhysicalReader): bigint | null {
  // CR3 holds the 32-byte aligned table of four PDPTEs.
  const pdpte = read((state.cr3 & 0xffffffe0n) + ((linear >> 30n) & 3n) * 8n, 8);
  if (pdpte === null || (pdpte & PRESENT) === 0n) return null;
  return walkLevels(linear, pdpte & ADDRESS_MASK, [21n, 12n], read);
}

function walkLong(linear: bigint, levels: 4 | 5, state: PagingState, read: PhysicalReader): bigint | null {
  const width = levels === 5 ? 57n : 48n;
  // Canonical: the bits above the width repeat its top bit.
  const top = linear >> (width - 1n);
  if (top !== 0n && top !== (1n << (65n - width)) - 1n) return null;
  const shifts = levels === 5 ? [48n, 39n, 30n, 21n, 12n] : [39n, 30n, 21n, 12n];
  return walkLevels(linear, state.cr3 & ADDRESS_MASK, shifts, read);
}

/**
 * Walks 64-bit tables from `table`, one level per shift (the index is the 9 bits at the shift).
 * A set PS bit at 1 GiB (shift 30) or 2 MiB (shift 21) ends the walk at a large page.
 */
function walkLevels(linear: bigint, table: bigint, shifts: bigint[], read: PhysicalReader): bigint | null {
  for (const shift of shifts) {
    const entry = read(table + ((linear >> shift) & 0x1ffn) * 8n, 8);
    if (entry === null || (entry & PRESENT) === 0n) return null;
    const pageMask = (1n << shift) - 1n;
    if (shift === 12n || ((shift === 21n || shift === 30n) && (entry & PAGE_SIZE_BIT) !== 0n)) {
      return (entry & ADDRESS_MASK & ~pageMask) | (linear & pageMask);
    }
    table = entry & ADDRESS_MASK;
  }
  return null;
}

/** The bytes from `linear` on that lie in one page (so one translation serves them all). */
export function bytesInPage(linear: bigint, length: number): number {
  const left = 0x1000n - (linear & 0xfffn);
  return Math.min(length, Number(left));
}

/** Guest RAM as the walk reads it (a GuestMemory). */
export interface GuestRam {
  readonly buffer: ArrayBuffer;
  readonly size: number;
}

/**
 * The guest-physical pieces [address, bytes] behind `length` bytes at `linear` (one per page), or
 * the first linear address that is not mapped (or maps outside guest RAM).
 */
export function mapLinear(linear: bigint, length: number, state: PagingState, ram: GuestRam): { pieces: [number, number][] } | { unmapped: bigint } {
  const view = new DataView(ram.buffer);
  const size = BigInt(ram.size);
  const read: PhysicalReader = (physical, bytes) => {
    if (physical + BigInt(bytes) > size) return null;
    const offset = Number(physical);
    return bytes === 8 ? view.getBigUint64(offset, true) : BigInt(view.getUint32(offset, true));
  };
  const pieces: [number, number][] = [];
  for (let done = 0; done < length;) {
    const at = (linear + BigInt(done)) & 0xffffffffffffffffn;
    const chunk = bytesInPage(at, length - done);
    const physical = translate(at, state, read);
    if (physical === null || physical + BigInt(chunk) > size) return { unmapped: at };
    pieces.push([Number(physical), chunk]);
    done += chunk;
  }
  return { pieces };
}
