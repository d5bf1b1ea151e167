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

/** The sections of a checked state, by tag (1-3 PIC master, PIC slave, IOAPIC; 4 PIT; 5 clock), as views into it. */
export function vmStateBlobSections(bytes: Uint8Array): Map<number, Uint8Array> {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const sections = new Map<number, Uint8Array>();
  let at = 16;
  for (let i = 0, count = view.getUint32(8, true); i < count; i++) {
    const tag = view.getUint32(at, true);
    const length = view.getUint32(at + 4, true);
    sections.set(tag, bytes.subarray(at + 8, at + 8 + length));
    at += 8 + ((length + 7) & ~7);
  }
  return sections;
}
