// The VM-wide state KVM keeps (the in-kernel PICs and IOAPIC, the PIT, the kvmclock) in one call
// each way, as one buffer of raw KVM structs, like a vCPU's (vcpu-state.cc): inside a migration's
// downtime, five ioctls decoded into JavaScript objects and JSON cost a cold millisecond. The
// layout (lib/kvm/vm-state-blob.ts):
//
//   header, 16 bytes: u32 magic 'KVMS', u16 version 1, u16 flags (1: in-kernel irqchip),
//     u32 section count, u32 0
//   sections, each: u32 tag, u32 byte length, the struct, padded to 8 bytes
//     1 kvm_irqchip (PIC master), 2 kvm_irqchip (PIC slave), 3 kvm_irqchip (IOAPIC),
//     4 kvm_pit_state2, 5 kvm_clock_data
//   With the irqchip flag: all five, else only the clock.
#include "vm-state.h"

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

constexpr uint32_t kMagic = 0x534d564b;  // 'KVMS'
constexpr uint16_t kVersion = 1;
constexpr uint16_t kFlagIrqchip = 1;
constexpr size_t kHeaderBytes = 16;

enum Tag : uint32_t { kPicMaster = 1, kPicSlave = 2, kIoapic = 3, kPit = 4, kClock = 5, kTagCount = 6 };

const unsigned long kGetIrqchip = AbiRequest("KVM_GET_IRQCHIP");
const unsigned long kSetIrqchip = AbiRequest("KVM_SET_IRQCHIP");
const unsigned long kGetPit2 = AbiRequest("KVM_GET_PIT2");
const unsigned long kSetPit2 = AbiRequest("KVM_SET_PIT2");
const unsigned long kGetClock = AbiRequest("KVM_GET_CLOCK");
const unsigned long kSetClock = AbiRequest("KVM_SET_CLOCK");

constexpr size_t Pad8(size_t n) { return (n + 7) & ~static_cast<size_t>(7); }

size_t SizeOf(uint32_t tag) {
  switch (tag) {
    case kPicMaster:
    case kPicSlave:
    case kIoapic: return sizeof(kvm_irqchip);
    case kPit: return sizeof(kvm_pit_state2);
    case kClock: return sizeof(kvm_clock_data);
    default: return 0;
  }
}

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

struct Parsed {
  uint16_t flags = 0;
  const uint8_t* section[kTagCount] = {};
};

bool Parse(const uint8_t* bytes, size_t size, Parsed* out, std::string* error) {
  if (size < kHeaderBytes) return *error = "shorter than its header", false;
  uint32_t magic, count;
  uint16_t version;
  std::memcpy(&magic, bytes, 4);
  std::memcpy(&version, bytes + 4, 2);
  std::memcpy(&out->flags, bytes + 6, 2);
  std::memcpy(&count, bytes + 8, 4);
  if (magic != kMagic) return *error = "not a VM state (bad magic)", false;
  if (version != kVersion) return *error = "VM state version " + std::to_string(version) + " (this build reads 1)", false;
  if ((out->flags & ~kFlagIrqchip) != 0) return *error = "unknown flags", false;
  if (count >= kTagCount) return *error = "too many sections", false;
  size_t at = kHeaderBytes;
  for (uint32_t i = 0; i < count; i++) {
    if (size - at < 8) return *error = "truncated section header", false;
    uint32_t tag, length;
    std::memcpy(&tag, bytes + at, 4);
    std::memcpy(&length, bytes + at + 4, 4);
    size_t expected = SizeOf(tag);
    if (expected == 0) return *error = "unknown section " + std::to_string(tag), false;
    if (out->section[tag] != nullptr) return *error = "section " + std::to_string(tag) + " twice", false;
    if (length != expected) return *error = "section " + std::to_string(tag) + " holds " + std::to_string(length) + " bytes, this host's struct " + std::to_string(expected), false;
    if (size - at - 8 < Pad8(length)) return *error = "truncated section " + std::to_string(tag), false;
    out->section[tag] = bytes + at + 8;
    at += 8 + Pad8(length);
  }
  if (at != size) return *error = "trailing bytes", false;
  if (out->section[kClock] == nullptr) return *error = "no clock", false;
  bool irqchip = (out->flags & kFlagIrqchip) != 0;
  for (uint32_t tag = kPicMaster; tag <= kPit; tag++) {
    if ((out->section[tag] != nullptr) != irqchip) return *error = irqchip ? "an irqchip or PIT section missing" : "irqchip sections without the irqchip flag", false;
  }
  if (irqchip) {
    const uint32_t chips[3] = {KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQCHIP_IOAPIC};
    for (uint32_t i = 0; i < 3; i++) {
      uint32_t chipId;
      std::memcpy(&chipId, out->section[kPicMaster + i], 4);
      if (chipId != chips[i]) return *error = "irqchip section " + std::to_string(kPicMaster + i) + " holds chip " + std::to_string(chipId), false;
    }
  }
  return true;
}

