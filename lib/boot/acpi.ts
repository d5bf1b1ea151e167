// The ACPI tables of a PC with the in-kernel irqchip (ACPI 6.3, chapter 5.2): RSDP, XSDT and RSDT,
// FADT, FACS, DSDT and MADT, laid out one after another from a base address in the BIOS area,
// where an OS finds the RSDP by the standard scan of 0xE0000-0xFFFFF (ACPI 6.3, 5.2.5.1). They
// describe the PC of platform.ts: the local APICs, the IOAPIC and its interrupt source
// overrides, and the PIIX4-style PM registers that kernels written for QEMU's pc machine use.
// Pure: from a platform description to bytes and addresses.
import { outOfRangeError } from '../kvm/errors.js';
import { Platform, checkPlatform, type PlatformDescription } from './platform.js';

/** Fixed identification strings of every table (space-padded as the fields are). */
export const ACPI_OEM_ID = 'NODKVM';
export const ACPI_OEM_TABLE_ID = 'NODKVMPC';
export const ACPI_CREATOR_ID = 'NKVM';
const OEM_REVISION = 1;
const CREATOR_REVISION = 1;
/** The CMOS register where the RTC keeps the century (lib/devices/cmos-rtc.ts), as on QEMU's PC. */
const RTC_CENTURY_REGISTER = 0x32;

/** The common table header (ACPI 6.3, 5.2.6). */
export const SDT_HEADER_BYTES = 36;
export const RSDP_BYTES = 36;
/** The first 20 bytes: the ACPI 1.0 part its first checksum covers. */
export const RSDP_V1_BYTES = 20;
/** FADT revision 6 (ACPI 6.0 and later) ends with the hypervisor vendor identity. */
export const FADT_BYTES = 276;
export const FADT_REVISION = 6;
export const FADT_MINOR_REVISION = 3;
export const FACS_BYTES = 64;
/** MADT revision 5: ACPI 6.3. */
export const MADT_REVISION = 5;

/** FADT Flags (ACPI 6.3, Table 5-34). No RESET_REG_SUP: the VMM resets on no reset register (such as QEMU's port 0xcf9). */
export const FadtFlag = { Wbinvd: 1 << 0, ProcC1: 1 << 2, SlpButton: 1 << 5 } as const;
/** FADT IA-PC boot architecture flags (Table 5-35). */
export const IapcBootArch = { LegacyDevices: 1 << 0, I8042: 1 << 1 } as const;
/** MADT flags (Table 5-44): the dual 8259s are there too. */
export const MADT_PCAT_COMPAT = 1;
/** MADT interrupt controller structure types (Table 5-45). */
export const MadtEntry = { LocalApic: 0, IoApic: 1, InterruptSourceOverride: 2, LocalApicNmi: 4 } as const;
/** MPS INTI flags (Table 5-50): polarity in bits 0-1, trigger mode in bits 2-3. */
export const MpsIntiFlag = { Conforming: 0, ActiveHigh: 1, ActiveLow: 3, EdgeTriggered: 1 << 2, LevelTriggered: 3 << 2 } as const;
/** Generic Address Structure (5.2.3.2): address space IDs and access sizes. */
const GasSpace = { SystemIo: 1 } as const;
const GasAccess = { Word: 2, Dword: 3 } as const;

/**
 * The DSDT's definition block: `Name (_S5, Package () { 0, 0, 0, 0 })`, hand-encoded (ACPI 6.3,
 * 20.2): NameOp, the NameSeg "_S5_", PackageOp, PkgLength (6: itself, NumElements and four
 * elements), NumElements 4, then four ZeroOps. SLP_TYP 0 for S5 is what the PM1 control block
 * of the platform powers off on.
 */
export const DSDT_AML = Uint8Array.of(0x08, 0x5f, 0x53, 0x35, 0x5f, 0x12, 0x06, 0x04, 0x00, 0x00, 0x00, 0x00);

/** Where each table went, for boot information and for tests. */
export interface AcpiTables {
  /** Guest-physical address of data[0]. */
  guestPhysAddr: number;
  data: Uint8Array;
  rsdp: number;
  xsdt: number;
  rsdt: number;
  fadt: number;
  facs: number;
  dsdt: number;
  madt: number;
}

