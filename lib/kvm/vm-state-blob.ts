// The raw form of a VM's state that Vm.saveState() writes and Vm.restoreState() reads
// (native/vm-state.cc holds the layout): a 16-byte header (magic 'KVMS', version, flags, section
// count), then tagged sections holding KVM's own structs (the PICs and IOAPIC, the PIT, the
// kvmclock). What a migration sends as it is, so that no JavaScript decodes or encodes a struct
// inside the guest's downtime.
import { argTypeError } from './errors.js';
import { native } from './native.js';

export const VM_STATE_MAGIC = 0x534d564b;

/** Whether `bytes` starts as a raw VM state does (not whether it is a good one: checkVmStateBlob). */
export function isVmStateBlob(bytes: Uint8Array): boolean {
  return bytes.length >= 4 && (bytes[0]! | (bytes[1]! << 8) | (bytes[2]! << 16) | (bytes[3]! << 24)) >>> 0 === VM_STATE_MAGIC;
}

/** Null if `bytes` is a well-formed raw VM state for this host's structs, else what is wrong with it. */
export function checkVmStateBlob(bytes: Uint8Array): string | null {
  if (!(bytes instanceof Uint8Array)) throw argTypeError('state must be a Uint8Array');
  return native.checkVmState(bytes);
}

/** Whether a checked raw VM state holds the in-kernel irqchips and PIT. */
export function vmStateBlobHasIrqchip(bytes: Uint8Array): boolean {
  return (bytes[6]! & 1) !== 0;
}
