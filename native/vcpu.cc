// The vCPU handle: creation with its kvm_run page (and dirty ring), KVM_RUN, and kicking a
// running vCPU from another thread. Plain-struct vCPU ioctls go through ioctl.cc.
#include "vcpu.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <sched.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <mutex>

#include "abi.h"
#include "errors.h"
#include "handles.h"

namespace nodekvm {

namespace {
const unsigned long kCreateVcpu = AbiRequest("KVM_CREATE_VCPU");
const unsigned long kRun = AbiRequest("KVM_RUN");
const unsigned long kCheckExtension = AbiRequest("KVM_CHECK_EXTENSION");
}  // namespace

namespace {

constexpr long kPageSize = 4096;

int kickSignal = 0;
std::once_flag kickSignalOnce;

void IgnoreKick(int) {}

// A real-time signal nobody else handles: Node uses SIGUSR1 (inspector), SIGPROF (profiler),
// and applications commonly take SIGUSR2. No SA_RESTART, so a blocked KVM_RUN returns EINTR.
void InstallKickSignal() {
  for (int sig = SIGRTMIN + 2; sig <= SIGRTMAX; sig++) {
    struct sigaction current {};
    if (sigaction(sig, nullptr, &current) != 0) continue;
    if (current.sa_handler != SIG_DFL || (current.sa_flags & SA_SIGINFO)) continue;
    struct sigaction action {};
    action.sa_handler = IgnoreKick;
    sigemptyset(&action.sa_mask);
    action.sa_flags = 0;
    if (sigaction(sig, &action, nullptr) == 0) {
      kickSignal = sig;
      return;
    }
  }
}

void UnblockKickSignal() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, kickSignal);
  pthread_sigmask(SIG_UNBLOCK, &set, nullptr);
}

std::shared_ptr<Mapping> MapVcpuRegion(int fd, size_t size, off_t offset, std::shared_ptr<VmState> vm) {
  void* addr = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, offset);
  if (addr == MAP_FAILED) return nullptr;
  auto mapping = std::make_shared<Mapping>();
  mapping->addr = addr;
  mapping->size = size;
  mapping->keepAlive = std::move(vm);
  return mapping;
}

}  // namespace

// createVcpu(vm, id) -> [handle, fd, kvmRun ArrayBuffer]
Napi::Value CreateVcpu(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::call_once(kickSignalOnce, InstallKickSignal);
  if (kickSignal == 0) ThrowStateError(env, "ERR_KVM_NO_SIGNAL", "no free real-time signal to kick vCPUs with");
  auto vm = Handles::Vm(env, info[0]);
  if (!info[1].IsNumber()) ThrowTypeError(env, "id must be a number");
  double idValue = info[1].As<Napi::Number>().DoubleValue();
  if (!(idValue >= 0 && idValue <= 4294967295.0) || idValue != static_cast<uint32_t>(idValue)) {
    ThrowOutOfRangeError(env, "id must be a non-negative integer");
  }
  uint32_t vcpuId = static_cast<uint32_t>(idValue);

  std::shared_lock<std::shared_mutex> hold(vm->lock);
  if (vm->closed) ThrowStateError(env, "EBADF", "Vm handle is closed");
  int fd = ioctl(vm->fd, kCreateVcpu, static_cast<unsigned long>(vcpuId));
  if (fd < 0) ThrowSyscallError(env, errno, "ioctl(KVM_CREATE_VCPU)");
  fcntl(fd, F_SETFD, FD_CLOEXEC);
  int xsave2 = ioctl(vm->fd, kCheckExtension, KVM_CAP_XSAVE2);
  size_t xsaveBytes = xsave2 > static_cast<int>(AbiSize("kvm_xsave")) ? static_cast<size_t>(xsave2) : AbiSize("kvm_xsave");

  auto shared = std::make_shared<VcpuShared>();
  shared->vcpuId = vcpuId;
  shared->thread = pthread_self();
  shared->kvmRun = MapVcpuRegion(fd, vm->vcpuMmapSize, 0, vm);
  if (!shared->kvmRun) {
    int err = errno;
    close(fd);
    ThrowSyscallError(env, err, "mmap(kvm_run)");
  }
  uint32_t ringBytes = vm->dirtyRingBytes.load();
  if (ringBytes > 0) {
    shared->dirtyRing = MapVcpuRegion(fd, ringBytes, KVM_DIRTY_LOG_PAGE_OFFSET * kPageSize, vm);
    if (!shared->dirtyRing) {
      int err = errno;
      close(fd);
      ThrowSyscallError(env, err, "mmap(dirty ring)");
    }
  }
  UnblockKickSignal();
  shared->fd = fd;
  shared->xsaveBytes = xsaveBytes;

  auto state = std::make_shared<VcpuState>();
  state->fd = fd;
  state->xsaveBytes = xsaveBytes;
  state->ownerEnv = env;
  state->vm = vm;
  state->shared = shared;
  uint32_t handle = Handles::AddVcpu(state);

  Napi::Array result = Napi::Array::New(env, 3);
  result.Set(0u, Napi::Number::New(env, handle));
  result.Set(1u, Napi::Number::New(env, fd));
  result.Set(2u, ExposeMapping(env, shared->kvmRun));
  return result;
}

