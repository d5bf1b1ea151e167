// CRC-32C (Castagnoli; iSCSI, RFC 3720 appendix B.4): reflected polynomial 0x82F63B78, register
// preset to all ones and inverted at the end, so that crc32c(b, crc32c(a)) == crc32c(a + b), as
// with zlib's crc32(). The migration stream checksums every byte it sends with it.
//
// Three implementations, chosen at run time:
// - VPCLMULQDQ (AVX-512), for buffers from 1 KiB: carry-less multiplication folds the data in
//   256 bytes at a time (see Crc32cVpclmul), 2-3 times the speed of the crc32 instruction.
// - SSE4.2: the crc32 instruction computes exactly this CRC, 8 bytes at a time. Its latency is 3
//   cycles and its throughput 1 per cycle, so large buffers are cut into three adjacent blocks
//   whose CRCs are computed side by side, then joined: the CRC register is linear, so the register
//   after blocks A and B is shift(register after A, |B|) ^ (register after B started from zero),
//   where shift() runs the register over |B| zero bytes (four table lookups, see ZeroShift).
// - Portable: slice-by-8 tables, for x86-64 CPUs without SSE4.2 and other architectures.
#include "crc32c.h"

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__)
#include <immintrin.h>
#include <nmmintrin.h>
#define NODEKVM_CRC32C_SSE42 1
#endif

