// The framing the raw state blobs share (vcpu-state.cc, vm-state.cc), written once so that the
// two cannot drift apart:
//
//   header: u32 magic, u16 version, u16 flags, the format's own u32 words, u32 section count, u32 0
//   sections, each: u32 tag, u32 byte length, the struct, padded to 8 bytes
//
// Each file keeps its magic, its tags and what each section must hold.
#pragma once

#include <errno.h>
#include <napi.h>
#include <sys/ioctl.h>

#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <string>
#include <vector>

#include "errors.h"

namespace nodekvm {

struct StateBlobFormat {
  uint32_t magic;
  uint16_t version;
  size_t headerBytes;  // the section count stands in its last 8 bytes, then a u32 0
  uint32_t tagCount;   // tags run from 1 to tagCount - 1
  const char* name;    // "vCPU state": in "vCPU state version 2 (this build reads 1)"
  const char* badMagicError;
};

constexpr size_t Pad8(size_t n) { return (n + 7) & ~static_cast<size_t>(7); }

// An ioctl retried when a signal interrupts it (a vCPU thread is signalled to leave KVM_RUN).
inline int RetryIoctl(int fd, unsigned long request, void* arg) {
  int result;
  int interrupted = 0;
  do {
    result = ioctl(fd, request, arg);
  } while (result == -1 && errno == EINTR && ++interrupted < 100);
  return result;
}

inline void CheckIoctl(Napi::Env env, int result, const char* syscall) {
  if (result == -1) ThrowSyscallError(env, errno, syscall);
}

inline Napi::Uint8Array BytesArg(Napi::Env env, const Napi::Value& value, const char* what) {
  if (!value.IsTypedArray() || value.As<Napi::TypedArray>().TypedArrayType() != napi_uint8_array) {
    ThrowTypeError(env, std::string(what) + " must be a Uint8Array");
  }
  return value.As<Napi::Uint8Array>();
}

class StateBlobWriter {
 public:
  explicit StateBlobWriter(const StateBlobFormat& format, size_t reserveBytes = 0) : format_(format) {
    bytes_.reserve(reserveBytes);
    bytes_.resize(format.headerBytes, 0);
  }

  // A section of `size` bytes, zeroed, for an ioctl to fill (valid until the next Add).
  uint8_t* Add(uint32_t tag, size_t size) {
    size_t at = bytes_.size();
    bytes_.resize(at + 8 + Pad8(size), 0);
    uint32_t header[2] = {tag, static_cast<uint32_t>(size)};
    std::memcpy(bytes_.data() + at, header, 8);
    sections_++;
    return bytes_.data() + at + 8;
  }

  // Writes the header (`words`: the format's own, after its flags) and copies the blob into a
  // JavaScript array.
  Napi::Uint8Array Finish(Napi::Env env, uint16_t flags, std::initializer_list<uint32_t> words = {}) {
    uint32_t start = static_cast<uint32_t>(format_.version) | (static_cast<uint32_t>(flags) << 16);
    std::memcpy(bytes_.data(), &format_.magic, 4);
    std::memcpy(bytes_.data() + 4, &start, 4);
    size_t at = 8;
    for (uint32_t word : words) {
      std::memcpy(bytes_.data() + at, &word, 4);
      at += 4;
    }
    std::memcpy(bytes_.data() + format_.headerBytes - 8, &sections_, 4);
    auto out = Napi::Uint8Array::New(env, bytes_.size());
    std::memcpy(out.Data(), bytes_.data(), bytes_.size());
    return out;
  }

 private:
  const StateBlobFormat& format_;
  std::vector<uint8_t> bytes_;
  uint32_t sections_ = 0;
};

// Checks the magic and version; reads the flags and section count.
inline bool ReadStateBlobHeader(const StateBlobFormat& format, const uint8_t* data, size_t size, uint16_t* flags, uint32_t* count,
                                std::string* error) {
  if (size < format.headerBytes) return *error = "shorter than its header", false;
  uint32_t magic;
  uint16_t version;
  std::memcpy(&magic, data, 4);
  std::memcpy(&version, data + 4, 2);
  std::memcpy(flags, data + 6, 2);
  std::memcpy(count, data + format.headerBytes - 8, 4);
  if (magic != format.magic) return *error = format.badMagicError, false;
  if (version != format.version) {
    return *error = std::string(format.name) + " version " + std::to_string(version) + " (this build reads " + std::to_string(format.version) + ")", false;
  }
  return true;
}

// Reads `count` sections after the header into section[tag] and length[tag] (arrays of
// format.tagCount): each tag known and found once, of the length this host's struct has, inside
// the buffer, nothing after the last. expectedBytes(tag, body, length, available, error) names
// the length a section must have on this host (it may read `available` bytes of its body), or
// returns 0 with *error set to refuse it.
template <typename ExpectedBytes>
bool ReadStateBlobSections(const StateBlobFormat& format, const uint8_t* data, size_t size, uint32_t count, const uint8_t** section,
                           uint32_t* length, ExpectedBytes expectedBytes, std::string* error) {
  size_t at = format.headerBytes;
  for (uint32_t i = 0; i < count; i++) {
    if (size - at < 8) return *error = "truncated section header", false;
    uint32_t tag, bytes;
    std::memcpy(&tag, data + at, 4);
    std::memcpy(&bytes, data + at + 4, 4);
    at += 8;
    if (tag == 0 || tag >= format.tagCount) return *error = "unknown section " + std::to_string(tag), false;
    if (section[tag] != nullptr) return *error = "section " + std::to_string(tag) + " twice", false;
    size_t expected = expectedBytes(tag, data + at, bytes, size - at, error);
    if (expected == 0) return false;
    if (bytes != expected) {
      return *error = "section " + std::to_string(tag) + " holds " + std::to_string(bytes) + " bytes, this host's struct " + std::to_string(expected), false;
    }
    if (Pad8(bytes) > size - at) return *error = "truncated section " + std::to_string(tag), false;
    section[tag] = data + at;
    length[tag] = bytes;
    at += Pad8(bytes);
  }
  if (at != size) return *error = "trailing bytes", false;
  return true;
}

}  // namespace nodekvm