/** The sum of `bytes`, mod 256: 0 over a table with a right checksum. */
export function byteSum(bytes: Uint8Array): number {
  let sum = 0;
  for (const byte of bytes) sum = (sum + byte) & 0xff;
  return sum;
}

/** The MADT's length for `vcpus` processors: header, local APIC address and flags, a local APIC each, the IOAPIC, two overrides, the NMI. */
export const madtBytes = (vcpus: number): number => SDT_HEADER_BYTES + 8 + vcpus * 8 + 12 + 2 * 10 + 6;

/** Tables the XSDT and RSDT list: the FADT (which leads to the FACS and the DSDT) and the MADT. */
const ROOT_ENTRIES = 2;
const TABLE_ORDER = ['rsdp', 'xsdt', 'rsdt', 'fadt', 'facs', 'dsdt', 'madt'] as const;
type TableName = (typeof TABLE_ORDER)[number];

/** Bytes the tables take for `vcpus` processors (alignment padding included). */
export function acpiTablesBytes(vcpus: number): number {
  return tableOffsets(vcpus).end;
}

function tableOffsets(vcpus: number): { at: Record<TableName, number>; sizes: Record<TableName, number>; end: number } {
  const sizes: Record<TableName, number> = {
    rsdp: RSDP_BYTES, xsdt: SDT_HEADER_BYTES + 8 * ROOT_ENTRIES, rsdt: SDT_HEADER_BYTES + 4 * ROOT_ENTRIES, fadt: FADT_BYTES,
    facs: FACS_BYTES, dsdt: SDT_HEADER_BYTES + DSDT_AML.length, madt: madtBytes(vcpus),
  };
  const at = {} as Record<TableName, number>;
  let offset = 0;
  for (const table of TABLE_ORDER) {
    // The FACS must be 64-byte aligned (5.2.10), the RSDP 16-byte (5.2.5.1); the rest as the RSDP.
    const alignment = table === 'facs' ? 64 : 16;
    offset = Math.ceil(offset / alignment) * alignment;
    at[table] = offset;
    offset += sizes[table];
  }
  return { at, sizes, end: offset };
}

/**
 * Every table from `base` (64-byte aligned: the RSDP needs 16, and the FACS, placed at a multiple
 * of 64 from base, needs 64): RSDP, XSDT, RSDT, FADT, FACS, DSDT, MADT. Throws RangeError
 * for a platform without an irqchip: without local APICs and an IOAPIC there is no interrupt
 * model for an ACPI OS to take.
 */
export function buildAcpiTables(platform: PlatformDescription, base: number): AcpiTables {
  checkPlatform(platform);
  if (!platform.irqchip) throw outOfRangeError('the ACPI tables describe a PC with local APICs and an IOAPIC: the platform needs the in-kernel irqchip');
  if (!Number.isSafeInteger(base) || base < 0 || base % 64 !== 0 || base > 0xffffffff) {
    throw outOfRangeError(`the ACPI tables' base must be a 64-byte aligned 32-bit address, got ${base}`);
  }
  const { at, sizes, end } = tableOffsets(platform.vcpus);
  const data = new Uint8Array(end);
  const view = new DataView(data.buffer);
  const addr = (table: TableName) => base + at[table];

  putHeader(view, at.xsdt, 'XSDT', sizes.xsdt, 1);
  putHeader(view, at.rsdt, 'RSDT', sizes.rsdt, 1);
  [addr('fadt'), addr('madt')].forEach((table, i) => {
    view.setBigUint64(at.xsdt + SDT_HEADER_BYTES + 8 * i, BigInt(table), true);
    view.setUint32(at.rsdt + SDT_HEADER_BYTES + 4 * i, table, true);
  });
  putFadt(view, at.fadt, addr('facs'), addr('dsdt'));
  putFacs(view, at.facs);
  putHeader(view, at.dsdt, 'DSDT', sizes.dsdt, 2); // revision 2: integers are 64-bit
  data.set(DSDT_AML, at.dsdt + SDT_HEADER_BYTES);
  putMadt(view, at.madt, platform.vcpus);
  for (const table of ['xsdt', 'rsdt', 'fadt', 'dsdt', 'madt'] as const) setChecksum(data, at[table], sizes[table], at[table] + 9);
  putRsdp(view, at.rsdp, addr('rsdt'), addr('xsdt'));
  return {
    guestPhysAddr: base, data,
    rsdp: addr('rsdp'), xsdt: addr('xsdt'), rsdt: addr('rsdt'), fadt: addr('fadt'), facs: addr('facs'), dsdt: addr('dsdt'), madt: addr('madt'),
  };
}

