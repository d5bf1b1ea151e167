#include "ioctl.h"

#include <errno.h>
#include <linux/kvm.h>
#include <sys/ioctl.h>

#include <cstring>
#include <shared_mutex>
#include <vector>

#include "abi.h"
#include "errors.h"
#include "handles.h"

namespace nodekvm {

namespace {

#define OP(req, fd, kind) {#req, AbiRequest(#req), FdKind::fd, ArgKind::kind, 0, 0, 0}
#define ARRAY_OP(req, fd, header, element, max) \
  {#req, AbiRequest(#req), FdKind::fd, ArgKind::CountedArray, header, element, max}

// Upper bounds on counted arrays; the kernel enforces smaller ones (KVM_MAX_CPUID_ENTRIES 256,
// KVM_MAX_IRQ_ROUTES 4096, MSR lists in the hundreds). Ours only bound the native copy.
constexpr uint32_t kMaxCpuidEntries = 4096;
constexpr uint32_t kMaxMsrs = 16384;
constexpr uint32_t kMaxRoutes = 65536;

// Initialized at load from abi.c (dynamic initialization, after abi.c's constant tables).
const IoctlOp kOps[] = {
    // System (/dev/kvm).
    OP(KVM_GET_API_VERSION, System, None),
    OP(KVM_CHECK_EXTENSION, System, Value),
    OP(KVM_GET_VCPU_MMAP_SIZE, System, None),
    ARRAY_OP(KVM_GET_SUPPORTED_CPUID, System, 8, AbiSize("kvm_cpuid_entry2"), kMaxCpuidEntries),
    ARRAY_OP(KVM_GET_EMULATED_CPUID, System, 8, AbiSize("kvm_cpuid_entry2"), kMaxCpuidEntries),
    ARRAY_OP(KVM_GET_MSR_INDEX_LIST, System, 4, 4, kMaxMsrs),
    ARRAY_OP(KVM_GET_MSR_FEATURE_INDEX_LIST, System, 4, 4, kMaxMsrs),
    {"KVM_GET_MSRS(system)", AbiRequest("KVM_GET_MSRS"), FdKind::System, ArgKind::CountedArray, 8,
     AbiSize("kvm_msr_entry"), kMaxMsrs},
    // VM.
    {"KVM_CHECK_EXTENSION(vm)", AbiRequest("KVM_CHECK_EXTENSION"), FdKind::Vm, ArgKind::Value, 0, 0, 0},
    OP(KVM_CREATE_IRQCHIP, Vm, None),
    OP(KVM_CREATE_PIT2, Vm, Struct),
    OP(KVM_GET_PIT2, Vm, Struct),
    OP(KVM_SET_PIT2, Vm, Struct),
    OP(KVM_GET_IRQCHIP, Vm, Struct),
    OP(KVM_SET_IRQCHIP, Vm, Struct),
    OP(KVM_IRQ_LINE, Vm, Struct),
    OP(KVM_IRQ_LINE_STATUS, Vm, Struct),
    OP(KVM_SIGNAL_MSI, Vm, Struct),
    ARRAY_OP(KVM_SET_GSI_ROUTING, Vm, 8, AbiSize("kvm_irq_routing_entry"), kMaxRoutes),
    OP(KVM_IRQFD, Vm, Struct),
    OP(KVM_IOEVENTFD, Vm, Struct),
    OP(KVM_SET_TSS_ADDR, Vm, Value),
    OP(KVM_SET_IDENTITY_MAP_ADDR, Vm, U64Pointer),
    OP(KVM_GET_CLOCK, Vm, Struct),
    OP(KVM_SET_CLOCK, Vm, Struct),
    OP(KVM_ENABLE_CAP, Vm, Struct),
    OP(KVM_RESET_DIRTY_RINGS, Vm, None),
    OP(KVM_SET_BOOT_CPU_ID, Vm, Value),
    OP(KVM_REGISTER_COALESCED_MMIO, Vm, Struct),
    OP(KVM_UNREGISTER_COALESCED_MMIO, Vm, Struct),
    // vCPU.
    {"KVM_CHECK_EXTENSION(vcpu)", AbiRequest("KVM_CHECK_EXTENSION"), FdKind::Vcpu, ArgKind::Value, 0, 0, 0},
    OP(KVM_GET_REGS, Vcpu, Struct),
    OP(KVM_SET_REGS, Vcpu, Struct),
    OP(KVM_GET_SREGS, Vcpu, Struct),
    OP(KVM_SET_SREGS, Vcpu, Struct),
    OP(KVM_GET_FPU, Vcpu, Struct),
    OP(KVM_SET_FPU, Vcpu, Struct),
    ARRAY_OP(KVM_GET_MSRS, Vcpu, 8, AbiSize("kvm_msr_entry"), kMaxMsrs),
    ARRAY_OP(KVM_SET_MSRS, Vcpu, 8, AbiSize("kvm_msr_entry"), kMaxMsrs),
    ARRAY_OP(KVM_SET_CPUID2, Vcpu, 8, AbiSize("kvm_cpuid_entry2"), kMaxCpuidEntries),
    ARRAY_OP(KVM_GET_CPUID2, Vcpu, 8, AbiSize("kvm_cpuid_entry2"), kMaxCpuidEntries),
    OP(KVM_GET_LAPIC, Vcpu, Struct),
    OP(KVM_SET_LAPIC, Vcpu, Struct),
    OP(KVM_GET_XSAVE, Vcpu, Struct),
    OP(KVM_SET_XSAVE, Vcpu, Xsave2),
    OP(KVM_GET_XSAVE2, Vcpu, Xsave2),
    OP(KVM_GET_XCRS, Vcpu, Struct),
    OP(KVM_SET_XCRS, Vcpu, Struct),
    OP(KVM_GET_VCPU_EVENTS, Vcpu, Struct),
    OP(KVM_SET_VCPU_EVENTS, Vcpu, Struct),
    OP(KVM_GET_MP_STATE, Vcpu, Struct),
    OP(KVM_SET_MP_STATE, Vcpu, Struct),
    OP(KVM_GET_DEBUGREGS, Vcpu, Struct),
    OP(KVM_SET_DEBUGREGS, Vcpu, Struct),
    OP(KVM_GET_TSC_KHZ, Vcpu, None),
    OP(KVM_SET_TSC_KHZ, Vcpu, Value),
    OP(KVM_GET_NESTED_STATE, Vcpu, NestedState),
    OP(KVM_SET_NESTED_STATE, Vcpu, NestedState),
    OP(KVM_TRANSLATE, Vcpu, Struct),
    OP(KVM_SET_GUEST_DEBUG, Vcpu, Struct),
    OP(KVM_KVMCLOCK_CTRL, Vcpu, None),
    OP(KVM_NMI, Vcpu, None),
    OP(KVM_SMI, Vcpu, None),
    OP(KVM_INTERRUPT, Vcpu, Struct),
    {"KVM_ENABLE_CAP(vcpu)", AbiRequest("KVM_ENABLE_CAP"), FdKind::Vcpu, ArgKind::Struct, 0, 0, 0},
};

#undef OP
#undef ARRAY_OP

constexpr size_t kOpCount = sizeof(kOps) / sizeof(kOps[0]);
const unsigned long kEnableCap = AbiRequest("KVM_ENABLE_CAP");
const unsigned long kSetTscKhz = AbiRequest("KVM_SET_TSC_KHZ");
const unsigned long kGetNestedState = AbiRequest("KVM_GET_NESTED_STATE");
const unsigned long kGetXsave2 = AbiRequest("KVM_GET_XSAVE2");
const unsigned long kCheckExtension = AbiRequest("KVM_CHECK_EXTENSION");
constexpr uint32_t kMaxNestedStateBytes = 1u << 20;
constexpr int kMaxEintrRetries = 100;

// Arguments are copied into native memory before the ioctl, so that no other thread can change
// a count between our check and the kernel's read of it.
struct ArgBuffer {
  std::vector<uint64_t> words;
  void* data() { return words.data(); }
  void Resize(size_t bytes) { words.assign((bytes + 7) / 8, 0); }
};

uint32_t ReadU32(const uint8_t* p, size_t offset) {
  uint32_t v;
  std::memcpy(&v, p + offset, 4);
  return v;
}

std::string OpSyscall(const IoctlOp& op) {
  std::string name = op.name;
  auto paren = name.find('(');
  if (paren != std::string::npos) name = name.substr(0, paren);
  return "ioctl(" + name + ")";
}

}  // namespace

Napi::Object IoctlOps(Napi::Env env) {
  Napi::Object ops = Napi::Object::New(env);
  for (size_t i = 0; i < kOpCount; i++) ops.Set(kOps[i].name, Napi::Number::New(env, i));
  return ops;
}

Napi::Value Ioctl(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[1].IsNumber()) ThrowTypeError(env, "op must be a number");
  double opValue = info[1].As<Napi::Number>().DoubleValue();
  if (!(opValue >= 0 && opValue < static_cast<double>(kOpCount)) || opValue != static_cast<double>(static_cast<size_t>(opValue))) {
    ThrowOutOfRangeError(env, "unknown ioctl op");
  }
  size_t opIndex = static_cast<size_t>(opValue);
  const IoctlOp& op = kOps[opIndex];

