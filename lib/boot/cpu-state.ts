// The CPU state each entry mode starts in, and the structures it needs in guest RAM: the GDT its
// segment registers were loaded from, and for long mode identity-mapping page tables.
import type { Dtable, Regs, Segment, Sregs } from '../kvm/structs.js';
import type { Vcpu } from '../kvm/vcpu.js';
import { BootImageError, formatBytes, hex } from './errors.js';
import { GDT_ADDR, LOW_RAM_END, PAGE_TABLES_ADDR } from './layout.js';

/** The mode a vCPU starts in: 16-bit real mode, 32-bit protected mode (flat segments, no paging) or 64-bit long mode (identity-mapped). */
export type CpuMode = 'real' | 'protected' | 'long';

/** Register state to set on a vCPU: only what the boot protocol defines; the rest stays at KVM's reset values. */
export interface BootState {
  regs: Partial<Regs> & { rip: bigint };
  sregs: Partial<Pick<Sregs, 'cs' | 'ds' | 'es' | 'fs' | 'gs' | 'ss' | 'tr' | 'gdt' | 'idt' | 'cr0' | 'cr3' | 'cr4' | 'efer'>>;
}

/** An entry state that sets CS and DS, as every one built here does. */
export type SegmentedBootState = BootState & { sregs: { cs: Segment; ds: Segment } };

/** Selectors of the loader's GDT (at GDT_ADDR), valid in protected and long mode. */
export const Selector = { Code32: 0x08, Data: 0x10, Code64: 0x18, Tss: 0x20 } as const;

const Cr0 = { PE: 1n << 0n, ET: 1n << 4n, PG: 1n << 31n } as const;
const Cr4 = { PAE: 1n << 5n } as const;
const Efer = { LME: 1n << 8n, LMA: 1n << 10n } as const;
/** RFLAGS with only the always-one bit 1: interrupts off. */
const RFLAGS_RESERVED = 0x2n;

const SegmentType = { DataRwAccessed: 0x3, CodeExecReadAccessed: 0xb, TssBusy: 0xb } as const;

function flatSegment(selector: number, type: number, bits: 'db' | 'l'): Segment {
  return {
    base: 0n, limit: 0xffffffff, selector, type, present: 1, dpl: 0, db: bits === 'db' ? 1 : 0, s: 1,
    l: bits === 'l' ? 1 : 0, g: 1, avl: 0, unusable: 0,
  };
}

const code32 = flatSegment(Selector.Code32, SegmentType.CodeExecReadAccessed, 'db');
const data32 = flatSegment(Selector.Data, SegmentType.DataRwAccessed, 'db');
const code64 = flatSegment(Selector.Code64, SegmentType.CodeExecReadAccessed, 'l');
/** A busy TSS at 0 with limit 0x67, as the PVH entry state asks (unused until the guest loads its own). */
const tss: Segment = {
  base: 0n, limit: 0x67, selector: Selector.Tss, type: SegmentType.TssBusy, present: 1, dpl: 0, db: 0, s: 0, l: 0, g: 0, avl: 0, unusable: 0,
};

/** The 8-byte descriptor for a segment as KVM describes it (Intel SDM vol. 3, 3.4.5). */
function descriptor(segment: Segment): bigint {
  const limit = segment.g ? segment.limit >>> 12 : segment.limit;
  const base = segment.base;
  const access = segment.type | (segment.s << 4) | (segment.dpl << 5) | (segment.present << 7);
  const flags = segment.avl | (segment.l << 1) | (segment.db << 2) | (segment.g << 3);
  return BigInt(limit & 0xffff) | ((base & 0xffffffn) << 16n) | (BigInt(access) << 40n) | (BigInt((limit >>> 16) & 0xf) << 48n) |
    (BigInt(flags) << 52n) | (((base >> 24n) & 0xffn) << 56n);
}

/** null, code32 (0x08), data (0x10), code64 (0x18), TSS (0x20, 16 bytes as long mode reads it). */
export const GDT_BYTES = 0x30;

export function gdtBytes(): Uint8Array {
  const bytes = new Uint8Array(GDT_BYTES);
  const view = new DataView(bytes.buffer);
  for (const segment of [code32, data32, code64, tss]) view.setBigUint64(segment.selector, descriptor(segment), true);
  return bytes;
}

const gdtr: Dtable = { base: BigInt(GDT_ADDR), limit: GDT_BYTES - 1 };
/** An empty IDT: an exception before the guest sets up its own is a clean triple fault, not a jump through garbage. */
const noIdt: Dtable = { base: 0n, limit: 0 };

/**
 * Real mode at `loadAddr`: CS=0 and IP=loadAddr where it fits 16 bits, otherwise
 * CS=loadAddr>>4 and IP=0 (then loadAddr must be 16-byte aligned). Other segments 0.
 */
