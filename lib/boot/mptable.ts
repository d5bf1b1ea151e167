// The Intel MultiProcessor Specification 1.4 tables of a PC with the in-kernel irqchip, for
// kernels that do not read ACPI: the MP floating pointer structure (MP 1.4, 4.1), found by a scan
// of 0xF0000-0xFFFFF, and right after it the MP configuration table (4.2): its header, then a
// processor entry per vCPU, the ISA bus, the IOAPIC, an I/O interrupt assignment per ISA IRQ and
// the two local interrupt assignments. The entries are the ones Firecracker writes, with the
// interrupt routing of platform.ts (IRQ 0 on IOAPIC pin 2, the SCI level-triggered).
// Pure: from a platform description to bytes and addresses.
import { outOfRangeError } from '../kvm/errors.js';
import { byteSum } from './acpi.js';
import { IOAPIC_VERSION, LOCAL_APIC_VERSION, Platform, checkPlatform, type PlatformDescription } from './platform.js';

export const MP_FLOATING_POINTER_BYTES = 16;
export const MP_CONFIG_HEADER_BYTES = 44;
export const MP_SPEC_REVISION = 4;
export const MP_OEM_ID = 'NODKVM';
export const MP_PRODUCT_ID = 'PC';

/** Configuration table entry types (MP 1.4, Table 4-3) and their lengths. */
export const MpEntry = { Processor: 0, Bus: 1, IoApic: 2, IoInterrupt: 3, LocalInterrupt: 4 } as const;
export const MP_ENTRY_BYTES: Record<number, number> = { 0: 20, 1: 8, 2: 8, 3: 8, 4: 8 };
/** Processor entry CPU flags (Table 4-4). */
export const MpCpuFlag = { Enabled: 1 << 0, BootProcessor: 1 << 1 } as const;
/** Interrupt types of the assignment entries (Table 4-8). */
export const MpInterruptType = { Int: 0, Nmi: 1, Smi: 2, ExtInt: 3 } as const;
/** Interrupt flags: PO in bits 0-1 (1 active high), EL in bits 2-3 (3 level-triggered); 0 conforms to the bus. */
export const MpInterruptFlag = { Conforming: 0, ActiveHigh: 1, LevelTriggered: 3 << 2 } as const;
/** The CPU signature (family 6) and feature flags (FPU, APIC) of every processor entry, as Firecracker writes them. */
export const MP_CPU_SIGNATURE = 0x600;
export const MP_CPU_FEATURES = 0x201;
const ISA_BUS_ID = 0;
const ISA_IRQS = 16;
/** Destination "every local APIC" of a local interrupt assignment. */
const ALL_LOCAL_APICS = 0xff;

export interface MpTable {
  /** Guest-physical address of data[0]: the floating pointer. */
  guestPhysAddr: number;
  data: Uint8Array;
  floatingPointer: number;
  configTable: number;
}

/** The ISA IRQs the I/O interrupt assignments list, and the IOAPIC pin each arrives at. */
export function isaInterruptAssignments(): { irq: number; pin: number; flags: number }[] {
  const assignments = [];
  for (let irq = 0; irq < ISA_IRQS; irq++) {
    // IRQ 2 is the cascade from the slave PIC: nothing arrives there (its pin takes IRQ 0).
    if (irq === 2) continue;
    const pin = irq === 0 ? Platform.pitGsi : irq;
    const flags = irq === Platform.sciIrq ? MpInterruptFlag.ActiveHigh | MpInterruptFlag.LevelTriggered : MpInterruptFlag.Conforming;
    assignments.push({ irq, pin, flags });
  }
  return assignments;
}

/** Entries of the configuration table for `vcpus` processors. */
export const mpEntryCount = (vcpus: number): number => vcpus + 1 + 1 + (ISA_IRQS - 1) + 2;

/** Bytes of the floating pointer and configuration table for `vcpus` processors. */
export function mpTableBytes(vcpus: number): number {
  return MP_FLOATING_POINTER_BYTES + MP_CONFIG_HEADER_BYTES + vcpus * 20 + (mpEntryCount(vcpus) - vcpus) * 8;
}

/**
 * The floating pointer at `base` (16-byte aligned, as the scan needs) and the configuration
 * table after it. Throws RangeError for a platform without an irqchip.
 */