// run(vcpu) -> exit reason. The hot path: one table lookup and the ioctl, nothing allocated.
// A kick (immediate_exit + signal) surfaces as KVM_EXIT_INTR and is consumed here. EAGAIN, which
// some hosts return while an AP waits for its SIPI, is retried as QEMU does; a kick still ends it.
Napi::Value Run(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto vcpu = Handles::Vcpu(env, info[0]);
  auto* run = static_cast<kvm_run*>(vcpu->shared->kvmRun->addr);
  for (;;) {
    if (ioctl(vcpu->fd, kRun, 0) == 0) return Napi::Number::New(env, run->exit_reason);
    int err = errno;
    if (err == EINTR) {
      __atomic_store_n(&run->immediate_exit, 0, __ATOMIC_SEQ_CST);
      run->exit_reason = KVM_EXIT_INTR;
      return Napi::Number::New(env, KVM_EXIT_INTR);
    }
    if (err == EAGAIN) {
      sched_yield();
      continue;
    }
    ThrowSyscallError(env, err, "ioctl(KVM_RUN)");
  }
}

// kick(vcpuHandle) -> whether the vCPU was still open. Any thread.
Napi::Value Kick(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint32_t id = HandleId(env, info[0], "vcpu");
  auto shared = Handles::FindVcpuShared(id);
  if (!shared) return Napi::Boolean::New(env, false);
  std::lock_guard<std::mutex> guard(shared->lock);
  if (shared->closed) return Napi::Boolean::New(env, false);
  auto* run = static_cast<kvm_run*>(shared->kvmRun->addr);
  // immediate_exit first: a vCPU about to enter KVM_RUN returns at once; one inside it gets
  // the signal (api.rst, "immediate_exit").
  __atomic_store_n(&run->immediate_exit, 1, __ATOMIC_SEQ_CST);
  if (shared->hasThread) pthread_kill(shared->thread, kickSignal);
  return Napi::Boolean::New(env, true);
}

// harvestDirtyRing(vcpuHandle, out: Float64Array) -> entries written as [slot, pageOffset] pairs.
// Collected entries are marked for KVM_RESET_DIRTY_RINGS. Any thread.
Napi::Value HarvestDirtyRing(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint32_t id = HandleId(env, info[0], "vcpu");
  if (!info[1].IsTypedArray() || info[1].As<Napi::TypedArray>().TypedArrayType() != napi_float64_array) {
    ThrowTypeError(env, "out must be a Float64Array");
  }
  auto out = info[1].As<Napi::Float64Array>();
  auto shared = Handles::FindVcpuShared(id);
  if (!shared) ThrowStateError(env, "EBADF", "Vcpu handle is closed");
  std::lock_guard<std::mutex> guard(shared->lock);
  if (shared->closed) ThrowStateError(env, "EBADF", "Vcpu handle is closed");
  if (!shared->dirtyRing) ThrowStateError(env, "ERR_KVM_NO_DIRTY_RING", "the VM did not enable KVM_CAP_DIRTY_LOG_RING before creating this vCPU");
  auto* ring = static_cast<kvm_dirty_gfn*>(shared->dirtyRing->addr);
  uint32_t entries = static_cast<uint32_t>(shared->dirtyRing->size / sizeof(kvm_dirty_gfn));
  size_t capacity = out.ElementLength() / 2;
  size_t count = 0;
  double* data = out.Data();
  // api.rst, KVM_CAP_DIRTY_LOG_RING: read flags with acquire, publish RESET with release.
  while (count < capacity) {
    kvm_dirty_gfn* gfn = &ring[shared->ringFetchIndex & (entries - 1)];
    uint32_t flags = __atomic_load_n(&gfn->flags, __ATOMIC_ACQUIRE);
    if (!(flags & KVM_DIRTY_GFN_F_DIRTY)) break;
    data[count * 2] = gfn->slot;
    data[count * 2 + 1] = static_cast<double>(gfn->offset);
    __atomic_store_n(&gfn->flags, KVM_DIRTY_GFN_F_RESET, __ATOMIC_RELEASE);
    shared->ringFetchIndex++;
    count++;
  }
  return Napi::Number::New(env, static_cast<double>(count));
}

