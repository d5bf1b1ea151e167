// A vCPU's whole state in one call each way, as one buffer of raw KVM structs: what a migration
// needs inside the guest's downtime, where a dozen ioctls each decoded into JavaScript objects
// cost milliseconds on a cold path. The layout (lib/kvm/vcpu-state-blob.ts reads and checks it):
//
//   header, 24 bytes: u32 magic 'KVCS', u16 version 1, u16 flags (1: LAPIC present,
//     2: halted by the VMM), u32 vcpuId, u32 tscKhz (0: unknown), u32 section count, u32 0
//   sections, each: u32 tag, u32 byte length, the struct, padded to 8 bytes
//     1 kvm_cpuid2, 2 kvm_mp_state, 3 kvm_regs, 4 kvm_sregs, 5 XSAVE region, 6 kvm_xcrs,
//     7 kvm_debugregs, 8 kvm_lapic_state, 9 kvm_msrs, 10 kvm_vcpu_events
//
// Both run on the vCPU's own thread (Handles::Vcpu enforces it), the machine paused.
#include "vcpu-state.h"

#include <errno.h>
#include <linux/kvm.h>
#include <sys/ioctl.h>

#include <cstring>
#include <string>
#include <vector>

#include "abi.h"
#include "errors.h"
#include "handles.h"