function putAscii(view: DataView, offset: number, text: string, width: number): void {
  for (let i = 0; i < width; i++) view.setUint8(offset + i, i < text.length ? text.charCodeAt(i) : 0x20);
}

/** The checksum byte at `checksumAt` that makes [start, start + length) sum to 0. */
function setChecksum(data: Uint8Array, start: number, length: number, checksumAt: number): void {
  data[checksumAt] = 0;
  data[checksumAt] = (0x100 - byteSum(data.subarray(start, start + length))) & 0xff;
}

/** The system description table header (5.2.6); the checksum is set once the body is in. */
function putHeader(view: DataView, at: number, signature: string, length: number, revision: number): void {
  putAscii(view, at, signature, 4);
  view.setUint32(at + 4, length, true);
  view.setUint8(at + 8, revision);
  putAscii(view, at + 10, ACPI_OEM_ID, 6);
  putAscii(view, at + 16, ACPI_OEM_TABLE_ID, 8);
  view.setUint32(at + 24, OEM_REVISION, true);
  putAscii(view, at + 28, ACPI_CREATOR_ID, 4);
  view.setUint32(at + 32, CREATOR_REVISION, true);
}

/** RSDP (5.2.5.3), revision 2: the RSDT and the XSDT, a checksum over the first 20 bytes and one over all 36. */
function putRsdp(view: DataView, at: number, rsdt: number, xsdt: number): void {
  putAscii(view, at, 'RSD PTR ', 8);
  putAscii(view, at + 9, ACPI_OEM_ID, 6);
  view.setUint8(at + 15, 2);
  view.setUint32(at + 16, rsdt, true);
  view.setUint32(at + 20, RSDP_BYTES, true);
  view.setBigUint64(at + 24, BigInt(xsdt), true);
  const data = new Uint8Array(view.buffer);
  setChecksum(data, at, RSDP_V1_BYTES, at + 8);
  setChecksum(data, at, RSDP_BYTES, at + 32);
}

/** A Generic Address Structure (5.2.3.2) for a block of I/O ports. */
function putIoGas(view: DataView, at: number, port: number, bytes: number, access: number): void {
  view.setUint8(at, GasSpace.SystemIo);
  view.setUint8(at + 1, bytes * 8);
  view.setUint8(at + 2, 0);
  view.setUint8(at + 3, access);
  view.setBigUint64(at + 4, BigInt(port), true);
}

/**
 * FADT (5.2.9, Table 5-33), revision 6. No SMI_CMD: ACPI mode is always on. The PM blocks in
 * both their 32-bit fields and their X_ GASes. The FACS only in FIRMWARE_CTRL: X_FIRMWARE_CTRL
 * must be zero when FIRMWARE_CTRL is not. The DSDT in both DSDT and X_DSDT.
 */