// closeVcpu(vcpuHandle, kvmRun?): idempotent; only from the owning thread. Given the vCPU's
// kvm_run ArrayBuffer (an explicit close), it detaches the buffer and releases the page at once:
// left to the buffer's finalizer, which runs on a later event-loop turn, the mapping would keep
// the vCPU, and so the whole VM, alive in the kernel until then.
Napi::Value CloseVcpuHandle(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint32_t id = HandleId(env, info[0], "vcpu");
  auto shared = Handles::FindVcpuShared(id);
  if (!shared) return env.Undefined();
  Handles::Vcpu(env, info[0]);  // throws when called from another thread
  std::shared_ptr<Mapping> kvmRun;
  if (info.Length() > 1 && info[1].IsArrayBuffer()) {
    auto buffer = info[1].As<Napi::ArrayBuffer>();
    std::lock_guard<std::mutex> guard(shared->lock);
    if (shared->kvmRun && !buffer.IsDetached() && buffer.Data() == shared->kvmRun->addr) {
      buffer.Detach();
      kvmRun = shared->kvmRun;
    }
  }
  auto state = Handles::RemoveVcpu(id);
  if (state) CloseVcpu(state);
  if (kvmRun) kvmRun->Release();
  return env.Undefined();
}

// releaseVcpu(vcpuHandle, kvmRun): hands a vCPU this thread created (made ahead, say) to another
// thread, which takes it with adoptVcpu(). This thread's kvm_run ArrayBuffer is detached; the
// page stays mapped for the adopter. Until adopted, the vCPU is reached only by its handle from
// any thread (restoreParkedVcpuState(), closeReleasedVcpu()).
Napi::Value ReleaseVcpu(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint32_t id = HandleId(env, info[0], "vcpu");
  auto vcpu = Handles::Vcpu(env, info[0]);
  if (!Handles::ReleaseVcpu(env, id)) ThrowStateError(env, "EBADF", "Vcpu handle is closed");
  std::lock_guard<std::mutex> guard(vcpu->shared->lock);
  vcpu->shared->hasThread = false;
  if (info[1].IsArrayBuffer()) {
    auto buffer = info[1].As<Napi::ArrayBuffer>();
    if (vcpu->shared->kvmRun && !buffer.IsDetached() && buffer.Data() == vcpu->shared->kvmRun->addr) buffer.Detach();
  }
  return env.Undefined();
}

// adoptVcpu(vcpuHandle) -> [handle, fd, kvmRun ArrayBuffer]: a released vCPU becomes this
// thread's, as if it had created it (its kicks come here from now on).
Napi::Value AdoptVcpu(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::call_once(kickSignalOnce, InstallKickSignal);
  uint32_t id = HandleId(env, info[0], "vcpu");
  auto state = Handles::AdoptVcpu(env, id);
  if (!state) ThrowStateError(env, "ERR_KVM_WRONG_THREAD", "this vCPU is closed, or was not released by its thread (releaseVcpu())");
  std::shared_ptr<Mapping> kvmRun;
  {
    std::lock_guard<std::mutex> guard(state->shared->lock);
    state->shared->thread = pthread_self();
    state->shared->hasThread = true;
    kvmRun = state->shared->kvmRun;
  }
  UnblockKickSignal();
  Napi::Array result = Napi::Array::New(env, 3);
  result.Set(0u, Napi::Number::New(env, id));
  result.Set(1u, Napi::Number::New(env, state->fd));
  result.Set(2u, ExposeMapping(env, kvmRun));
  return result;
}

// closeReleasedVcpu(vcpuHandle) -> whether it closed it: a released vCPU no thread adopted. Any thread.
Napi::Value CloseReleasedVcpu(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint32_t id = HandleId(env, info[0], "vcpu");
  auto state = Handles::RemoveReleasedVcpu(id);
  if (!state) return Napi::Boolean::New(env, false);
  CloseVcpu(state);
  return Napi::Boolean::New(env, true);
}

Napi::Value KickSignal(const Napi::CallbackInfo& info) {
  std::call_once(kickSignalOnce, InstallKickSignal);
  return Napi::Number::New(info.Env(), kickSignal);
}

}  // namespace nodekvm