// Plain C++ (no Node): the addon (checksum.cc) and the C reference benchmark (bench/c) link it.
namespace {

constexpr uint32_t kCastagnoliReflected = 0x82F63B78;
// Block sizes of the three-way loops. Long blocks amortize the join; short ones still hide the
// instruction's latency on buffers under 3 * kLongBlockBytes.
constexpr size_t kLongBlockBytes = 8192;
constexpr size_t kShortBlockBytes = 256;

// shift[k][b]: the register (b << 8k) run over a fixed number of zero bytes. The operation is
// linear, so the whole register is shifted by XOR-ing one lookup per byte.
using ZeroShift = uint32_t[4][256];

struct Tables {
  // slice[k][b]: the register b run over 1 + k zero bytes (slice[0] is the classic byte table).
  uint32_t slice[8][256];
  ZeroShift longShift;
  ZeroShift shortShift;
};

uint32_t AfterZeroBytes(const uint32_t byteTable[256], uint32_t reg, size_t zeroBytes) {
  for (size_t i = 0; i < zeroBytes; i++) reg = byteTable[reg & 0xff] ^ (reg >> 8);
  return reg;
}

void BuildZeroShift(const uint32_t byteTable[256], size_t zeroBytes, ZeroShift shift) {
  uint32_t bitImage[32];  // each register bit run over zeroBytes zero bytes
  for (int bit = 0; bit < 32; bit++) bitImage[bit] = AfterZeroBytes(byteTable, 1u << bit, zeroBytes);
  for (int k = 0; k < 4; k++) {
    shift[k][0] = 0;
    for (uint32_t b = 1; b < 256; b++) shift[k][b] = shift[k][b & (b - 1)] ^ bitImage[8 * k + __builtin_ctz(b)];
  }
}

Tables BuildTables() {
  Tables tables;
  for (uint32_t b = 0; b < 256; b++) {
    uint32_t reg = b;
    for (int i = 0; i < 8; i++) reg = (reg & 1) ? (reg >> 1) ^ kCastagnoliReflected : reg >> 1;
    tables.slice[0][b] = reg;
  }
  for (int k = 1; k < 8; k++) {
    for (uint32_t b = 0; b < 256; b++) {
      uint32_t prev = tables.slice[k - 1][b];
      tables.slice[k][b] = tables.slice[0][prev & 0xff] ^ (prev >> 8);
    }
  }
  BuildZeroShift(tables.slice[0], kLongBlockBytes, tables.longShift);
  BuildZeroShift(tables.slice[0], kShortBlockBytes, tables.shortShift);
  return tables;
}

const Tables& GetTables() {
  static const Tables tables = BuildTables();
  return tables;
}

inline uint32_t Shift(const ZeroShift shift, uint32_t reg) {
  return shift[0][reg & 0xff] ^ shift[1][(reg >> 8) & 0xff] ^ shift[2][(reg >> 16) & 0xff] ^ shift[3][reg >> 24];
}

// Little-endian loads, whatever the host's byte order and alignment.
inline uint32_t LoadLe32(const uint8_t* p) {
  return p[0] | (p[1] << 8) | (p[2] << 16) | (static_cast<uint32_t>(p[3]) << 24);
}

uint32_t Crc32cPortable(uint32_t reg, const uint8_t* data, size_t length) {
  const Tables& t = GetTables();
  while (length >= 8) {
    uint32_t low = reg ^ LoadLe32(data);
    reg = t.slice[7][low & 0xff] ^ t.slice[6][(low >> 8) & 0xff] ^ t.slice[5][(low >> 16) & 0xff] ^ t.slice[4][low >> 24] ^
          t.slice[3][data[4]] ^ t.slice[2][data[5]] ^ t.slice[1][data[6]] ^ t.slice[0][data[7]];
    data += 8;
    length -= 8;
  }
  for (; length > 0; length--) reg = t.slice[0][(reg ^ *data++) & 0xff] ^ (reg >> 8);
  return reg;
}

#ifdef NODEKVM_CRC32C_SSE42

inline uint64_t Load64(const uint8_t* p) {
  uint64_t value;
  memcpy(&value, p, sizeof value);
  return value;
}

// Three adjacent blocks of `blockBytes` at a time, joined with `shift` (which runs the register
// over blockBytes zero bytes).
__attribute__((target("sse4.2"))) inline uint32_t ThreeWay(uint32_t reg, const uint8_t*& data, size_t& length, size_t blockBytes,
                                                             const ZeroShift shift) {
  while (length >= 3 * blockBytes) {
    uint64_t reg0 = reg, reg1 = 0, reg2 = 0;
    const uint8_t* end = data + blockBytes;
    do {
      reg0 = _mm_crc32_u64(reg0, Load64(data));
      reg1 = _mm_crc32_u64(reg1, Load64(data + blockBytes));
      reg2 = _mm_crc32_u64(reg2, Load64(data + 2 * blockBytes));
      data += 8;
    } while (data < end);
    reg = Shift(shift, static_cast<uint32_t>(reg0)) ^ static_cast<uint32_t>(reg1);
    reg = Shift(shift, reg) ^ static_cast<uint32_t>(reg2);
    data += 2 * blockBytes;
    length -= 3 * blockBytes;
  }
  return reg;
}

__attribute__((target("sse4.2"))) uint32_t Crc32cSse42(uint32_t reg, const uint8_t* data, size_t length) {
  // 8-byte loads that never straddle a cache line.
  while (length > 0 && (reinterpret_cast<uintptr_t>(data) & 7) != 0) {
    reg = _mm_crc32_u8(reg, *data++);
    length--;
  }
  const Tables& t = GetTables();
  reg = ThreeWay(reg, data, length, kLongBlockBytes, t.longShift);
  reg = ThreeWay(reg, data, length, kShortBlockBytes, t.shortShift);
  uint64_t reg64 = reg;
  for (; length >= 8; length -= 8, data += 8) reg64 = _mm_crc32_u64(reg64, Load64(data));
  reg = static_cast<uint32_t>(reg64);
  for (; length > 0; length--) reg = _mm_crc32_u8(reg, *data++);
  return reg;
}

bool HasSse42() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("sse4.2") != 0;
  }();
  return has;
}

// Carry-less multiplication (VPCLMULQDQ, AVX-512): four 64-byte accumulators fold the data in,
// 256 bytes a step, several times the crc32 instruction's 8 bytes a cycle. Each 16-byte lane L is
// moved D bits on as clmul(L.low, x^(D+31) mod P) ^ clmul(L.high, x^(D-33) mod P) (bit-reflected
// constants), which leaves the CRC of the whole unchanged; the 64 bytes left at the end have the
// CRC of all that was folded (the register entered as their first bytes' XOR), taken with crc32.
constexpr uint64_t kFold2048Low = 0xdcb17aa4;  // x^2079 mod P, reflected: 256 bytes on
constexpr uint64_t kFold2048High = 0xb9e02b86;  // x^2015 mod P
constexpr uint64_t kFold512Low = 0x740eef02;  // x^543 mod P: 64 bytes on
constexpr uint64_t kFold512High = 0x9e4addf8;  // x^479 mod P
constexpr size_t kFoldMinBytes = 1024;

bool HasVpclmul() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("sse4.2") && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("vpclmulqdq");
  }();
  return has;
}

