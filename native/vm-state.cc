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
// (The framing, shared with the vCPU's: state-blob.h.)
#include "vm-state.h"

#include <linux/kvm.h>

#include <cstring>
#include <string>

#include "abi.h"
#include "errors.h"
#include "handles.h"
#include "state-blob.h"

namespace nodekvm {

namespace {

constexpr uint16_t kFlagIrqchip = 1;

enum Tag : uint32_t { kPicMaster = 1, kPicSlave = 2, kIoapic = 3, kPit = 4, kClock = 5, kTagCount = 6 };

constexpr StateBlobFormat kFormat = {0x534d564b /* 'KVMS' */, 1, 16, kTagCount, "VM state", "not a VM state (bad magic)"};

const unsigned long kGetIrqchip = AbiRequest("KVM_GET_IRQCHIP");
const unsigned long kSetIrqchip = AbiRequest("KVM_SET_IRQCHIP");
const unsigned long kGetPit2 = AbiRequest("KVM_GET_PIT2");
const unsigned long kSetPit2 = AbiRequest("KVM_SET_PIT2");
const unsigned long kGetClock = AbiRequest("KVM_GET_CLOCK");
const unsigned long kSetClock = AbiRequest("KVM_SET_CLOCK");

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

struct Parsed {
  uint16_t flags = 0;
  const uint8_t* section[kTagCount] = {};
};

bool Parse(const uint8_t* bytes, size_t size, Parsed* out, std::string* error) {
  uint32_t count;
  if (!ReadStateBlobHeader(kFormat, bytes, size, &out->flags, &count, error)) return false;
  if ((out->flags & ~kFlagIrqchip) != 0) return *error = "unknown flags", false;
  if (count >= kTagCount) return *error = "too many sections", false;
  uint32_t length[kTagCount] = {};
  auto expectedBytes = [](uint32_t tag, const uint8_t*, uint32_t, size_t, std::string*) { return SizeOf(tag); };
  if (!ReadStateBlobSections(kFormat, bytes, size, count, out->section, length, expectedBytes, error)) return false;
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

}  // namespace

// saveVmState(vm, irqchip: boolean) -> Uint8Array
Napi::Value SaveVmState(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto vm = Handles::Vm(env, info[0]);
  std::shared_lock<std::shared_mutex> hold(vm->lock);
  if (vm->closed) ThrowStateError(env, "EBADF", "Vm handle is closed");
  bool irqchip = info[1].ToBoolean().Value();
  StateBlobWriter w(kFormat);
  int fd = vm->fd;
  if (irqchip) {
    const uint32_t chips[3] = {KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQCHIP_IOAPIC};
    for (uint32_t i = 0; i < 3; i++) {
      kvm_irqchip chip{};
      chip.chip_id = chips[i];
      CheckIoctl(env, RetryIoctl(fd, kGetIrqchip, &chip), "ioctl(KVM_GET_IRQCHIP)");
      std::memcpy(w.Add(kPicMaster + i, sizeof chip), &chip, sizeof chip);
    }
    kvm_pit_state2 pit{};
    CheckIoctl(env, RetryIoctl(fd, kGetPit2, &pit), "ioctl(KVM_GET_PIT2)");
    std::memcpy(w.Add(kPit, sizeof pit), &pit, sizeof pit);
  }
  kvm_clock_data clock{};
  CheckIoctl(env, RetryIoctl(fd, kGetClock, &clock), "ioctl(KVM_GET_CLOCK)");
  std::memcpy(w.Add(kClock, sizeof clock), &clock, sizeof clock);
  return w.Finish(env, irqchip ? kFlagIrqchip : 0);
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
    CheckIoctl(env, RetryIoctl(fd, kSetPit2, &pit), "ioctl(KVM_SET_PIT2)");
  }
  kvm_clock_data clock;
  std::memcpy(&clock, p.section[kClock], sizeof clock);
  clock.flags = 0;
  CheckIoctl(env, RetryIoctl(fd, kSetClock, &clock), "ioctl(KVM_SET_CLOCK)");
  if (irqchip) {
    for (uint32_t tag = kPicMaster; tag <= kIoapic; tag++) {
      kvm_irqchip chip;
      std::memcpy(&chip, p.section[tag], sizeof chip);
      CheckIoctl(env, RetryIoctl(fd, kSetIrqchip, &chip), "ioctl(KVM_SET_IRQCHIP)");
    }
  }
  return env.Undefined();
}

}  // namespace nodekvm