  // Resolve the handle and hold it open (shared lock) for the duration of the syscall.
  int fd = -1;
  std::shared_ptr<SystemState> system;
  std::shared_ptr<VmState> vm;
  std::shared_ptr<VcpuState> vcpu;
  std::shared_lock<std::shared_mutex> hold;
  switch (op.fdKind) {
    case FdKind::System:
      system = Handles::System(env, info[0]);
      hold = std::shared_lock<std::shared_mutex>(system->lock);
      if (system->closed) ThrowStateError(env, "EBADF", "Kvm handle is closed");
      fd = system->fd;
      break;
    case FdKind::Vm:
      vm = Handles::Vm(env, info[0]);
      hold = std::shared_lock<std::shared_mutex>(vm->lock);
      if (vm->closed) ThrowStateError(env, "EBADF", "Vm handle is closed");
      fd = vm->fd;
      break;
    case FdKind::Vcpu:
      vcpu = Handles::Vcpu(env, info[0]);
      fd = vcpu->fd;
      if (op.request == kCheckExtension) {
        // KVM_CHECK_EXTENSION is a system and VM ioctl only (api.rst 4.4): a vCPU fd answers
        // EINVAL. Ask the vCPU's VM.
        vm = vcpu->vm;
        hold = std::shared_lock<std::shared_mutex>(vm->lock);
        if (vm->closed) ThrowStateError(env, "EBADF", "the vCPU's Vm handle is closed");
        fd = vm->fd;
      }
      break;
  }

