// CRC-32C: the addon's implementations (VPCLMULQDQ folding, SSE4.2, tables) against a bitwise reference, chaining
// like zlib's crc32(), extension over zero bytes without reading them, and argument checks.
import t from 'tap';
import { native } from '../../lib/kvm/native.js';
import { crc32c, crc32cZeros } from '../../lib/migration/checksum.js';

const KiB = 1024;
const MiB = 1024 * 1024;

/** CRC-32C one bit at a time, straight from the definition (reflected polynomial 0x82F63B78). */
function referenceCrc32c(data: Uint8Array, seed = 0): number {
  let reg = ~seed >>> 0;
  for (const byte of data) {
    reg ^= byte;
    for (let bit = 0; bit < 8; bit++) reg = reg & 1 ? (reg >>> 1) ^ 0x82f63b78 : reg >>> 1;
  }
  return ~reg >>> 0;
}

/** Deterministic pseudo-random bytes and integers (xorshift32), so that failures reproduce. */
function random(seed: number): { bytes(length: number): Uint8Array; below(limit: number): number } {
  let state = seed >>> 0 || 1;
  const next = (): number => {
    state ^= state << 13;
    state ^= state >>> 17;
    state ^= state << 5;
    return (state >>> 0) / 2 ** 32;
  };
  return {
    bytes: (length) => new Uint8Array(length).map(() => Math.floor(next() * 256)),
    below: (limit) => Math.floor(next() * limit),
  };
}

/** Both native implementations: the default (folding or SSE4.2, as the CPU allows) and the tables. */
const implementations: [string, (data: Uint8Array, seed?: number) => number][] = [
  ['default', (data, seed = 0) => crc32c(data, seed)],
  ['portable', (data, seed = 0) => native.crc32c(data, seed, true)],
];

t.test('the check value and the empty input', async (t) => {
  const check = Buffer.from('123456789', 'latin1');
  t.equal(referenceCrc32c(check), 0xe3069283, 'the reference gives the CRC-32C check value');
  for (const [name, crc] of implementations) {
    t.equal(crc(check), 0xe3069283, `${name}: crc32c('123456789') is 0xE3069283`);
    t.equal(crc(new Uint8Array(0)), 0, `${name}: the CRC-32C of nothing is 0`);
    t.equal(crc(new Uint8Array(0), 0xdeadbeef), 0xdeadbeef, `${name}: nothing appended keeps the seed`);
    t.equal(crc(new Uint8Array(32)), 0x8a9136aa, `${name}: 32 zero bytes (RFC 3720 B.4)`);
    t.equal(crc(new Uint8Array(32).fill(0xff)), 0x62a8ab43, `${name}: 32 0xFF bytes (RFC 3720 B.4)`);
  }
  t.equal(crc32c(check, undefined), 0xe3069283, 'the seed defaults to 0');
});

t.test('chains across every split point of a 1 KiB buffer', async (t) => {
  const data = random(1).bytes(KiB);
  const whole = referenceCrc32c(data);
  for (const [name, crc] of implementations) {
    t.equal(crc(data), whole, `${name}: the whole buffer`);
    const wrong: number[] = [];
    for (let split = 0; split <= data.length; split++) {
      if (crc(data.subarray(split), crc(data.subarray(0, split))) !== whole) wrong.push(split);
    }
    t.same(wrong, [], `${name}: crc32c(b, crc32c(a)) === crc32c(a + b) at every split`);
  }
});

t.test('agrees with the bitwise reference on random lengths and unaligned views', async (t) => {
  const rng = random(2);
  const backing = rng.bytes(80 * KiB);
  // Random lengths and offsets, plus the edges of the three-way blocks (3 × 256 and 3 × 8192 bytes)
  // and of the folding (from 1 KiB on, 256 bytes a step, the rest after it).
  const cases: [offset: number, length: number, seed: number][] = [];
  for (let i = 0; i < 300; i++) cases.push([rng.below(64), rng.below(4097), rng.below(2) ? 0 : rng.below(2 ** 32)]);
  for (const length of [1, 7, 8, 9, 767, 768, 769, 775, 1023, 1024, 1025, 1279, 1280, 1281, 1791, 4096, 24575, 24576, 24577, 24583, 49152 + 768 + 13, 73727]) {
    for (const offset of [0, 1, 3, 5]) cases.push([offset, length, 0x12345678]);
  }
  for (const [name, crc] of implementations) {
    const wrong = cases.filter(([offset, length, seed]) => {
      const view = backing.subarray(offset, offset + length);
      return crc(view, seed) !== referenceCrc32c(view, seed);
    });
    t.same(wrong, [], `${name}: ${cases.length} views (offset, length, seed) agree`);
  }
});