function putFadt(view: DataView, at: number, facs: number, dsdt: number): void {
  const { pm1aEventPort, pm1EventBytes, pm1aControlPort, pm1ControlBytes, pmTimerPort, pmTimerBytes, sciIrq } = Platform;
  putHeader(view, at, 'FACP', FADT_BYTES, FADT_REVISION);
  view.setUint32(at + 36, facs, true); // FIRMWARE_CTRL
  view.setUint32(at + 40, dsdt, true); // DSDT
  view.setUint8(at + 45, 0); // Preferred_PM_Profile: unspecified
  view.setUint16(at + 46, sciIrq, true); // SCI_INT
  view.setUint32(at + 48, 0, true); // SMI_CMD: none
  view.setUint32(at + 56, pm1aEventPort, true); // PM1a_EVT_BLK
  view.setUint32(at + 64, pm1aControlPort, true); // PM1a_CNT_BLK
  view.setUint32(at + 76, pmTimerPort, true); // PM_TMR_BLK
  view.setUint8(at + 88, pm1EventBytes); // PM1_EVT_LEN
  view.setUint8(at + 89, pm1ControlBytes); // PM1_CNT_LEN
  view.setUint8(at + 91, pmTimerBytes); // PM_TMR_LEN
  // C2 and C3 latencies above 100 and 1000 us: those states are not supported.
  view.setUint16(at + 96, 0x0fff, true); // P_LVL2_LAT
  view.setUint16(at + 98, 0x0fff, true); // P_LVL3_LAT
  view.setUint8(at + 108, RTC_CENTURY_REGISTER); // CENTURY: the CMOS byte that holds it
  view.setUint16(at + 109, IapcBootArch.LegacyDevices | IapcBootArch.I8042, true); // IAPC_BOOT_ARCH
  view.setUint32(at + 112, FadtFlag.Wbinvd | FadtFlag.ProcC1 | FadtFlag.SlpButton, true); // Flags
  view.setUint8(at + 131, FADT_MINOR_REVISION); // FADT Minor Version
  view.setBigUint64(at + 132, 0n, true); // X_FIRMWARE_CTRL
  view.setBigUint64(at + 140, BigInt(dsdt), true); // X_DSDT
  putIoGas(view, at + 148, pm1aEventPort, pm1EventBytes, GasAccess.Word); // X_PM1a_EVT_BLK
  putIoGas(view, at + 172, pm1aControlPort, pm1ControlBytes, GasAccess.Word); // X_PM1a_CNT_BLK
  putIoGas(view, at + 208, pmTimerPort, pmTimerBytes, GasAccess.Dword); // X_PM_TMR_BLK
}

/** FACS (5.2.10, Table 5-37), version 2; it has no checksum. */
function putFacs(view: DataView, at: number): void {
  putAscii(view, at, 'FACS', 4);
  view.setUint32(at + 4, FACS_BYTES, true);
  view.setUint8(at + 32, 2); // Version
}

/**
 * MADT (5.2.12): the local APIC address and PCAT_COMPAT, a Processor Local APIC per vCPU (UID
 * and APIC ID the vCPU index, enabled), the IOAPIC, the overrides IRQ 0 -> GSI 2 (the PIT on
 * IOAPIC pin 2) and IRQ 9 -> GSI 9 level/active high (the SCI), and LINT1 of every processor as NMI.
 */
function putMadt(view: DataView, at: number, vcpus: number): void {
  putHeader(view, at, 'APIC', madtBytes(vcpus), MADT_REVISION);
  view.setUint32(at + 36, Platform.localApicAddr, true);
  view.setUint32(at + 40, MADT_PCAT_COMPAT, true);
  let o = at + 44;
  for (let id = 0; id < vcpus; id++) {
    view.setUint8(o, MadtEntry.LocalApic);
    view.setUint8(o + 1, 8);
    view.setUint8(o + 2, id); // ACPI Processor UID
    view.setUint8(o + 3, id); // APIC ID
    view.setUint32(o + 4, 1, true); // Enabled
    o += 8;
  }
  view.setUint8(o, MadtEntry.IoApic);
  view.setUint8(o + 1, 12);
  view.setUint8(o + 2, Platform.ioApicId(vcpus));
  view.setUint32(o + 4, Platform.ioApicAddr, true);
  view.setUint32(o + 8, 0, true); // Global System Interrupt Base
  o += 12;
  const overrides = [
    { irq: 0, gsi: Platform.pitGsi, flags: MpsIntiFlag.Conforming },
    { irq: Platform.sciIrq, gsi: Platform.sciIrq, flags: MpsIntiFlag.ActiveHigh | MpsIntiFlag.LevelTriggered },
  ];
  for (const { irq, gsi, flags } of overrides) {
    view.setUint8(o, MadtEntry.InterruptSourceOverride);
    view.setUint8(o + 1, 10);
    view.setUint8(o + 2, 0); // Bus: ISA
    view.setUint8(o + 3, irq);
    view.setUint32(o + 4, gsi, true);
    view.setUint16(o + 8, flags, true);
    o += 10;
  }
  view.setUint8(o, MadtEntry.LocalApicNmi);
  view.setUint8(o + 1, 6);
  view.setUint8(o + 2, 0xff); // every processor
  view.setUint16(o + 3, MpsIntiFlag.Conforming, true);
  view.setUint8(o + 5, 1); // LINT1
}