  ArgBuffer arg;
  Napi::Uint8Array js;
  bool copyOut = false;
  unsigned long value = 0;
  void* pointer = nullptr;

  auto requireBytes = [&]() {
    if (!info[2].IsTypedArray() || info[2].As<Napi::TypedArray>().TypedArrayType() != napi_uint8_array) {
      ThrowTypeError(env, std::string(op.name) + " needs a Uint8Array argument");
    }
    js = info[2].As<Napi::Uint8Array>();
  };

  switch (op.argKind) {
    case ArgKind::None:
      break;
    case ArgKind::Value: {
      if (info[2].IsBigInt()) {
        bool lossless = false;
        value = info[2].As<Napi::BigInt>().Uint64Value(&lossless);
        if (!lossless) ThrowOutOfRangeError(env, std::string(op.name) + " argument is out of range");
      } else if (info[2].IsNumber()) {
        double d = info[2].As<Napi::Number>().DoubleValue();
        if (!(d >= 0 && d <= 9007199254740991.0) || d != static_cast<double>(static_cast<uint64_t>(d))) {
          ThrowOutOfRangeError(env, std::string(op.name) + " argument must be a non-negative integer");
        }
        value = static_cast<unsigned long>(d);
      } else {
        ThrowTypeError(env, std::string(op.name) + " needs an integer argument");
      }
      break;
    }
    case ArgKind::Struct:
    case ArgKind::U64Pointer: {
      requireBytes();
      size_t size = _IOC_SIZE(op.request);
      if (js.ByteLength() != size) {
        ThrowInvalidValueError(env, std::string(op.name) + " needs exactly " + std::to_string(size) + " bytes, got " +
                                        std::to_string(js.ByteLength()));
      }
      arg.Resize(size);
      std::memcpy(arg.data(), js.Data(), size);
      copyOut = (_IOC_DIR(op.request) & _IOC_READ) != 0;
      pointer = arg.data();
      if (op.request == kEnableCap && op.fdKind == FdKind::Vcpu &&
          ReadU32(static_cast<uint8_t*>(pointer), 0) == KVM_CAP_HYPERV_ENLIGHTENED_VMCS) {
        // Its args[0] is a host pointer the kernel writes through.
        ThrowInvalidValueError(env, "KVM_CAP_HYPERV_ENLIGHTENED_VMCS is not supported through enableCap");
      }
      break;
    }
    case ArgKind::CountedArray: {
      requireBytes();
      if (js.ByteLength() < op.headerBytes) ThrowInvalidValueError(env, std::string(op.name) + " buffer is too small");
      uint32_t count = ReadU32(js.Data(), 0);
      if (count > op.maxCount) ThrowOutOfRangeError(env, std::string(op.name) + " count is too large");
      size_t needed = op.headerBytes + static_cast<size_t>(count) * op.elementBytes;
      if (js.ByteLength() < needed) {
        ThrowInvalidValueError(env, std::string(op.name) + " buffer holds fewer entries than its count");
      }
      arg.Resize(needed);
      std::memcpy(arg.data(), js.Data(), needed);
      copyOut = true;
      pointer = arg.data();
      break;
    }
    case ArgKind::NestedState: {
      requireBytes();
      if (js.ByteLength() < AbiSize("kvm_nested_state")) ThrowInvalidValueError(env, "nested state buffer is too small");
      uint32_t size = ReadU32(js.Data(), 4);
      if (size > js.ByteLength() || size > kMaxNestedStateBytes || size < AbiSize("kvm_nested_state")) {
        ThrowInvalidValueError(env, "nested state size field does not match its buffer");
      }
      arg.Resize(size);
      std::memcpy(arg.data(), js.Data(), size);
      copyOut = op.request == kGetNestedState;
      pointer = arg.data();
      break;
    }
    case ArgKind::Xsave2: {
      requireBytes();
      // KVM reads (SET_XSAVE) or writes (GET_XSAVE2) as many bytes as KVM_CAP_XSAVE2 reports.
      size_t size = vcpu->xsaveBytes;
      if (js.ByteLength() < size) {
        ThrowInvalidValueError(env, std::string(op.name) + " needs " + std::to_string(size) + " bytes, got " +
                                        std::to_string(js.ByteLength()));
      }
      arg.Resize(js.ByteLength());
      std::memcpy(arg.data(), js.Data(), js.ByteLength());
      copyOut = op.request == kGetXsave2;
      pointer = arg.data();
      break;
    }
  }