t.test('reads exactly the bytes of any TypedArray or DataView', async (t) => {
  const bytes = random(3).bytes(4 * KiB + 8);
  const expected = referenceCrc32c(bytes.subarray(8, 8 + 4 * KiB));
  const { buffer } = bytes;
  t.equal(native.crc32c(Buffer.from(buffer, 8, 4 * KiB), 0), expected, 'Buffer');
  t.equal(native.crc32c(new Uint32Array(buffer, 8, KiB), 0), expected, 'Uint32Array (byte length, not element count)');
  t.equal(native.crc32c(new Float64Array(buffer, 8, KiB / 2), 0), expected, 'Float64Array');
  t.equal(native.crc32c(new DataView(buffer, 8, 4 * KiB), 0), expected, 'DataView');
  t.equal(native.crc32c(new Uint16Array(buffer, 8, 2 * KiB), 0, true), expected, 'Uint16Array, portable');
});

t.test('a 64 MiB buffer equals its chained pieces and the portable tables', async (t) => {
  const data = new Uint8Array(64 * MiB);
  const piece = random(4).bytes(MiB + 7);
  for (let offset = 0; offset < data.length; offset += piece.length) data.set(piece.subarray(0, Math.min(piece.length, data.length - offset)), offset);
  const whole = crc32c(data);
  t.equal(native.crc32c(data, 0, true), whole, 'the table implementation agrees');
  let chained = 0;
  for (let offset = 0, size = 1; offset < data.length; size = (size * 3 + 1) % (3 * MiB)) {
    const end = Math.min(data.length, offset + size);
    chained = crc32c(data.subarray(offset, end), chained);
    offset = end;
  }
  t.equal(chained, whole, 'pieces of irregular sizes chained');
  const unaligned = data.subarray(3, data.length - 5);
  t.equal(crc32c(unaligned), native.crc32c(unaligned, 0, true), 'an unaligned 64 MiB view');
});

t.test('crc32cZeros extends a CRC over zero bytes without reading them', async (t) => {
  for (const start of [0, 0xe3069283, 0xffffffff, 1]) {
    for (const zeroBytes of [0, 1, 7, 4095, 4096, 4096 * 3 + 5, 100000]) {
      t.equal(crc32cZeros(start, zeroBytes), referenceCrc32c(new Uint8Array(zeroBytes), start), `crc ${start.toString(16)} + ${zeroBytes} zeros`);
    }
  }
  // 1 GiB of real zeros, hashed 1 MiB at a time, against the O(log n) extension.
  const zeroMiB = new Uint8Array(MiB);
  let crc = 0x5eed;
  for (let i = 0; i < 1024; i++) crc = crc32c(zeroMiB, crc);
  t.equal(crc32cZeros(0x5eed, 1024 * MiB), crc, '1 GiB of zeros');
  // Beyond what can be hashed: extending by a then b is extending by a + b.
  const huge = 2 ** 52 + 12345;
  t.equal(crc32cZeros(crc32cZeros(0x5eed, huge), 2 ** 40 + 1), crc32cZeros(0x5eed, huge + 2 ** 40 + 1), 'a + b zeros, past 2^52');
  t.equal(crc32cZeros(crc32cZeros(0x5eed, 1024 * MiB), 3), crc32c(new Uint8Array(3), crc), '1 GiB + 3 zeros');
});

t.test('bad arguments are refused', async (t) => {
  const notViews: unknown[] = ['abc', 42, undefined, null, {}, [1, 2, 3], new ArrayBuffer(4)];
  for (const data of notViews) {
    t.throws(() => crc32c(data as Uint8Array), { name: 'TypeError', message: 'data must be a TypedArray, DataView or Buffer' }, `data ${String(data)}`);
  }
  t.throws(() => crc32c(new Uint8Array(1), '1' as unknown as number), { name: 'TypeError', message: 'seed must be a number (a CRC-32C value)' });
  t.throws(() => crc32c(new Uint8Array(1), 1n as unknown as number), { name: 'TypeError', message: 'seed must be a number (a CRC-32C value)' });
  for (const [seed, shown] of [[-1, '-1'], [2 ** 32, '4294967296'], [1.5, '1.5'], [NaN, 'NaN'], [Infinity, 'Infinity']] as const) {
    t.throws(() => crc32c(new Uint8Array(1), seed), { name: 'RangeError', message: `seed must be an integer 0..4294967295, got ${shown}` });
  }
  t.throws(() => native.crc32c(new Uint8Array(1), 0, 1 as unknown as boolean), { name: 'TypeError', message: 'portable must be a boolean' });
  t.throws(() => crc32cZeros(-1, 1), { name: 'RangeError', message: 'crc must be an integer 0..4294967295, got -1' });
  t.throws(() => crc32cZeros(2 ** 32, 1), { name: 'RangeError', message: 'crc must be an integer 0..4294967295, got 4294967296' });
  t.throws(() => crc32cZeros(0, -1), { name: 'RangeError', message: 'byteCount must be a non-negative safe integer, got -1' });
  t.throws(() => crc32cZeros(0, 0.5), { name: 'RangeError', message: 'byteCount must be a non-negative safe integer, got 0.5' });
  t.throws(() => crc32cZeros(0, 2 ** 53), { name: 'RangeError', message: 'byteCount must be a non-negative safe integer, got 9007199254740992' });
});
