// The VM handle: memory slots and dirty logs, whose ioctl arguments carry host pointers and so
// are built here from validated handles. Plain-struct VM ioctls go through ioctl.cc.
#include "vm.h"

#include <errno.h>
#include <linux/kvm.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <cstring>
#include <vector>

#include "abi.h"
#include "errors.h"
#include "handles.h"
#include "memory.h"
#include "promise-worker.h"

namespace nodekvm {

namespace {
const unsigned long kSetUserMemoryRegion = AbiRequest("KVM_SET_USER_MEMORY_REGION");
const unsigned long kGetDirtyLog = AbiRequest("KVM_GET_DIRTY_LOG");
const unsigned long kClearDirtyLog = AbiRequest("KVM_CLEAR_DIRTY_LOG");
}  // namespace

namespace {

constexpr uint64_t kPageSize = 4096;
constexpr uint64_t kMaxGuestPhysAddr = 1ull << 52;

struct HeldVm {
  std::shared_ptr<VmState> vm;
  std::shared_lock<std::shared_mutex> hold;
};

HeldVm HoldVm(Napi::Env env, const Napi::Value& id) {
  HeldVm held{Handles::Vm(env, id), {}};
  held.hold = std::shared_lock<std::shared_mutex>(held.vm->lock);
  if (held.vm->closed) ThrowStateError(env, "EBADF", "Vm handle is closed");
  return held;
}

uint32_t ReadU32Arg(Napi::Env env, const Napi::Value& value, const char* name) {
  if (!value.IsNumber()) ThrowTypeError(env, std::string(name) + " must be a number");
  double d = value.As<Napi::Number>().DoubleValue();
  if (!(d >= 0 && d <= 4294967295.0) || d != static_cast<double>(static_cast<uint32_t>(d))) {
    ThrowOutOfRangeError(env, std::string(name) + " must be an integer 0..4294967295");
  }
  return static_cast<uint32_t>(d);
}

MemorySlot FindSlot(Napi::Env env, VmState& vm, uint32_t slot) {
  std::lock_guard<std::mutex> guard(vm.slotsLock);
  auto it = vm.slots.find(slot);
  if (it == vm.slots.end()) ThrowInvalidValueError(env, "slot " + std::to_string(slot) + " is not a memory slot of this VM");
  return it->second;
}

size_t BitmapBytes(uint64_t pages) { return ((pages + 63) / 64) * 8; }

}  // namespace

Napi::Value VmFromFd(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsNumber()) ThrowTypeError(env, "fd must be a number");
  int fd = info[0].As<Napi::Number>().Int32Value();
  uint32_t id = Handles::FindVmByFd(fd);
  if (id == 0) ThrowSyscallError(env, EBADF, "Vm.fromFd");
  return Napi::Number::New(env, id);
}

// setUserMemoryRegion(vm, slot, flags, guestPhysAddr, memory, offset, size); size 0 deletes.
Napi::Value SetUserMemoryRegion(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  HeldVm held = HoldVm(env, info[0]);
  uint32_t slot = ReadU32Arg(env, info[1], "slot");
  uint32_t flags = ReadU32Arg(env, info[2], "flags");
  if (flags & ~static_cast<uint32_t>(KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY)) ThrowInvalidValueError(env, "unknown memory region flags");
  uint64_t gpa = ReadU64(env, info[3], "guestPhysAddr");
  uint64_t size = ReadU64(env, info[6], "size");

  kvm_userspace_memory_region region{};
  region.slot = slot;
  region.flags = flags;
  region.guest_phys_addr = gpa;
  region.memory_size = size;
  std::shared_ptr<Mapping> mapping;
  if (size != 0) {
    mapping = FindMemory(env, info[4]);
    uint64_t offset = ReadU64(env, info[5], "offset");
    if (gpa % kPageSize) ThrowInvalidValueError(env, "guestPhysAddr must be page-aligned (4096)");
    if (offset % kPageSize) ThrowInvalidValueError(env, "offset must be page-aligned (4096)");
    if (size % kPageSize) ThrowInvalidValueError(env, "size must be a multiple of the page size (4096)");
    if (gpa >= kMaxGuestPhysAddr || size > kMaxGuestPhysAddr - gpa) ThrowOutOfRangeError(env, "guestPhysAddr + size is beyond the guest physical address space");
    if (offset > mapping->size || size > mapping->size - offset) ThrowOutOfRangeError(env, "offset + size is beyond the end of the guest memory");
    region.userspace_addr = reinterpret_cast<uint64_t>(mapping->addr) + offset;
  }
  // Hold slotsLock across the ioctl so a concurrent change to the same slot cannot reorder with
  // the bookkeeping that keeps its mapping alive.
  std::lock_guard<std::mutex> guard(held.vm->slotsLock);
  if (ioctl(held.vm->fd, kSetUserMemoryRegion, &region) < 0) {
    ThrowSyscallError(env, errno, "ioctl(KVM_SET_USER_MEMORY_REGION)");
  }
  if (size == 0) {
    held.vm->slots.erase(slot);
  } else {
    held.vm->slots[slot] = MemorySlot{mapping, gpa, size, flags};
  }
  return env.Undefined();
}

