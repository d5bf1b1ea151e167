// The framing of the migration stream's and snapshot file's sections (lib/migration/format.ts
// names them and sets their limits): a record of type u16, flags u16 and payload length u32
// (little-endian), the payload, then the CRC-32C of all that precedes it. It lives below the
// stream because a machine's pause writes its saved state out in it (StateWriteOut).
import { crc32c } from '../kvm/host.js';

/** type + flags + length before the payload. */
export const RECORD_HEADER_BYTES = 8;
/** The header plus the CRC-32C after the payload. */
export const RECORD_OVERHEAD_BYTES = RECORD_HEADER_BYTES + 4;

/** Fills in the header and CRC of a record whose payload is already in place. */
export function sealRecord(record: Uint8Array, type: number, flags: number): void {
  const view = new DataView(record.buffer, record.byteOffset, record.byteLength);
  const payloadBytes = record.length - RECORD_OVERHEAD_BYTES;
  view.setUint16(0, type, true);
  view.setUint16(2, flags, true);
  view.setUint32(4, payloadBytes, true);
  view.setUint32(RECORD_HEADER_BYTES + payloadBytes, crc32c(record.subarray(0, RECORD_HEADER_BYTES + payloadBytes)), true);
}

/** One record as three buffers, `payload` not copied: its header, the payload, its CRC (for one writev). */
export function recordParts(type: number, payload: Uint8Array, flags = 0): [Uint8Array, Uint8Array, Uint8Array] {
  const header = new Uint8Array(RECORD_HEADER_BYTES);
  const view = new DataView(header.buffer);
  view.setUint16(0, type, true);
  view.setUint16(2, flags, true);
  view.setUint32(4, payload.length, true);
  const crc = new Uint8Array(4);
  new DataView(crc.buffer).setUint32(0, crc32c(payload, crc32c(header)), true);
  return [header, payload, crc];
}

/** One record (header, a copy of `payload`, CRC) in one buffer; the caller checks type, flags and size. */
export function encodeRecord(type: number, payload: Uint8Array, flags = 0): Uint8Array {
  const record = new Uint8Array(RECORD_OVERHEAD_BYTES + payload.length);
  record.set(payload, RECORD_HEADER_BYTES);
  sealRecord(record, type, flags);
  return record;
}
