// What a device offers the I/O bus (lib/vmm/bus.ts): reads and writes at offsets from its own
// base, never absolute addresses. Devices implement these; the bus that routes exits to them
// lives above, in the VMM.

/** A device on the port I/O bus: reads and writes at offsets from its first port (the bus owns the range). */
export interface PortDevice {
  readonly name: string;
  /** A read of `size` bytes (1, 2 or 4) at `offset` from the device's first port. */
  read(offset: number, size: number): number;
  /** A write of `value`, `size` bytes (1, 2 or 4), at `offset` from the device's first port. */
  write(offset: number, size: number, value: number): void;
}

/** A device on the MMIO bus: reads and writes at offsets from its first address (the bus owns the range). */
export interface MmioDevice {
  readonly name: string;
  /** Fills `data` (1..8 bytes) with what is at `offset`. */
  read(offset: number, data: Uint8Array): void;
  /** A write of `data` (1..8 bytes) at `offset`. */
  write(offset: number, data: Uint8Array): void;
}

/**
 * Where a device records the guest pages it writes itself (a disk filling a read buffer, a used
 * ring): KVM's dirty log sees only the guest's own writes, and a snapshot or migration that
 * missed these would lose data. The VMM's dirty bitmap implements it.
 */
export interface DirtyPageMarker {
  /** Marks the pages under `byteLength` bytes at guest-physical `guestPhysAddr`. */
  mark(guestPhysAddr: number, byteLength: number): void;
}