export function realModeState(loadAddr: number): SegmentedBootState {
  const segment = (selector: number, type: number): Segment => ({
    base: BigInt(selector << 4), limit: 0xffff, selector, type, present: 1, dpl: 0, db: 0, s: 1, l: 0, g: 0, avl: 0, unusable: 0,
  });
  const csSelector = loadAddr <= 0xffff ? 0 : loadAddr >>> 4;
  const data = segment(0, SegmentType.DataRwAccessed);
  return {
    regs: { rip: BigInt(loadAddr - (csSelector << 4)), rflags: RFLAGS_RESERVED },
    sregs: { cs: segment(csSelector, SegmentType.CodeExecReadAccessed), ds: data, es: { ...data }, fs: { ...data }, gs: { ...data }, ss: { ...data } },
  };
}

/** 32-bit protected mode, paging off, flat 4 GiB segments from the loader's GDT, interrupts off. */
export function protectedModeState(entry: bigint, regs: Partial<Regs> = {}): SegmentedBootState {
  return {
    regs: { ...regs, rip: entry, rflags: RFLAGS_RESERVED },
    sregs: {
      cs: { ...code32 }, ds: { ...data32 }, es: { ...data32 }, fs: { ...data32 }, gs: { ...data32 }, ss: { ...data32 }, tr: { ...tss },
      gdt: { ...gdtr }, idt: { ...noIdt }, cr0: Cr0.PE | Cr0.ET, cr3: 0n, cr4: 0n, efer: 0n,
    },
  };
}

/** 64-bit long mode on the identity map at `cr3`, interrupts off. */
export function longModeState(entry: bigint, cr3: number, regs: Partial<Regs> = {}): SegmentedBootState {
  return {
    regs: { ...regs, rip: entry, rflags: RFLAGS_RESERVED },
    sregs: {
      cs: { ...code64 }, ds: { ...data32 }, es: { ...data32 }, fs: { ...data32 }, gs: { ...data32 }, ss: { ...data32 }, tr: { ...tss },
      gdt: { ...gdtr }, idt: { ...noIdt }, cr0: Cr0.PE | Cr0.ET | Cr0.PG, cr3: BigInt(cr3), cr4: Cr4.PAE, efer: Efer.LME | Efer.LMA,
    },
  };
}

const GiB = 1024 ** 3;
const PAGE = 4096;
// Present, writable, user: the map gives no protection (a guest wanting some builds its own
// tables); user lets ring-3 guest code run on it. Accessed (and dirty on 2 MiB leaves) are preset
// so the CPU never has to write to the tables.
const PTE_TABLE = 0x1n | 0x2n | 0x4n | 0x20n;
const PTE_2M_PAGE = PTE_TABLE | 0x40n | 0x80n;

/**
 * 4-level page tables mapping guest-physical [0, max(4 GiB, RAM rounded up to 1 GiB)) to the same
 * virtual addresses with 2 MiB pages: PML4 at PAGE_TABLES_ADDR, then the PDPT, then one PD per GiB.
 * The first 4 GiB are always mapped so that the local APIC and other MMIO below 4 GiB are reachable.
 */
export function identityMap(memoryBytes: number): { guestPhysAddr: number; data: Uint8Array; cr3: number } {
  const gigabytes = Math.max(4, Math.ceil(memoryBytes / GiB));
  const pages = 2 + gigabytes;
  if (gigabytes > 512 || PAGE_TABLES_ADDR + pages * PAGE > LOW_RAM_END) {
    throw new BootImageError(
      `long mode needs identity-map page tables for ${formatBytes(gigabytes * GiB)}, which do not fit below ${hex(LOW_RAM_END)}`,
    );
  }
  const data = new Uint8Array(pages * PAGE);
  const view = new DataView(data.buffer);
  const pml4 = PAGE_TABLES_ADDR;
  const pdpt = pml4 + PAGE;
  view.setBigUint64(0, BigInt(pdpt) | PTE_TABLE, true);
  for (let g = 0; g < gigabytes; g++) {
    const pd = pdpt + PAGE * (1 + g);
    view.setBigUint64(PAGE + g * 8, BigInt(pd) | PTE_TABLE, true);
    for (let i = 0; i < 512; i++) {
      view.setBigUint64(pd - pml4 + i * 8, (BigInt(g) << 30n) + (BigInt(i) << 21n) | PTE_2M_PAGE, true);
    }
  }
  return { guestPhysAddr: pml4, data, cr3: pml4 };
}

/** Sets `state` on a vCPU: reads its registers, overlays what the state defines, writes them back. */
export function applyBootState(vcpu: Pick<Vcpu, 'getSregs' | 'setSregs' | 'getRegs' | 'setRegs'>, state: BootState): void {
  const sregs = vcpu.getSregs();
  for (const [key, value] of Object.entries(state.sregs)) {
    if (value !== undefined) (sregs as Record<string, unknown>)[key] = typeof value === 'object' ? { ...value } : value;
  }
  vcpu.setSregs(sregs);
  const regs = vcpu.getRegs();
  for (const [key, value] of Object.entries(state.regs)) {
    if (value !== undefined) (regs as Record<string, unknown>)[key] = value;
  }
  vcpu.setRegs(regs);
}