Napi::Uint8Array BytesArg(Napi::Env env, const Napi::Value& value, const char* what) {
  if (!value.IsTypedArray() || value.As<Napi::TypedArray>().TypedArrayType() != napi_uint8_array) {
    ThrowTypeError(env, std::string(what) + " must be a Uint8Array");
  }
  return value.As<Napi::Uint8Array>();
}

}  // namespace

// saveVmState(vm, irqchip: boolean) -> Uint8Array
Napi::Value SaveVmState(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto vm = Handles::Vm(env, info[0]);
  std::shared_lock<std::shared_mutex> hold(vm->lock);
  if (vm->closed) ThrowStateError(env, "EBADF", "Vm handle is closed");
  bool irqchip = info[1].ToBoolean().Value();
  std::vector<uint8_t> bytes(kHeaderBytes, 0);
  uint32_t count = 0;
  auto add = [&](uint32_t tag) {
    size_t at = bytes.size();
    bytes.resize(at + 8 + Pad8(SizeOf(tag)), 0);
    uint32_t header[2] = {tag, static_cast<uint32_t>(SizeOf(tag))};
    std::memcpy(bytes.data() + at, header, 8);
    count++;
    return at + 8;
  };
  int fd = vm->fd;
  if (irqchip) {
    const uint32_t chips[3] = {KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQCHIP_IOAPIC};
    for (uint32_t i = 0; i < 3; i++) {
      kvm_irqchip chip{};
      chip.chip_id = chips[i];
      Check(env, Retry(fd, kGetIrqchip, &chip), "ioctl(KVM_GET_IRQCHIP)");
      size_t at = add(kPicMaster + i);
      std::memcpy(bytes.data() + at, &chip, sizeof chip);
    }
    kvm_pit_state2 pit{};
    Check(env, Retry(fd, kGetPit2, &pit), "ioctl(KVM_GET_PIT2)");
    size_t at = add(kPit);
    std::memcpy(bytes.data() + at, &pit, sizeof pit);
  }
  kvm_clock_data clock{};
  Check(env, Retry(fd, kGetClock, &clock), "ioctl(KVM_GET_CLOCK)");
  size_t at = add(kClock);
  std::memcpy(bytes.data() + at, &clock, sizeof clock);
  uint32_t header[4] = {kMagic, static_cast<uint32_t>(kVersion) | (static_cast<uint32_t>(irqchip ? kFlagIrqchip : 0) << 16), count, 0};
  std::memcpy(bytes.data(), header, kHeaderBytes);
  auto out = Napi::Uint8Array::New(env, bytes.size());
  std::memcpy(out.Data(), bytes.data(), bytes.size());
  return out;
}

// checkVmState(state: Uint8Array) -> null, or what is wrong with it.
Napi::Value CheckVmState(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto state = BytesArg(env, info[0], "state");
  Parsed parsed;
  std::string error;
  if (!Parse(state.Data(), state.ByteLength(), &parsed, &error)) return Napi::String::New(env, error);
  return env.Null();
}

// restoreVmState(vm, state: Uint8Array, irqchip: boolean): checked whole first, then the PIT, the
// clock's value (flags 0: KVM_CLOCK_REALTIME would add the time since the save, which a snapshot
// restored days later does not want), the irqchips (before the vCPUs' LAPICs, which refer to the
// IOAPIC's routing).
Napi::Value RestoreVmState(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto vm = Handles::Vm(env, info[0]);
  auto state = BytesArg(env, info[1], "state");
  bool irqchip = info[2].ToBoolean().Value();
  Parsed p;
  std::string error;
  if (!Parse(state.Data(), state.ByteLength(), &p, &error)) ThrowInvalidValueError(env, "bad VM state: " + error);
  bool saved = (p.flags & kFlagIrqchip) != 0;
  if (saved != irqchip) {
    ThrowInvalidValueError(env, std::string("the saved machine ") + (saved ? "has" : "has no") + " in-kernel irqchip, this one " + (irqchip ? "has" : "has none"));
  }
  std::shared_lock<std::shared_mutex> hold(vm->lock);
  if (vm->closed) ThrowStateError(env, "EBADF", "Vm handle is closed");
  int fd = vm->fd;
  if (irqchip) {
    kvm_pit_state2 pit;
    std::memcpy(&pit, p.section[kPit], sizeof pit);
    Check(env, Retry(fd, kSetPit2, &pit), "ioctl(KVM_SET_PIT2)");
  }
  kvm_clock_data clock;
  std::memcpy(&clock, p.section[kClock], sizeof clock);
  clock.flags = 0;
  Check(env, Retry(fd, kSetClock, &clock), "ioctl(KVM_SET_CLOCK)");
  if (irqchip) {
    for (uint32_t tag = kPicMaster; tag <= kIoapic; tag++) {
      kvm_irqchip chip;
      std::memcpy(&chip, p.section[tag], sizeof chip);
      Check(env, Retry(fd, kSetIrqchip, &chip), "ioctl(KVM_SET_IRQCHIP)");
    }
  }
  return env.Undefined();
}

}  // namespace nodekvm
