// Variable-length ioctl arguments: a u32 count, then entries (kvm_cpuid2, kvm_msrs,
// kvm_msr_list, kvm_irq_routing). The addon checks the count against the buffer length.
import { kvmCpuidEntry2, kvmMsrEntry, type CpuidEntry, type MsrEntry } from './structs.js';
import type { StructType, Fields, StructValue } from './struct.js';
import { argTypeError } from './errors.js';

const HEADER_BYTES = 8;

export function encodeList<F extends Fields>(type: StructType<F>, entries: readonly StructValue<F>[], what: string): Uint8Array {
  if (!Array.isArray(entries)) throw argTypeError(`${what} must be an array`);
  const out = new Uint8Array(HEADER_BYTES + entries.length * type.size);
  new DataView(out.buffer).setUint32(0, entries.length, true);
  entries.forEach((entry, i) => type.encode(entry, out.subarray(HEADER_BYTES + i * type.size)));
  return out;
}

export function emptyList(type: { size: number }, capacity: number): Uint8Array {
  const out = new Uint8Array(HEADER_BYTES + capacity * type.size);
  new DataView(out.buffer).setUint32(0, capacity, true);
  return out;
}

export function decodeList<F extends Fields>(type: StructType<F>, data: Uint8Array, count?: number): StructValue<F>[] {
  const n = count ?? new DataView(data.buffer, data.byteOffset).getUint32(0, true);
  return Array.from({ length: n }, (_, i) => type.decode(data.subarray(HEADER_BYTES + i * type.size)));
}

/** A kvm_cpuid2 for Vcpu.setCpuid2(): encoded once, it can be set on many vCPUs or sent to their threads. */
export const encodeCpuid = (entries: readonly CpuidEntry[]) => encodeList(kvmCpuidEntry2, entries, 'cpuid entries');
export const decodeCpuid = (data: Uint8Array) => decodeList(kvmCpuidEntry2, data);
/** A kvm_msrs for Vcpu.setMsrs(), as encodeCpuid() is for CPUID. */
export const encodeMsrs = (entries: readonly MsrEntry[]) => encodeList(kvmMsrEntry, entries, 'msr entries');

export function encodeMsrIndices(indices: readonly number[]): Uint8Array {
  if (!Array.isArray(indices)) throw argTypeError('indices must be an array of MSR numbers');
  return encodeMsrs(indices.map((index) => ({ index, data: 0n })));
}

/** kvm_msr_list: u32 count, then u32 indices (no padding). */
export function emptyMsrList(capacity: number): Uint8Array {
  const out = new Uint8Array(4 + capacity * 4);
  new DataView(out.buffer).setUint32(0, capacity, true);
  return out;
}

export function decodeMsrList(data: Uint8Array): number[] {
  const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  const n = view.getUint32(0, true);
  return Array.from({ length: n }, (_, i) => view.getUint32(4 + i * 4, true));
}

/** Reads the entry count that a failed (E2BIG) call wrote back. */
export function listCount(data: Uint8Array): number {
  return new DataView(data.buffer, data.byteOffset).getUint32(0, true);
}
