// The PC the ACPI and MP tables describe: where its interrupt controllers and ACPI PM registers
// are (QEMU's pc machine and its PIIX4 PM layout, so kernels written for QEMU find them where they
// look), and what a loader is told of a machine to build its tables.
import { argTypeError, outOfRangeError } from '../kvm/errors.js';

/** What the firmware tables of a machine depend on. */
export interface PlatformDescription {
  vcpus: number;
  /** The in-kernel irqchip (PIC, IOAPIC, a local APIC per vCPU): without it there are no tables. */
  irqchip: boolean;
}

export const Platform = {
  /** Every vCPU's local APIC (xAPIC mode); APIC ID = vCPU index. */
  localApicAddr: 0xfee00000,
  ioApicAddr: 0xfec00000,
  /** The IOAPIC's ID follows the processors' (as QEMU numbers it). */
  ioApicId: (vcpus: number): number => vcpus,
  ioApicPins: 24,
  /** ISA IRQ 0 (the PIT) arrives at IOAPIC pin 2; every other ISA IRQ n at GSI n. */
  pitGsi: 2,
  /** The ACPI SCI: ISA IRQ 9, level-triggered, active high. */
  sciIrq: 9,
  pm1aEventPort: 0x600,
  pm1EventBytes: 4,
  pm1aControlPort: 0x604,
  pm1ControlBytes: 2,
  pmTimerPort: 0x608,
  pmTimerBytes: 4,
} as const;

/** The local APIC version register's value on KVM, as processors report it in the MP table. */
export const LOCAL_APIC_VERSION = 0x14;
/** The IOAPIC version register's value on KVM. */
export const IOAPIC_VERSION = 0x11;

export function checkPlatform(platform: PlatformDescription): void {
  if (typeof platform !== 'object' || platform === null) throw argTypeError('platform must be an object');
  // xAPIC IDs are 8 bits and 0xff is the broadcast ID: APIC IDs 0..254.
  if (!Number.isSafeInteger(platform.vcpus) || platform.vcpus < 1 || platform.vcpus > 255) {
    throw outOfRangeError(`platform.vcpus must be an integer 1..255, got ${String(platform.vcpus)}`);
  }
  if (typeof platform.irqchip !== 'boolean') throw argTypeError(`platform.irqchip must be a boolean, got ${typeof platform.irqchip}`);
}
