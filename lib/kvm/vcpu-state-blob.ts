// The raw form of a vCPU's state that Vcpu.saveState() writes and Vcpu.restoreState() reads
// (native/vcpu-state.cc holds the layout): a 24-byte header (magic 'KVCS', version, flags, vCPU
// id, TSC kHz, section count), then tagged sections holding KVM's own structs. What a migration
// sends as it is, so that no JavaScript decodes or encodes a struct inside the guest's downtime.
import { argTypeError } from './errors.js';
import { native } from './native.js';

export const VCPU_STATE_MAGIC = 0x5343564b;
export const VCPU_STATE_HEADER_BYTES = 24;
/** A kvm_msr_entry: index u32, reserved u32, data u64. */
const MSR_ENTRY_BYTES = 16;
export const VcpuStateFlag = { Lapic: 1, VmmHalted: 2 } as const;
export const VcpuStateTag = {
  Cpuid: 1, MpState: 2, Regs: 3, Sregs: 4, Xsave: 5, Xcrs: 6, DebugRegs: 7, Lapic: 8, Msrs: 9, Events: 10,
} as const;

/** Whether `bytes` starts as a raw vCPU state does (not whether it is a good one: checkVcpuStateBlob). */
export function isVcpuStateBlob(bytes: Uint8Array): boolean {
  return bytes.length >= 4 && (bytes[0]! | (bytes[1]! << 8) | (bytes[2]! << 16) | (bytes[3]! << 24)) >>> 0 === VCPU_STATE_MAGIC;
}

/** Null if `bytes` is a well-formed raw vCPU state for this host's structs, else what is wrong with it. */
export function checkVcpuStateBlob(bytes: Uint8Array): string | null {
  if (!(bytes instanceof Uint8Array)) throw argTypeError('state must be a Uint8Array');
  return native.checkVcpuState(bytes);
}

/** The header's fields (of a checked state). */
export function vcpuStateBlobHeader(bytes: Uint8Array): { vcpuId: number; flags: number; tscKhz: number } {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  return { flags: view.getUint16(6, true), vcpuId: view.getUint32(8, true), tscKhz: view.getUint32(12, true) };
}

/** The sections of a checked state, by tag, as views into it. */
export function vcpuStateBlobSections(bytes: Uint8Array): Map<number, Uint8Array> {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const count = view.getUint32(16, true);
  const sections = new Map<number, Uint8Array>();
  let at = VCPU_STATE_HEADER_BYTES;
  for (let i = 0; i < count; i++) {
    const tag = view.getUint32(at, true);
    const length = view.getUint32(at + 4, true);
    sections.set(tag, bytes.subarray(at + 8, at + 8 + length));
    at += 8 + ((length + 7) & ~7);
  }
  return sections;
}

export interface VcpuSaveInputs {
  msrIndices: Uint32Array;
  /** A kvm_cpuid2. */
  cpuid: Uint8Array;
}

/**
 * What saving the vCPU again needs that a state of it holds: the MSRs it read (their indices) and
 * the CPUID it had (a kvm_cpuid2), for saveParkedVcpu(). Null if the state has either missing.
 */
export function vcpuSaveInputs(bytes: Uint8Array): VcpuSaveInputs | null {
  const sections = vcpuStateBlobSections(bytes);
  const cpuid = sections.get(VcpuStateTag.Cpuid);
  const msrs = sections.get(VcpuStateTag.Msrs);
  if (!cpuid || !msrs || msrs.length < 8) return null;
  const view = new DataView(msrs.buffer, msrs.byteOffset, msrs.byteLength);
  const count = view.getUint32(0, true);
  if (msrs.length < 8 + count * MSR_ENTRY_BYTES) return null;
  const msrIndices = new Uint32Array(count);
  for (let i = 0; i < count; i++) msrIndices[i] = view.getUint32(8 + i * MSR_ENTRY_BYTES, true);
  return { msrIndices, cpuid: cpuid.slice() };
}

/** A raw state made of its parts (each a KVM struct's bytes), as saveState() would have written it. */
export function encodeVcpuStateBlob(header: { vcpuId: number; flags: number; tscKhz: number }, sections: ReadonlyMap<number, Uint8Array>): Uint8Array {
  let size = VCPU_STATE_HEADER_BYTES;
  for (const bytes of sections.values()) size += 8 + ((bytes.length + 7) & ~7);
  const out = new Uint8Array(size);
  const view = new DataView(out.buffer);
  view.setUint32(0, VCPU_STATE_MAGIC, true);
  view.setUint16(4, 1, true);
  view.setUint16(6, header.flags, true);
  view.setUint32(8, header.vcpuId, true);
  view.setUint32(12, header.tscKhz, true);
  view.setUint32(16, sections.size, true);
  let at = VCPU_STATE_HEADER_BYTES;
  for (const [tag, bytes] of sections) {
    view.setUint32(at, tag, true);
    view.setUint32(at + 4, bytes.length, true);
    out.set(bytes, at + 8);
    at += 8 + ((bytes.length + 7) & ~7);
  }
  return out;
}