  // Only -1 is a failure: KVM_GET_TSC_KHZ returns its u32 through an int, so a rate above
  // INT_MAX comes back negative, with errno untouched. Retries after EINTR are bounded: the
  // same conversion turns a rate of 0xfffffffc into a permanent -EINTR.
  int result;
  int interrupted = 0;
  do {
    result = ioctl(fd, op.request, pointer != nullptr ? reinterpret_cast<unsigned long>(pointer) : value);
  } while (result == -1 && errno == EINTR && ++interrupted < kMaxEintrRetries);
  if (result == -1) {
    int err = errno;
    // E2BIG on a counted array still carries the needed count: let the caller grow and retry.
    if (err == E2BIG && op.argKind == ArgKind::CountedArray) std::memcpy(js.Data(), arg.data(), 4);
    ThrowSyscallError(env, err, OpSyscall(op));
  }
  if (copyOut) std::memcpy(js.Data(), arg.data(), js.ByteLength() < arg.words.size() * 8 ? js.ByteLength() : arg.words.size() * 8);

  // What vcpu-state.cc remembers of the vCPU's TSC frequency is stale now.
  if (op.request == kSetTscKhz && vcpu) vcpu->shared->tscKhz = 0;
  if (op.request == kEnableCap && op.fdKind == FdKind::Vm) {
    auto* cap = static_cast<kvm_enable_cap*>(pointer);
    if (cap->cap == KVM_CAP_DIRTY_LOG_RING || cap->cap == KVM_CAP_DIRTY_LOG_RING_ACQ_REL) {
      vm->dirtyRingBytes = static_cast<uint32_t>(cap->args[0]);
    }
  }
  return Napi::Number::New(env, result);
}

}  // namespace nodekvm
