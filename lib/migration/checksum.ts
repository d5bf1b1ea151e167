// CRC-32C (Castagnoli; iSCSI, RFC 3720 appendix B.4), the checksum of the migration stream and of
// snapshot RAM images. The addon computes it with the SSE4.2 crc32 instruction (several times
// zlib.crc32's speed), or with tables on CPUs without it: see native/checksum.cc.
import { outOfRangeError } from '../kvm/errors.js';
import { crc32c as hostCrc32c } from '../kvm/host.js';

/** Reflected Castagnoli polynomial. */
const CRC32C_POLY = 0x82f63b78;

/**
 * CRC-32C of `data`, continuing from `seed` (the CRC-32C of what came before), as zlib's crc32():
 * crc32c(b, crc32c(a)) === crc32c(a + b). The check value crc32c('123456789') is 0xE3069283.
 */
export function crc32c(data: Uint8Array, seed = 0): number {
  return hostCrc32c(data, seed);
}

// Appending n zero bytes multiplies the CRC register by x^(8n) modulo the polynomial; zlib's
// crc32_combine() does the same with these two helpers (for its own polynomial). It lets a sparse
// RAM image be checksummed without reading its zero pages.
function multModP(a: number, b: number): number {
  if (a === 0) return 0;
  let m = 0x80000000;
  let p = 0;
  for (;;) {
    if (a & m) {
      p ^= b;
      if ((a & (m - 1)) === 0) break;
    }
    m >>>= 1;
    b = b & 1 ? (b >>> 1) ^ CRC32C_POLY : b >>> 1;
  }
  return p >>> 0;
}

/** X2N_TABLE[n] = x^(2^n) modulo the polynomial (bit-reflected). */
const X2N_TABLE = (() => {
  const table = new Uint32Array(64);
  let p = 0x40000000; // x^1
  table[0] = p;
  for (let n = 1; n < 64; n++) table[n] = p = multModP(p, p);
  return table;
})();

/**
 * The CRC-32C of the data whose CRC-32C is `crc`, followed by `byteCount` zero bytes, without
 * reading them: crc32cZeros(crc32c(a), n) === crc32c(n zero bytes, crc32c(a)). O(log n).
 */
export function crc32cZeros(crc: number, byteCount: number): number {
  if (!Number.isInteger(crc) || crc < 0 || crc > 0xffffffff) throw outOfRangeError(`crc must be an integer 0..4294967295, got ${crc}`);
  if (!Number.isSafeInteger(byteCount) || byteCount < 0) throw outOfRangeError(`byteCount must be a non-negative safe integer, got ${byteCount}`);
  let p = 0x80000000; // x^0
  let n = byteCount;
  let k = 3; // a byte is x^(2^3)
  while (n > 0) {
    if (n % 2 === 1) p = multModP(X2N_TABLE[k], p);
    n = Math.floor(n / 2);
    k++;
  }
  return (multModP(p, ~crc >>> 0) ^ 0xffffffff) >>> 0;
}