// getDirtyLog(vm, slot, out?) -> Uint8Array, bit i = page i of the slot (KVM's layout, padded to
// 64-bit words).
Napi::Value GetDirtyLog(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  HeldVm held = HoldVm(env, info[0]);
  uint32_t slot = ReadU32Arg(env, info[1], "slot");
  MemorySlot region = FindSlot(env, *held.vm, slot);
  if (!(region.flags & KVM_MEM_LOG_DIRTY_PAGES)) ThrowInvalidValueError(env, "slot " + std::to_string(slot) + " does not log dirty pages");
  size_t bytes = BitmapBytes(region.size / kPageSize);
  Napi::Uint8Array out;
  if (info.Length() > 2 && !info[2].IsUndefined()) {
    if (!info[2].IsTypedArray() || info[2].As<Napi::TypedArray>().TypedArrayType() != napi_uint8_array) {
      ThrowTypeError(env, "bitmap must be a Uint8Array");
    }
    out = info[2].As<Napi::Uint8Array>();
    if (out.ByteLength() != bytes) ThrowInvalidValueError(env, "bitmap must be exactly " + std::to_string(bytes) + " bytes for this slot");
  } else {
    out = Napi::Uint8Array::New(env, bytes);
  }
  kvm_dirty_log log{};
  log.slot = slot;
  log.dirty_bitmap = out.Data();
  if (ioctl(held.vm->fd, kGetDirtyLog, &log) < 0) ThrowSyscallError(env, errno, "ioctl(KVM_GET_DIRTY_LOG)");
  return out;
}

// clearDirtyLog(vm, slot, firstPage, numPages, bitmap?): re-protects the given pages
// (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2). Without a bitmap, every page in the range.
Napi::Value ClearDirtyLog(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  HeldVm held = HoldVm(env, info[0]);
  uint32_t slot = ReadU32Arg(env, info[1], "slot");
  uint64_t firstPage = ReadU64(env, info[2], "firstPage");
  uint64_t numPages = ReadU64(env, info[3], "numPages");
  MemorySlot region = FindSlot(env, *held.vm, slot);
  if (!(region.flags & KVM_MEM_LOG_DIRTY_PAGES)) ThrowInvalidValueError(env, "slot " + std::to_string(slot) + " does not log dirty pages");
  uint64_t slotPages = region.size / kPageSize;
  // api.rst, KVM_CLEAR_DIRTY_LOG: first_page must be a multiple of 64, and num_pages too unless
  // the range ends at the end of the slot.
  if (firstPage % 64) ThrowInvalidValueError(env, "firstPage must be a multiple of 64");
  if (firstPage > slotPages || numPages > slotPages - firstPage) ThrowOutOfRangeError(env, "firstPage + numPages is beyond the end of the slot");
  if (numPages % 64 && firstPage + numPages != slotPages) ThrowInvalidValueError(env, "numPages must be a multiple of 64 unless the range ends at the end of the slot");
  if (numPages > 0xffffffffull) ThrowOutOfRangeError(env, "numPages is too large");
  size_t bytes = BitmapBytes(numPages);
  std::vector<uint64_t> ones;
  void* bitmap;
  if (info.Length() > 4 && !info[4].IsUndefined()) {
    if (!info[4].IsTypedArray() || info[4].As<Napi::TypedArray>().TypedArrayType() != napi_uint8_array) {
      ThrowTypeError(env, "bitmap must be a Uint8Array");
    }
    auto js = info[4].As<Napi::Uint8Array>();
    if (js.ByteLength() < bytes) ThrowInvalidValueError(env, "bitmap must hold at least " + std::to_string(bytes) + " bytes for numPages");
    bitmap = js.Data();
  } else {
    ones.assign(bytes / 8, ~0ull);
    bitmap = ones.data();
  }
  kvm_clear_dirty_log clear{};
  clear.slot = slot;
  clear.num_pages = static_cast<uint32_t>(numPages);
  clear.first_page = firstPage;
  clear.dirty_bitmap = bitmap;
  if (ioctl(held.vm->fd, kClearDirtyLog, &clear) < 0) ThrowSyscallError(env, errno, "ioctl(KVM_CLEAR_DIRTY_LOG)");
  return env.Undefined();
}

Napi::Value CloseVmHandle(const Napi::CallbackInfo& info) {
  uint32_t id = HandleId(info.Env(), info[0], "vm");
  auto state = Handles::RemoveVm(id);
  if (state) CloseVm(state);
  return info.Env().Undefined();
}

namespace {
// The last close of a VM fd runs the kernel's teardown of the VM, which waits out RCU grace
// periods (15-20 ms here, the CPU idle): on a thread of libuv's pool, not the event loop's.
class CloseVmWorker : public PromiseWorker {
 public:
  CloseVmWorker(Napi::Env env, std::shared_ptr<VmState> state) : PromiseWorker(env), state_(std::move(state)) {}
  void Execute() override {
    if (state_) CloseVm(state_);
    // The state too: its slots may hold guest RAM's last reference.
    state_.reset();
  }

 private:
  std::shared_ptr<VmState> state_;
};
}  // namespace

// closeVmAsync(handle) -> Promise<void>: closeVm() with the close on libuv's pool; the handle is
// gone at once (later calls on it throw EBADF), the promise resolves once the fd is closed.
Napi::Value CloseVmHandleAsync(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint32_t id = HandleId(env, info[0], "vm");
  return PromiseWorker::Start(new CloseVmWorker(env, Handles::RemoveVm(id)));
}

// createEventFd(initialValue, semaphore, nonBlocking) -> fd (close-on-exec).
Napi::Value CreateEventFd(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint32_t initial = ReadU32Arg(env, info[0], "initialValue");
  int flags = EFD_CLOEXEC;
  if (info[1].ToBoolean()) flags |= EFD_SEMAPHORE;
  if (info[2].ToBoolean()) flags |= EFD_NONBLOCK;
  int fd = eventfd(initial, flags);
  if (fd < 0) ThrowSyscallError(env, errno, "eventfd");
  return Napi::Number::New(env, fd);
}

}  // namespace nodekvm