__attribute__((target("sse4.2,avx512f,avx512vl,vpclmulqdq"))) inline __m512i Fold(__m512i lanes, __m512i constants, __m512i next) {
  __m512i low = _mm512_clmulepi64_epi128(lanes, constants, 0x00);
  __m512i high = _mm512_clmulepi64_epi128(lanes, constants, 0x11);
  return _mm512_ternarylogic_epi64(low, high, next, 0x96);  // low ^ high ^ next
}

// At least kFoldMinBytes; the rest (under 256 bytes) goes through Crc32cSse42.
__attribute__((target("sse4.2,avx512f,avx512vl,vpclmulqdq"))) uint32_t Crc32cVpclmul(uint32_t reg, const uint8_t* data, size_t length) {
  __m512i x0 = _mm512_loadu_si512(data);
  __m512i x1 = _mm512_loadu_si512(data + 64);
  __m512i x2 = _mm512_loadu_si512(data + 128);
  __m512i x3 = _mm512_loadu_si512(data + 192);
  x0 = _mm512_xor_si512(x0, _mm512_zextsi128_si512(_mm_cvtsi32_si128(static_cast<int>(reg))));
  data += 256;
  length -= 256;
  const __m512i by256 = _mm512_set_epi64(kFold2048High, kFold2048Low, kFold2048High, kFold2048Low, kFold2048High, kFold2048Low, kFold2048High,
                                         kFold2048Low);
  while (length >= 256) {
    x0 = Fold(x0, by256, _mm512_loadu_si512(data));
    x1 = Fold(x1, by256, _mm512_loadu_si512(data + 64));
    x2 = Fold(x2, by256, _mm512_loadu_si512(data + 128));
    x3 = Fold(x3, by256, _mm512_loadu_si512(data + 192));
    data += 256;
    length -= 256;
  }
  const __m512i by64 = _mm512_set_epi64(kFold512High, kFold512Low, kFold512High, kFold512Low, kFold512High, kFold512Low, kFold512High, kFold512Low);
  x1 = Fold(x0, by64, x1);
  x2 = Fold(x1, by64, x2);
  x3 = Fold(x2, by64, x3);
  alignas(64) uint64_t last[8];
  _mm512_store_si512(last, x3);
  uint64_t reg64 = 0;
  for (uint64_t word : last) reg64 = _mm_crc32_u64(reg64, word);
  return Crc32cSse42(static_cast<uint32_t>(reg64), data, length);
}

// The fastest this CPU has: folding for long buffers, else the crc32 instruction, else tables.
uint32_t Crc32cFast(uint32_t reg, const uint8_t* data, size_t length) {
  if (length >= kFoldMinBytes && HasVpclmul()) return Crc32cVpclmul(reg, data, length);
  if (HasSse42()) return Crc32cSse42(reg, data, length);
  return Crc32cPortable(reg, data, length);
}

#else

uint32_t Crc32cFast(uint32_t reg, const uint8_t* data, size_t length) { return Crc32cPortable(reg, data, length); }

#endif  // NODEKVM_CRC32C_SSE42

// CRC-32C of `length` bytes copied from `src` to `dst`, continuing from `reg` (the register, not
// inverted): the copy in pieces that stay in the L1 cache for the checksum, so that the data is
// read from memory once. The CRC covers the bytes as they are in `dst` (`src` may change meanwhile).
uint32_t CopyCrc32cRegister(uint32_t reg, uint8_t* dst, const uint8_t* src, size_t length) {
  constexpr size_t kPieceBytes = 3 * kLongBlockBytes;
  while (length > 0) {
    size_t piece = length < kPieceBytes ? length : kPieceBytes;
    memcpy(dst, src, piece);
    reg = Crc32cFast(reg, dst, piece);
    dst += piece;
    src += piece;
    length -= piece;
  }
  return reg;
}


}  // namespace

extern "C" {

uint32_t nodekvm_crc32c_register(uint32_t reg, const uint8_t* data, size_t length) { return Crc32cFast(reg, data, length); }

uint32_t nodekvm_crc32c_register_portable(uint32_t reg, const uint8_t* data, size_t length) { return Crc32cPortable(reg, data, length); }

uint32_t nodekvm_copy_crc32c_register(uint32_t reg, uint8_t* dst, const uint8_t* src, size_t length) {
  return CopyCrc32cRegister(reg, dst, src, length);
}

}  // extern "C"