export function buildMpTable(platform: PlatformDescription, base: number): MpTable {
  checkPlatform(platform);
  if (!platform.irqchip) throw outOfRangeError('the MP table describes local APICs and an IOAPIC: the platform needs the in-kernel irqchip');
  if (!Number.isSafeInteger(base) || base < 0 || base % 16 !== 0 || base > 0xffffffff) {
    throw outOfRangeError(`the MP table's base must be a 16-byte aligned 32-bit address, got ${base}`);
  }
  const { vcpus } = platform;
  const ioApicId = Platform.ioApicId(vcpus);
  const data = new Uint8Array(mpTableBytes(vcpus));
  const view = new DataView(data.buffer);
  const config = MP_FLOATING_POINTER_BYTES;

  // Floating pointer (4.1): one 16-byte paragraph; feature bytes 0: a configuration table is
  // present, and the IMCR is absent (virtual wire mode).
  putAscii(view, 0, '_MP_', 4);
  view.setUint32(4, base + config, true);
  view.setUint8(8, 1);
  view.setUint8(9, MP_SPEC_REVISION);
  view.setUint8(10, checksumOf(data.subarray(0, MP_FLOATING_POINTER_BYTES)));

  let o = config + MP_CONFIG_HEADER_BYTES;
  for (let id = 0; id < vcpus; id++) {
    view.setUint8(o, MpEntry.Processor);
    view.setUint8(o + 1, id);
    view.setUint8(o + 2, LOCAL_APIC_VERSION);
    view.setUint8(o + 3, MpCpuFlag.Enabled | (id === 0 ? MpCpuFlag.BootProcessor : 0));
    view.setUint32(o + 4, MP_CPU_SIGNATURE, true);
    view.setUint32(o + 8, MP_CPU_FEATURES, true);
    o += 20;
  }
  view.setUint8(o, MpEntry.Bus);
  view.setUint8(o + 1, ISA_BUS_ID);
  putAscii(view, o + 2, 'ISA', 6);
  o += 8;
  view.setUint8(o, MpEntry.IoApic);
  view.setUint8(o + 1, ioApicId);
  view.setUint8(o + 2, IOAPIC_VERSION);
  view.setUint8(o + 3, 1); // usable
  view.setUint32(o + 4, Platform.ioApicAddr, true);
  o += 8;
  for (const { irq, pin, flags } of isaInterruptAssignments()) {
    putInterrupt(view, o, MpEntry.IoInterrupt, MpInterruptType.Int, flags, irq, ioApicId, pin);
    o += 8;
  }
  // LINT0 of the BSP takes the 8259's ExtINT (virtual wire), LINT1 of every processor the NMI.
  putInterrupt(view, o, MpEntry.LocalInterrupt, MpInterruptType.ExtInt, MpInterruptFlag.Conforming, 0, 0, 0);
  o += 8;
  putInterrupt(view, o, MpEntry.LocalInterrupt, MpInterruptType.Nmi, MpInterruptFlag.Conforming, 0, ALL_LOCAL_APICS, 1);
  o += 8;

  // Configuration table header (4.2.1); no OEM table, no extended entries.
  putAscii(view, config, 'PCMP', 4);
  view.setUint16(config + 4, o - config, true);
  view.setUint8(config + 6, MP_SPEC_REVISION);
  putAscii(view, config + 8, MP_OEM_ID, 8);
  putAscii(view, config + 16, MP_PRODUCT_ID, 12);
  view.setUint16(config + 34, mpEntryCount(vcpus), true);
  view.setUint32(config + 36, Platform.localApicAddr, true);
  view.setUint8(config + 7, checksumOf(data.subarray(config, o)));
  return { guestPhysAddr: base, data, floatingPointer: base, configTable: base + config };
}

/** An I/O (type 3) or local (type 4) interrupt assignment entry: they share one layout. */
function putInterrupt(view: DataView, at: number, type: number, interruptType: number, flags: number, sourceIrq: number, destination: number, destinationPin: number): void {
  view.setUint8(at, type);
  view.setUint8(at + 1, interruptType);
  view.setUint16(at + 2, flags, true);
  view.setUint8(at + 4, ISA_BUS_ID);
  view.setUint8(at + 5, sourceIrq);
  view.setUint8(at + 6, destination);
  view.setUint8(at + 7, destinationPin);
}

function putAscii(view: DataView, offset: number, text: string, width: number): void {
  for (let i = 0; i < width; i++) view.setUint8(offset + i, i < text.length ? text.charCodeAt(i) : 0x20);
}

/** The byte that makes `bytes` (its checksum byte still 0) sum to 0. */
const checksumOf = (bytes: Uint8Array): number => (0x100 - byteSum(bytes)) & 0xff;