namespace nodekvm {

namespace {

constexpr uint32_t kMagic = 0x5343564b;  // 'KVCS'
constexpr uint16_t kVersion = 1;
constexpr uint16_t kFlagLapic = 1;
constexpr uint16_t kFlagVmmHalted = 2;
constexpr size_t kHeaderBytes = 24;
constexpr uint32_t kMaxEntries = 4096;
constexpr uint32_t kMaxXsaveBytes = 1u << 20;
// struct kvm_xsave without its flexible tail (C++ compilers size such structs differently: abi.c).
constexpr uint32_t kLegacyXsaveBytes = 4096;

enum Tag : uint32_t {
  kCpuid = 1,
  kMpState = 2,
  kRegs = 3,
  kSregs = 4,
  kXsave = 5,
  kXcrs = 6,
  kDebugRegs = 7,
  kLapic = 8,
  kMsrs = 9,
  kEvents = 10,
  kTagCount = 11,
};

const unsigned long kGetMpState = AbiRequest("KVM_GET_MP_STATE");
const unsigned long kSetMpState = AbiRequest("KVM_SET_MP_STATE");
const unsigned long kGetRegs = AbiRequest("KVM_GET_REGS");
const unsigned long kSetRegs = AbiRequest("KVM_SET_REGS");
const unsigned long kGetSregs = AbiRequest("KVM_GET_SREGS");
const unsigned long kSetSregs = AbiRequest("KVM_SET_SREGS");
const unsigned long kGetXsave = AbiRequest("KVM_GET_XSAVE");
const unsigned long kGetXsave2 = AbiRequest("KVM_GET_XSAVE2");
const unsigned long kSetXsave = AbiRequest("KVM_SET_XSAVE");
const unsigned long kGetXcrs = AbiRequest("KVM_GET_XCRS");
const unsigned long kSetXcrs = AbiRequest("KVM_SET_XCRS");
const unsigned long kGetDebugRegs = AbiRequest("KVM_GET_DEBUGREGS");
const unsigned long kSetDebugRegs = AbiRequest("KVM_SET_DEBUGREGS");
const unsigned long kGetLapic = AbiRequest("KVM_GET_LAPIC");
const unsigned long kSetLapic = AbiRequest("KVM_SET_LAPIC");
const unsigned long kGetMsrs = AbiRequest("KVM_GET_MSRS");
const unsigned long kSetMsrs = AbiRequest("KVM_SET_MSRS");
const unsigned long kGetEvents = AbiRequest("KVM_GET_VCPU_EVENTS");
const unsigned long kSetEvents = AbiRequest("KVM_SET_VCPU_EVENTS");
const unsigned long kSetCpuid2 = AbiRequest("KVM_SET_CPUID2");
const unsigned long kGetCpuid2 = AbiRequest("KVM_GET_CPUID2");
const unsigned long kGetTscKhz = AbiRequest("KVM_GET_TSC_KHZ");
const unsigned long kSetTscKhz = AbiRequest("KVM_SET_TSC_KHZ");
const size_t kMsrEntryBytes = AbiSize("kvm_msr_entry");
const size_t kCpuidEntryBytes = AbiSize("kvm_cpuid_entry2");

constexpr size_t Pad8(size_t n) { return (n + 7) & ~static_cast<size_t>(7); }

int Retry(int fd, unsigned long request, void* arg) {
  int result;
  int interrupted = 0;
  do {
    result = ioctl(fd, request, arg);
  } while (result == -1 && errno == EINTR && ++interrupted < 100);
  return result;
}

void Check(Napi::Env env, int result, const char* syscall) {
  if (result == -1) ThrowSyscallError(env, errno, syscall);
}

struct Writer {
  std::vector<uint8_t> bytes;
  uint32_t sections = 0;
  // A section of `size` bytes, zeroed, for an ioctl to fill.
  uint8_t* Add(uint32_t tag, size_t size) {
    size_t at = bytes.size();
    bytes.resize(at + 8 + Pad8(size), 0);
    uint32_t header[2] = {tag, static_cast<uint32_t>(size)};
    std::memcpy(bytes.data() + at, header, 8);
    sections++;
    return bytes.data() + at + 8;
  }
};

struct Parsed {
  uint16_t flags = 0;
  uint32_t vcpuId = 0;
  uint32_t tscKhz = 0;
  const uint8_t* section[kTagCount] = {};
  uint32_t length[kTagCount] = {};
};

// Checks the whole buffer before anything is applied; the error names what is wrong.
bool Parse(const uint8_t* data, size_t size, Parsed* out, std::string* error) {
  if (size < kHeaderBytes) return *error = "shorter than its header", false;
  uint32_t magic;
  uint16_t version;
  uint32_t count;
  std::memcpy(&magic, data, 4);
  std::memcpy(&version, data + 4, 2);
  std::memcpy(&out->flags, data + 6, 2);
  std::memcpy(&out->vcpuId, data + 8, 4);
  std::memcpy(&out->tscKhz, data + 12, 4);
  std::memcpy(&count, data + 16, 4);
  if (magic != kMagic) return *error = "not a vCPU state", false;
  if (version != kVersion) return *error = "vCPU state version " + std::to_string(version) + " (this build reads 1)", false;
  size_t at = kHeaderBytes;
  for (uint32_t i = 0; i < count; i++) {
    if (size - at < 8) return *error = "truncated", false;
    uint32_t tag, length;
    std::memcpy(&tag, data + at, 4);
    std::memcpy(&length, data + at + 4, 4);
    at += 8;
    if (tag == 0 || tag >= kTagCount) return *error = "unknown section " + std::to_string(tag), false;
    if (out->section[tag] != nullptr) return *error = "section " + std::to_string(tag) + " twice", false;
    if (length > size - at || Pad8(length) > size - at) return *error = "truncated", false;
    size_t expected = 0;
    switch (tag) {
      case kMpState: expected = sizeof(kvm_mp_state); break;
      case kRegs: expected = sizeof(kvm_regs); break;
      case kSregs: expected = sizeof(kvm_sregs); break;
      case kXcrs: expected = sizeof(kvm_xcrs); break;
      case kDebugRegs: expected = sizeof(kvm_debugregs); break;
      case kLapic: expected = sizeof(kvm_lapic_state); break;
      case kEvents: expected = sizeof(kvm_vcpu_events); break;
      case kXsave:
        // At least the legacy region; a larger host's region is taken whole.
        if (length < kLegacyXsaveBytes || length > kMaxXsaveBytes) return *error = "a bad XSAVE region", false;
        expected = length;
        break;
      case kCpuid:
      case kMsrs: {
        if (length < 8) return *error = "a short list", false;
        uint32_t n;
        std::memcpy(&n, data + at, 4);
        size_t element = tag == kCpuid ? kCpuidEntryBytes : kMsrEntryBytes;
        if (n > kMaxEntries) return *error = "a list too long", false;
        expected = 8 + n * element;
        break;
      }
    }
    if (length != expected) {
      return *error = "section " + std::to_string(tag) + " holds " + std::to_string(length) + " bytes, this host's struct " + std::to_string(expected), false;
    }
    out->section[tag] = data + at;
    out->length[tag] = length;
    at += Pad8(length);
  }
  if (at != size) return *error = "trailing bytes", false;
  for (uint32_t tag : {kMpState, kRegs, kSregs, kXsave, kXcrs, kDebugRegs, kMsrs, kEvents}) {
    if (out->section[tag] == nullptr) return *error = "no section " + std::to_string(tag), false;
  }
  if ((out->flags & kFlagLapic) != 0 && out->section[kLapic] == nullptr) return *error = "no LAPIC section", false;
  return true;
}

Napi::Uint8Array BytesArg(Napi::Env env, const Napi::Value& value, const char* what) {
  if (!value.IsTypedArray() || value.As<Napi::TypedArray>().TypedArrayType() != napi_uint8_array) {
    ThrowTypeError(env, std::string(what) + " must be a Uint8Array");
  }
  return value.As<Napi::Uint8Array>();
}

}  // namespace

// saveVcpuState(vcpu, msrIndices: Uint32Array, cpuid: Uint8Array (kvm_cpuid2), flags) -> Uint8Array
Napi::Value SaveVcpuState(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto vcpu = Handles::Vcpu(env, info[0]);
  if (!info[1].IsTypedArray() || info[1].As<Napi::TypedArray>().TypedArrayType() != napi_uint32_array) ThrowTypeError(env, "msrIndices must be a Uint32Array");
  auto indices = info[1].As<Napi::Uint32Array>();
  auto cpuid = BytesArg(env, info[2], "cpuid");
  if (!info[3].IsNumber()) ThrowTypeError(env, "flags must be a number");
  uint16_t flags = static_cast<uint16_t>(info[3].As<Napi::Number>().Uint32Value() & (kFlagLapic | kFlagVmmHalted));
  if (indices.ElementLength() > kMaxEntries) ThrowOutOfRangeError(env, "too many MSRs");
  uint32_t cpuidCount = 0;
  if (cpuid.ByteLength() >= 8) std::memcpy(&cpuidCount, cpuid.Data(), 4);
  if (cpuid.ByteLength() < 8 || cpuidCount > kMaxEntries || cpuid.ByteLength() < 8 + cpuidCount * kCpuidEntryBytes) {
    ThrowInvalidValueError(env, "cpuid must hold a kvm_cpuid2");
  }
  int fd = vcpu->fd;
  Writer w;
  w.bytes.reserve(kHeaderBytes + 8192 + vcpu->xsaveBytes + indices.ElementLength() * kMsrEntryBytes + cpuidCount * kCpuidEntryBytes);
  w.bytes.resize(kHeaderBytes, 0);
  // MP state first: reading it lets KVM fold pending LAPIC events into it (api.rst, KVM_GET_MP_STATE).
  Check(env, Retry(fd, kGetMpState, w.Add(kMpState, sizeof(kvm_mp_state))), "ioctl(KVM_GET_MP_STATE)");
  std::memcpy(w.Add(kCpuid, 8 + cpuidCount * kCpuidEntryBytes), cpuid.Data(), 8 + cpuidCount * kCpuidEntryBytes);
  Check(env, Retry(fd, kGetRegs, w.Add(kRegs, sizeof(kvm_regs))), "ioctl(KVM_GET_REGS)");
  Check(env, Retry(fd, kGetSregs, w.Add(kSregs, sizeof(kvm_sregs))), "ioctl(KVM_GET_SREGS)");
  bool xsave2 = vcpu->xsaveBytes > kLegacyXsaveBytes;
  Check(env, Retry(fd, xsave2 ? kGetXsave2 : kGetXsave, w.Add(kXsave, vcpu->xsaveBytes)), "ioctl(KVM_GET_XSAVE)");
  Check(env, Retry(fd, kGetXcrs, w.Add(kXcrs, sizeof(kvm_xcrs))), "ioctl(KVM_GET_XCRS)");
  Check(env, Retry(fd, kGetDebugRegs, w.Add(kDebugRegs, sizeof(kvm_debugregs))), "ioctl(KVM_GET_DEBUGREGS)");
  if (flags & kFlagLapic) Check(env, Retry(fd, kGetLapic, w.Add(kLapic, sizeof(kvm_lapic_state))), "ioctl(KVM_GET_LAPIC)");
  size_t msrCount = indices.ElementLength();
  uint8_t* msrs = w.Add(kMsrs, 8 + msrCount * kMsrEntryBytes);
  uint32_t nmsrs = static_cast<uint32_t>(msrCount);
  std::memcpy(msrs, &nmsrs, 4);
  for (size_t i = 0; i < msrCount; i++) {
    uint32_t index = indices[i];
    std::memcpy(msrs + 8 + i * kMsrEntryBytes, &index, 4);
  }
  if (msrCount > 0) {
    int read = Retry(fd, kGetMsrs, msrs);
    Check(env, read, "ioctl(KVM_GET_MSRS)");
    if (static_cast<size_t>(read) != msrCount) ThrowSyscallError(env, EIO, "ioctl(KVM_GET_MSRS)");
  }
  Check(env, Retry(fd, kGetEvents, w.Add(kEvents, sizeof(kvm_vcpu_events))), "ioctl(KVM_GET_VCPU_EVENTS)");
  int tscKhz = ioctl(fd, kGetTscKhz, 0);
  uint32_t header[6] = {kMagic, static_cast<uint32_t>(kVersion) | (static_cast<uint32_t>(flags) << 16), vcpu->shared->vcpuId,
                        tscKhz > 0 ? static_cast<uint32_t>(tscKhz) : 0u, w.sections, 0};
  std::memcpy(w.bytes.data(), header, kHeaderBytes);
  auto out = Napi::Uint8Array::New(env, w.bytes.size());
  std::memcpy(out.Data(), w.bytes.data(), w.bytes.size());
  return out;
}

// checkVcpuState(state: Uint8Array) -> null, or what is wrong with it. Any thread.
Napi::Value CheckVcpuState(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto state = BytesArg(env, info[0], "state");
  Parsed parsed;
  std::string error;
  if (!Parse(state.Data(), state.ByteLength(), &parsed, &error)) return Napi::String::New(env, error);
  return env.Null();
}

// restoreVcpuState(vcpu, state: Uint8Array, currentCpuid: Uint8Array | null, irqchip) -> refused MSR
// indices (non-zero values the host would not take). The order is KVM's: CPUID before anything
// that depends on it, the LAPIC before MSRs (the TSC deadline MSR depends on its mode), events last.
namespace {

Napi::Value Restore(const Napi::CallbackInfo& info, int fd, size_t xsaveBytes, uint32_t vcpuId) {
  Napi::Env env = info.Env();
  auto state = BytesArg(env, info[1], "state");
  bool irqchip = info[3].ToBoolean().Value();
  Parsed p;
  std::string error;
  if (!Parse(state.Data(), state.ByteLength(), &p, &error)) ThrowInvalidValueError(env, "bad vCPU state: " + error);
  if (p.vcpuId != vcpuId) {
    ThrowInvalidValueError(env, "state of vCPU " + std::to_string(p.vcpuId) + " given to vCPU " + std::to_string(vcpuId));
  }
  // The kernel reads from copies in aligned native memory.
  auto copy = [&](uint32_t tag) {
    std::vector<uint64_t> words(Pad8(p.length[tag]) / 8 + 1, 0);
    std::memcpy(words.data(), p.section[tag], p.length[tag]);
    return words;
  };
  if (p.section[kCpuid] != nullptr) {
    bool same = false;
    if (info[2].IsTypedArray()) {
      auto current = BytesArg(env, info[2], "currentCpuid");
      same = current.ByteLength() >= p.length[kCpuid] && std::memcmp(current.Data(), p.section[kCpuid], p.length[kCpuid]) == 0;
    } else {
      // Not told: ask KVM what the vCPU has (a fresh vCPU answers as it was given).
      std::vector<uint64_t> words(Pad8(p.length[kCpuid]) / 8 + 1, 0);
      std::memcpy(words.data(), p.section[kCpuid], 4);
      same = Retry(fd, kGetCpuid2, words.data()) == 0 && std::memcmp(words.data(), p.section[kCpuid], p.length[kCpuid]) == 0;
    }
    // The same CPUID again (a destination on the same kind of host) needs no ioctl.
    if (!same) {
      auto words = copy(kCpuid);
      Check(env, Retry(fd, kSetCpuid2, words.data()), "ioctl(KVM_SET_CPUID2)");
    }
  }
  if (p.tscKhz > 0) {
    int current = ioctl(fd, kGetTscKhz, 0);
    // Hosts without TSC scaling keep their own frequency; the guest's kvmclock copes.
    if (current > 0 && static_cast<uint32_t>(current) != p.tscKhz) ioctl(fd, kSetTscKhz, static_cast<unsigned long>(p.tscKhz));
  }
  auto set = [&](uint32_t tag, unsigned long request, const char* syscall) {
    auto words = copy(tag);
    Check(env, Retry(fd, request, words.data()), syscall);
  };
  set(kMpState, kSetMpState, "ioctl(KVM_SET_MP_STATE)");
  set(kRegs, kSetRegs, "ioctl(KVM_SET_REGS)");
  set(kSregs, kSetSregs, "ioctl(KVM_SET_SREGS)");
  {
    size_t region = xsaveBytes > p.length[kXsave] ? xsaveBytes : p.length[kXsave];
    std::vector<uint64_t> words(Pad8(region) / 8 + 1, 0);
    std::memcpy(words.data(), p.section[kXsave], p.length[kXsave]);
    Check(env, Retry(fd, kSetXsave, words.data()), "ioctl(KVM_SET_XSAVE)");
  }
  uint32_t nrXcrs;
  std::memcpy(&nrXcrs, p.section[kXcrs], 4);
  if (nrXcrs > 0) set(kXcrs, kSetXcrs, "ioctl(KVM_SET_XCRS)");
  set(kDebugRegs, kSetDebugRegs, "ioctl(KVM_SET_DEBUGREGS)");
  if (irqchip && p.section[kLapic] != nullptr) set(kLapic, kSetLapic, "ioctl(KVM_SET_LAPIC)");
  Napi::Array refused = Napi::Array::New(env);
  uint32_t nmsrs;
  std::memcpy(&nmsrs, p.section[kMsrs], 4);
  if (nmsrs > 0) {
    auto words = copy(kMsrs);
    int written = Retry(fd, kSetMsrs, words.data());
    if (written != static_cast<int>(nmsrs)) {
      // One refused MSR must not cost the rest: set them one by one and report the refusals of
      // non-zero values (a zero is what a new vCPU holds anyway).
      for (uint32_t i = 0; i < nmsrs; i++) {
        uint64_t one[3] = {1, 0, 0};
        std::memcpy(&one[1], p.section[kMsrs] + 8 + i * kMsrEntryBytes, kMsrEntryBytes);
        if (Retry(fd, kSetMsrs, one) != 1 && one[2] != 0) {
          uint32_t index;
          std::memcpy(&index, &one[1], 4);
          refused.Set(refused.Length(), Napi::Number::New(env, index));
        }
      }
    }
  }
  set(kEvents, kSetEvents, "ioctl(KVM_SET_VCPU_EVENTS)");
  return refused;
}

}  // namespace

Napi::Value RestoreVcpuState(const Napi::CallbackInfo& info) {
  auto vcpu = Handles::Vcpu(info.Env(), info[0]);
  return Restore(info, vcpu->fd, vcpu->xsaveBytes, vcpu->shared->vcpuId);
}

// restoreParkedVcpuState(kickHandle, state, currentCpuid, irqchip): restoreVcpuState() from any
// thread, for a vCPU whose own thread is parked (it makes no ioctl meanwhile; KVM serializes a
// vCPU's ioctls on its mutex anyway, and only KVM_RUN cares which thread calls it). Spares the
// round trip to that thread inside a migration's downtime. The vCPU cannot close meanwhile.
Napi::Value RestoreParkedVcpuState(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint32_t id = HandleId(env, info[0], "vcpu");
  auto shared = Handles::FindVcpuShared(id);
  if (!shared) ThrowStateError(env, "EBADF", "Vcpu handle is closed");
  std::lock_guard<std::mutex> guard(shared->lock);
  if (shared->closed || shared->fd < 0) ThrowStateError(env, "EBADF", "Vcpu handle is closed");
  return Restore(info, shared->fd, shared->xsaveBytes, shared->vcpuId);
}

}  // namespace nodekvm
