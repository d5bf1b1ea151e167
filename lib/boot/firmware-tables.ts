// The firmware tables a PC's BIOS would have left in memory, for a machine with the in-kernel
// irqchip: the ACPI tables (acpi.ts) at ACPI_TABLES_ADDR and the MP tables (mptable.ts) at
// MP_TABLE_ADDR, both in the reserved BIOS area, as writes and regions of a boot plan.
import { buildAcpiTables } from './acpi.js';
import type { BootWrite } from './boot-plan.js';
import { ACPI_TABLES_ADDR, HIGH_RAM_START, MP_TABLE_ADDR, type Region } from './layout.js';
import { buildMpTable } from './mptable.js';
import { checkPlatform, type PlatformDescription } from './platform.js';

/** The ACPI and MP tables of a machine with the in-kernel irqchip, as a boot plan's writes and the regions they occupy. */
export interface FirmwareTables {
  writes: BootWrite[];
  regions: Region[];
  /** The RSDP's address, for boot information that points at it (PVH, Linux boot_params). */
  rsdp: number;
}

/**
 * The tables for `platform`, or null where there are none: a machine without the in-kernel
 * irqchip (no local APIC, no IOAPIC: nothing for a MADT or an MP table to describe, and an ACPI
 * OS would look for them), or with too little RAM to reach the BIOS area.
 */
export function firmwareTables(platform: PlatformDescription, memoryBytes: number): FirmwareTables | null {
  checkPlatform(platform);
  if (!platform.irqchip || memoryBytes < HIGH_RAM_START) return null;
  const acpi = buildAcpiTables(platform, ACPI_TABLES_ADDR);
  const mp = buildMpTable(platform, MP_TABLE_ADDR);
  return {
    writes: [
      { guestPhysAddr: acpi.guestPhysAddr, data: acpi.data, what: 'ACPI tables' },
      { guestPhysAddr: mp.guestPhysAddr, data: mp.data, what: 'MP tables' },
    ],
    regions: [
      { start: acpi.guestPhysAddr, end: acpi.guestPhysAddr + acpi.data.length, what: 'the ACPI tables', loader: true },
      { start: mp.guestPhysAddr, end: mp.guestPhysAddr + mp.data.length, what: 'the MP tables', loader: true },
    ],
    rsdp: acpi.rsdp,
  };
}
