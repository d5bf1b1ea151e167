// A vCPU's whole state in one call each way, as one buffer of raw KVM structs: what a migration
// needs inside the guest's downtime, where a dozen ioctls each decoded into JavaScript objects
// cost milliseconds on a cold path. The layout (lib/kvm/vcpu-state-blob.ts reads and checks it):
//
//   header, 24 bytes: u32 magic 'KVCS', u16 version 1, u16 flags (1: LAPIC present,
//     2: halted by the VMM), u32 vcpuId, u32 tscKhz (0: unknown), u32 section count, u32 0
//   sections, each: u32 tag, u32 byte length, the struct, padded to 8 bytes
//     1 kvm_cpuid2, 2 kvm_mp_state, 3 kvm_regs, 4 kvm_sregs, 5 XSAVE region, 6 kvm_xcrs,
//     7 kvm_debugregs, 8 kvm_lapic_state, 9 kvm_msrs, 10 kvm_vcpu_events
// (The framing, shared with the VM's: state-blob.h.)
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
#include "state-blob.h"

namespace nodekvm {

namespace {

constexpr uint16_t kFlagLapic = 1;
constexpr uint16_t kFlagVmmHalted = 2;
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

constexpr StateBlobFormat kFormat = {0x5343564b /* 'KVCS' */, 1, 24, kTagCount, "vCPU state", "not a vCPU state"};

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

struct Parsed {
  uint16_t flags = 0;
  uint32_t vcpuId = 0;
  uint32_t tscKhz = 0;
  const uint8_t* section[kTagCount] = {};
  uint32_t length[kTagCount] = {};
};

// Checks the whole buffer before anything is applied; the error names what is wrong.
bool Parse(const uint8_t* data, size_t size, Parsed* out, std::string* error) {
  uint32_t count;
  if (!ReadStateBlobHeader(kFormat, data, size, &out->flags, &count, error)) return false;
  std::memcpy(&out->vcpuId, data + 8, 4);
  std::memcpy(&out->tscKhz, data + 12, 4);
  auto expectedBytes = [](uint32_t tag, const uint8_t* body, uint32_t length, size_t available, std::string* error) -> size_t {
    switch (tag) {
      case kMpState: return sizeof(kvm_mp_state);
      case kRegs: return sizeof(kvm_regs);
      case kSregs: return sizeof(kvm_sregs);
      case kXcrs: return sizeof(kvm_xcrs);
      case kDebugRegs: return sizeof(kvm_debugregs);
      case kLapic: return sizeof(kvm_lapic_state);
      case kEvents: return sizeof(kvm_vcpu_events);
      case kXsave:
        // At least the legacy region; a larger host's region is taken whole.
        if (length < kLegacyXsaveBytes || length > kMaxXsaveBytes) return *error = "a bad XSAVE region", 0;
        return length;
      case kCpuid:
      case kMsrs: {
        if (length < 8) return *error = "a short list", 0;
        if (available < 8) return *error = "truncated section " + std::to_string(tag), 0;
        uint32_t n;
        std::memcpy(&n, body, 4);
        size_t element = tag == kCpuid ? kCpuidEntryBytes : kMsrEntryBytes;
        if (n > kMaxEntries) return *error = "a list too long", 0;
        return 8 + n * element;
      }
      default: return *error = "unknown section " + std::to_string(tag), 0;
    }
  };
  if (!ReadStateBlobSections(kFormat, data, size, count, out->section, out->length, expectedBytes, error)) return false;
  for (uint32_t tag : {kMpState, kRegs, kSregs, kXsave, kXcrs, kDebugRegs, kMsrs, kEvents}) {
    if (out->section[tag] == nullptr) return *error = "no section " + std::to_string(tag), false;
  }
  if ((out->flags & kFlagLapic) != 0 && out->section[kLapic] == nullptr) return *error = "no LAPIC section", false;
  return true;
}

// The vCPU's TSC frequency (kHz; 0 if KVM cannot say), asked of KVM once until it is set again.
uint32_t TscKhz(VcpuShared& shared, int fd) {
  uint32_t known = shared.tscKhz;
  if (known != 0) return known;
  int khz = ioctl(fd, kGetTscKhz, 0);
  if (khz <= 0) return 0;
  shared.tscKhz = static_cast<uint32_t>(khz);
  return static_cast<uint32_t>(khz);
}

}  // namespace

namespace {

// The save itself (saveVcpuState(), saveParkedVcpuState()): info[1..3] are the MSR indices, the
// CPUID and the flags.
Napi::Value Save(const Napi::CallbackInfo& info, int fd, size_t xsaveBytes, VcpuShared& shared) {
  Napi::Env env = info.Env();
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
  StateBlobWriter w(kFormat, kFormat.headerBytes + 8192 + xsaveBytes + indices.ElementLength() * kMsrEntryBytes + cpuidCount * kCpuidEntryBytes);
  // MP state first: reading it lets KVM fold pending LAPIC events into it (api.rst, KVM_GET_MP_STATE).
  CheckIoctl(env, RetryIoctl(fd, kGetMpState, w.Add(kMpState, sizeof(kvm_mp_state))), "ioctl(KVM_GET_MP_STATE)");
  std::memcpy(w.Add(kCpuid, 8 + cpuidCount * kCpuidEntryBytes), cpuid.Data(), 8 + cpuidCount * kCpuidEntryBytes);
  CheckIoctl(env, RetryIoctl(fd, kGetRegs, w.Add(kRegs, sizeof(kvm_regs))), "ioctl(KVM_GET_REGS)");
  CheckIoctl(env, RetryIoctl(fd, kGetSregs, w.Add(kSregs, sizeof(kvm_sregs))), "ioctl(KVM_GET_SREGS)");
  bool xsave2 = xsaveBytes > kLegacyXsaveBytes;
  CheckIoctl(env, RetryIoctl(fd, xsave2 ? kGetXsave2 : kGetXsave, w.Add(kXsave, xsaveBytes)), "ioctl(KVM_GET_XSAVE)");
  CheckIoctl(env, RetryIoctl(fd, kGetXcrs, w.Add(kXcrs, sizeof(kvm_xcrs))), "ioctl(KVM_GET_XCRS)");
  CheckIoctl(env, RetryIoctl(fd, kGetDebugRegs, w.Add(kDebugRegs, sizeof(kvm_debugregs))), "ioctl(KVM_GET_DEBUGREGS)");
  if (flags & kFlagLapic) CheckIoctl(env, RetryIoctl(fd, kGetLapic, w.Add(kLapic, sizeof(kvm_lapic_state))), "ioctl(KVM_GET_LAPIC)");
  size_t msrCount = indices.ElementLength();
  uint8_t* msrs = w.Add(kMsrs, 8 + msrCount * kMsrEntryBytes);
  uint32_t nmsrs = static_cast<uint32_t>(msrCount);
  std::memcpy(msrs, &nmsrs, 4);
  for (size_t i = 0; i < msrCount; i++) {
    uint32_t index = indices[i];
    std::memcpy(msrs + 8 + i * kMsrEntryBytes, &index, 4);
  }
  if (msrCount > 0) {
    int read = RetryIoctl(fd, kGetMsrs, msrs);
    CheckIoctl(env, read, "ioctl(KVM_GET_MSRS)");
    if (static_cast<size_t>(read) != msrCount) ThrowSyscallError(env, EIO, "ioctl(KVM_GET_MSRS)");
  }
  CheckIoctl(env, RetryIoctl(fd, kGetEvents, w.Add(kEvents, sizeof(kvm_vcpu_events))), "ioctl(KVM_GET_VCPU_EVENTS)");
  return w.Finish(env, flags, {shared.vcpuId, TscKhz(shared, fd)});
}

using VcpuOp = Napi::Value (*)(const Napi::CallbackInfo&, int, size_t, VcpuShared&);

// Runs `op` (Save or Restore) on the calling thread's own vCPU, the handle in info[0].
Napi::Value OnOwnVcpu(const Napi::CallbackInfo& info, VcpuOp op) {
  auto vcpu = Handles::Vcpu(info.Env(), info[0]);
  return op(info, vcpu->fd, vcpu->xsaveBytes, *vcpu->shared);
}

// Runs `op` on the vCPU behind the kick handle in info[0], from any thread, for
// a vCPU whose own thread is parked (it makes no ioctl meanwhile; KVM serializes a vCPU's ioctls
// on its mutex anyway, and only KVM_RUN cares which thread calls it). Spares the round trip to
// that thread inside a migration's downtime. The vCPU cannot close meanwhile.
Napi::Value OnParkedVcpu(const Napi::CallbackInfo& info, VcpuOp op) {
  Napi::Env env = info.Env();
  uint32_t id = HandleId(env, info[0], "vcpu");
  auto shared = Handles::FindVcpuShared(id);
  if (!shared) ThrowStateError(env, "EBADF", "Vcpu handle is closed");
  std::lock_guard<std::mutex> guard(shared->lock);
  if (shared->closed || shared->fd < 0) ThrowStateError(env, "EBADF", "Vcpu handle is closed");
  return op(info, shared->fd, shared->xsaveBytes, *shared);
}

}  // namespace

// saveVcpuState(vcpu, msrIndices: Uint32Array, cpuid: Uint8Array (kvm_cpuid2), flags) -> Uint8Array
Napi::Value SaveVcpuState(const Napi::CallbackInfo& info) { return OnOwnVcpu(info, Save); }

// saveParkedVcpuState(kickHandle, msrIndices, cpuid, flags): saveVcpuState() for a parked vCPU,
// from any thread (OnParkedVcpu). A migration's pause then saves it on the thread that goes on to
// send it.
Napi::Value SaveParkedVcpuState(const Napi::CallbackInfo& info) { return OnParkedVcpu(info, Save); }

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

Napi::Value Restore(const Napi::CallbackInfo& info, int fd, size_t xsaveBytes, VcpuShared& shared) {
  uint32_t vcpuId = shared.vcpuId;
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
      same = RetryIoctl(fd, kGetCpuid2, words.data()) == 0 && std::memcmp(words.data(), p.section[kCpuid], p.length[kCpuid]) == 0;
    }
    // The same CPUID again (a destination on the same kind of host) needs no ioctl.
    if (!same) {
      auto words = copy(kCpuid);
      CheckIoctl(env, RetryIoctl(fd, kSetCpuid2, words.data()), "ioctl(KVM_SET_CPUID2)");
    }
  }
  if (p.tscKhz > 0) {
    uint32_t current = TscKhz(shared, fd);
    // Hosts without TSC scaling keep their own frequency; the guest's kvmclock copes.
    if (current > 0 && current != p.tscKhz && ioctl(fd, kSetTscKhz, static_cast<unsigned long>(p.tscKhz)) == 0) shared.tscKhz = 0;
  }
  auto set = [&](uint32_t tag, unsigned long request, const char* syscall) {
    auto words = copy(tag);
    CheckIoctl(env, RetryIoctl(fd, request, words.data()), syscall);
  };
  set(kMpState, kSetMpState, "ioctl(KVM_SET_MP_STATE)");
  set(kRegs, kSetRegs, "ioctl(KVM_SET_REGS)");
  set(kSregs, kSetSregs, "ioctl(KVM_SET_SREGS)");
  {
    size_t region = xsaveBytes > p.length[kXsave] ? xsaveBytes : p.length[kXsave];
    std::vector<uint64_t> words(Pad8(region) / 8 + 1, 0);
    std::memcpy(words.data(), p.section[kXsave], p.length[kXsave]);
    CheckIoctl(env, RetryIoctl(fd, kSetXsave, words.data()), "ioctl(KVM_SET_XSAVE)");
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
    int written = RetryIoctl(fd, kSetMsrs, words.data());
    if (written != static_cast<int>(nmsrs)) {
      // One refused MSR must not cost the rest: set them one by one and report the refusals of
      // non-zero values (a zero is what a new vCPU holds anyway).
      for (uint32_t i = 0; i < nmsrs; i++) {
        uint64_t one[3] = {1, 0, 0};
        std::memcpy(&one[1], p.section[kMsrs] + 8 + i * kMsrEntryBytes, kMsrEntryBytes);
        if (RetryIoctl(fd, kSetMsrs, one) != 1 && one[2] != 0) {
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

Napi::Value RestoreVcpuState(const Napi::CallbackInfo& info) { return OnOwnVcpu(info, Restore); }

// restoreParkedVcpuState(kickHandle, state, currentCpuid, irqchip): restoreVcpuState() for a
// parked vCPU, from any thread (OnParkedVcpu).
Napi::Value RestoreParkedVcpuState(const Napi::CallbackInfo& info) { return OnParkedVcpu(info, Restore); }

}  // namespace nodekvm
