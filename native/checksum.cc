// The migration stream's checksum (CRC-32C, native/crc32c.cc) for JavaScript, and the source's
// Pages sections made in one pass: zero-page scan, copy and CRC.
#include "checksum.h"

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmath>
#include <string>
#include <vector>

#include "crc32c.h"
#include "errors.h"

namespace nodekvm {

namespace {

uint32_t Crc32cBytes(uint32_t seed, const uint8_t* data, size_t length, bool portable) {
  uint32_t reg = ~seed;
  return ~(portable ? nodekvm_crc32c_register_portable(reg, data, length) : nodekvm_crc32c_register(reg, data, length));
}

constexpr size_t kPageBytes = 4096;

bool PageIsZero(const uint8_t* page) {
  uint64_t head[2];
  memcpy(head, page, sizeof head);
  if ((head[0] | head[1]) != 0) return false;  // data mostly shows in its first bytes
  uint64_t any = 0;
  for (size_t i = 0; i < kPageBytes; i += 64) {
    uint64_t words[8];
    memcpy(words, page + i, sizeof words);
    any |= words[0] | words[1] | words[2] | words[3] | words[4] | words[5] | words[6] | words[7];
    if (any != 0) return false;
  }
  return true;
}

void PutLe16(uint8_t* p, uint32_t v) {
  p[0] = static_cast<uint8_t>(v);
  p[1] = static_cast<uint8_t>(v >> 8);
}
void PutLe32(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; i++) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
void PutLe64(uint8_t* p, uint64_t v) {
  for (int i = 0; i < 8; i++) p[i] = static_cast<uint8_t>(v >> (8 * i));
}

struct PageRun {
  uint64_t firstPage;
  uint64_t pageCount;
  bool zero;
};

// A typed array's bytes, or a TypeError naming `name`.
uint8_t* BytesOf(Napi::Env env, Napi::Value value, const char* name, size_t* length) {
  if (!value.IsTypedArray() || value.As<Napi::TypedArray>().TypedArrayType() != napi_uint8_array) {
    ThrowTypeError(env, std::string(name) + " must be a Uint8Array");
  }
  Napi::Uint8Array array = value.As<Napi::Uint8Array>();
  *length = array.ByteLength();
  return array.Data();
}

}  // namespace

namespace {

// The arguments both encoders share, and the maximal runs of data and zero pages of their ranges
// (zero pages left out with destinationZeroed), as encodePages() makes them.
struct PageScan {
  const uint8_t* ram = nullptr;
  uint8_t* out = nullptr;
  size_t outBytes = 0;
  uint32_t sectionType = 0;
  std::vector<PageRun> runs;
  uint64_t pagesSent = 0;
  uint64_t zeroPages = 0;
};

PageScan ScanPages(Napi::Env env, const Napi::CallbackInfo& info) {
  PageScan scan;
  size_t ramBytes = 0;
  const uint8_t* ram = BytesOf(env, info[0], "ram", &ramBytes);
  scan.ram = ram;
  if (!info[1].IsTypedArray() || info[1].As<Napi::TypedArray>().TypedArrayType() != napi_float64_array) {
    ThrowTypeError(env, "ranges must be a Float64Array");
  }
  Napi::Float64Array ranges = info[1].As<Napi::Float64Array>();
  if (!info[2].IsNumber()) ThrowTypeError(env, "rangeCount must be a number");
  double rangeCountValue = info[2].As<Napi::Number>().DoubleValue();
  if (!(rangeCountValue >= 0 && std::floor(rangeCountValue) == rangeCountValue && 2 * rangeCountValue <= ranges.ElementLength())) {
    ThrowOutOfRangeError(env, "rangeCount must be an integer, at most half the length of ranges");
  }
  size_t rangeCount = static_cast<size_t>(rangeCountValue);
  if (!info[3].IsBoolean()) ThrowTypeError(env, "destinationZeroed must be a boolean");
  bool destinationZeroed = info[3].As<Napi::Boolean>().Value();
  scan.out = BytesOf(env, info[4], "out", &scan.outBytes);
  if (!info[5].IsNumber()) ThrowTypeError(env, "sectionType must be a number");
  scan.sectionType = info[5].As<Napi::Number>().Uint32Value();
  if (scan.sectionType > 0xffff) ThrowOutOfRangeError(env, "sectionType must be a u16");

  const uint64_t ramPages = ramBytes / kPageBytes;
  bool haveLast = false;
  PageRun last{0, 0, false};
  for (size_t r = 0; r < rangeCount; r++) {
    double first = ranges[2 * r];
    double count = ranges[2 * r + 1];
    if (!(first >= 0 && count >= 0 && std::floor(first) == first && std::floor(count) == count && first + count <= static_cast<double>(ramPages))) {
      ThrowOutOfRangeError(env, "ranges[" + std::to_string(r) + "] lies outside guest RAM");
    }
    uint64_t end = static_cast<uint64_t>(first) + static_cast<uint64_t>(count);
    for (uint64_t page = static_cast<uint64_t>(first); page < end; page++) {
      bool zero = PageIsZero(ram + page * kPageBytes);
      if (zero) scan.zeroPages++;
      else scan.pagesSent++;
      if (zero && destinationZeroed) continue;
      if (haveLast && last.zero == zero && last.firstPage + last.pageCount == page) {
        last.pageCount++;
        continue;
      }
      if (haveLast) scan.runs.push_back(last);
      last = PageRun{page, 1, zero};
      haveLast = true;
    }
  }
  if (haveLast) scan.runs.push_back(last);
  return scan;
}

constexpr size_t kHeaderBytes = 8;
constexpr size_t kRangeBytes = 16;
constexpr uint32_t kPagesFlagLive = 1;

// The section header and the range table at `out`, once checked to fit.
void PutHeaderAndTable(Napi::Env env, const PageScan& scan, uint32_t flags, size_t payloadBytes, size_t sectionBytes) {
  const size_t tableBytes = 4 + scan.runs.size() * kRangeBytes;
  if (scan.runs.size() > 65536 || payloadBytes > 32u * 1024 * 1024 + tableBytes + 4) {
    ThrowOutOfRangeError(env, "the pages do not fit in one Pages section");
  }
  if (sectionBytes > scan.outBytes) {
    ThrowOutOfRangeError(env, "out holds " + std::to_string(scan.outBytes) + " bytes, the section needs " + std::to_string(sectionBytes));
  }
  uint8_t* out = scan.out;
  PutLe16(out, scan.sectionType);
  PutLe16(out + 2, flags);
  PutLe32(out + 4, static_cast<uint32_t>(payloadBytes));
  uint8_t* entry = out + kHeaderBytes;
  PutLe32(entry, static_cast<uint32_t>(scan.runs.size()));
  entry += 4;
  for (const PageRun& run : scan.runs) {
    PutLe64(entry, run.firstPage);
    PutLe32(entry + 8, static_cast<uint32_t>(run.pageCount));
    PutLe32(entry + 12, run.zero ? 1 : 0);
    entry += kRangeBytes;
  }
}

}  // namespace

Napi::Value EncodePagesSection(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  PageScan scan = ScanPages(env, info);
  const std::vector<PageRun>& runs = scan.runs;
  const uint64_t pagesSent = scan.pagesSent;
  const uint8_t* ram = scan.ram;
  uint8_t* out = scan.out;

  Napi::Array result = Napi::Array::New(env, 3);
  result.Set(1u, Napi::Number::New(env, static_cast<double>(pagesSent)));
  result.Set(2u, Napi::Number::New(env, static_cast<double>(scan.zeroPages)));
  if (runs.empty()) {
    result.Set(0u, Napi::Number::New(env, 0));
    return result;
  }
  const size_t tableBytes = 4 + runs.size() * kRangeBytes;
  const size_t payloadBytes = tableBytes + pagesSent * kPageBytes;
  const size_t sectionBytes = kHeaderBytes + payloadBytes + 4;
  PutHeaderAndTable(env, scan, 0, payloadBytes, sectionBytes);
  uint32_t reg = nodekvm_crc32c_register(~0u, out, kHeaderBytes + tableBytes);
  uint8_t* data = out + kHeaderBytes + tableBytes;
  for (const PageRun& run : runs) {
    if (run.zero) continue;
    size_t bytes = run.pageCount * kPageBytes;
    reg = nodekvm_copy_crc32c_register(reg, data, ram + run.firstPage * kPageBytes, bytes);
    data += bytes;
  }
  PutLe32(data, ~reg);
  result.Set(0u, Napi::Number::New(env, static_cast<double>(sectionBytes)));
  return result;
}

Napi::Value EncodeLivePagesSection(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  PageScan scan = ScanPages(env, info);
  if (!info[6].IsTypedArray() || info[6].As<Napi::TypedArray>().TypedArrayType() != napi_float64_array) {
    ThrowTypeError(env, "dataRuns must be a Float64Array");
  }
  Napi::Float64Array dataRuns = info[6].As<Napi::Float64Array>();
  Napi::Array result = Napi::Array::New(env, 4);
  result.Set(1u, Napi::Number::New(env, static_cast<double>(scan.pagesSent)));
  result.Set(2u, Napi::Number::New(env, static_cast<double>(scan.zeroPages)));
  if (scan.runs.empty()) {
    result.Set(0u, Napi::Number::New(env, 0));
    result.Set(3u, Napi::Number::New(env, 0));
    return result;
  }
  size_t dataRunCount = 0;
  for (const PageRun& run : scan.runs) dataRunCount += run.zero ? 0 : 1;
  if (2 * dataRunCount > dataRuns.ElementLength()) ThrowOutOfRangeError(env, "dataRuns is too short for the section's data runs");
  const size_t tableBytes = 4 + scan.runs.size() * kRangeBytes;
  // The payload: the table, the data (sent from guest RAM), the data's own CRC.
  const size_t payloadBytes = tableBytes + scan.pagesSent * kPageBytes + 4;
  const size_t headBytes = kHeaderBytes + tableBytes;
  PutHeaderAndTable(env, scan, kPagesFlagLive, payloadBytes, headBytes + 8);
  uint32_t dataReg = ~0u;
  size_t next = 0;
  for (const PageRun& run : scan.runs) {
    if (run.zero) continue;
    const uint64_t offset = run.firstPage * kPageBytes;
    const uint64_t bytes = run.pageCount * kPageBytes;
    dataReg = nodekvm_crc32c_register(dataReg, scan.ram + offset, bytes);
    dataRuns[2 * next] = static_cast<double>(offset);
    dataRuns[2 * next + 1] = static_cast<double>(bytes);
    next++;
  }
  uint8_t* tail = scan.out + headBytes;
  PutLe32(tail, ~dataReg);
  // The section's own CRC leaves the data out: it covers the header, the table and the data's CRC.
  uint32_t sectionReg = nodekvm_crc32c_register(~0u, scan.out, headBytes + 4);
  PutLe32(tail + 4, ~sectionReg);
  result.Set(0u, Napi::Number::New(env, static_cast<double>(headBytes)));
  result.Set(3u, Napi::Number::New(env, static_cast<double>(dataRunCount)));
  return result;
}

Napi::Value Crc32c(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  void* data = nullptr;
  size_t byteLength = 0;
  if (info[0].IsTypedArray()) {
    napi_typedarray_type type;
    size_t elementCount;
    if (napi_get_typedarray_info(env, info[0], &type, &elementCount, &data, nullptr, nullptr) != napi_ok) throw Napi::Error::New(env);
    size_t elementBytes = 1;
    switch (type) {
      case napi_int16_array: case napi_uint16_array: elementBytes = 2; break;
      case napi_int32_array: case napi_uint32_array: case napi_float32_array: elementBytes = 4; break;
      case napi_float64_array: case napi_bigint64_array: case napi_biguint64_array: elementBytes = 8; break;
      default: break;
    }
    byteLength = elementCount * elementBytes;
  } else if (info[0].IsDataView()) {
    if (napi_get_dataview_info(env, info[0], &byteLength, &data, nullptr, nullptr) != napi_ok) throw Napi::Error::New(env);
  } else {
    ThrowTypeError(env, "data must be a TypedArray, DataView or Buffer");
  }
  if (!info[1].IsNumber()) ThrowTypeError(env, "seed must be a number (a CRC-32C value)");
  double seed = info[1].As<Napi::Number>().DoubleValue();
  if (!(seed >= 0 && seed <= 4294967295.0 && std::floor(seed) == seed)) {
    ThrowOutOfRangeError(env, "seed must be an integer 0..4294967295, got " + info[1].ToString().Utf8Value());
  }
  bool portable = false;
  if (!info[2].IsUndefined()) {
    if (!info[2].IsBoolean()) ThrowTypeError(env, "portable must be a boolean");
    portable = info[2].As<Napi::Boolean>().Value();
  }
  uint32_t crc = Crc32cBytes(static_cast<uint32_t>(seed), static_cast<const uint8_t*>(data), byteLength, portable);
  return Napi::Number::New(env, crc);
}

}  // namespace nodekvm
