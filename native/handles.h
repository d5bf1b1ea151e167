// Native handle tables. JavaScript names every kernel object by a small integer id that is never
// reused, not by its fd, so a stale id can never reach a file that was opened later in the fd's
// place. Tables are process-wide (worker threads share them) and guarded by a mutex.
#pragma once

#include <napi.h>
#include <pthread.h>

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <unordered_map>

namespace nodekvm {

// An mmap'd region: guest RAM, a vCPU's kvm_run page, or its dirty ring. Owned by shared_ptr;
// every ArrayBuffer that exposes it holds one reference, so the region is unmapped only when no
// JavaScript view, memory slot or vCPU uses it.
struct Mapping {
  void* addr = nullptr;
  size_t size = 0;
  int fd = -1;  // memfd backing guest RAM, or -1
  // Keeps kernel objects that may still use this mapping alive (a kvm_run page holds its vCPU's
  // file, and so the VM and every memory slot the VM maps).
  std::shared_ptr<void> keepAlive;
  // Drops the pages and what they keep alive now, leaving the range reserved and inaccessible
  // until ~Mapping. Only for a mapping that no JavaScript view can reach any more.
  void Release();
  ~Mapping();
};

struct MemorySlot {
  std::shared_ptr<Mapping> mapping;
  uint64_t guestPhysAddr;
  uint64_t size;
  uint32_t flags;
};

// A VM. Its memory slots hold their mappings: the table entry dies at close(), but the struct
// lives on while any vCPU (whose kernel object pins the VM) still exists.
struct VmState {
  int fd = -1;
  std::shared_mutex lock;  // shared for ioctls, exclusive for close
  bool closed = false;
  int vcpuMmapSize = 0;
  std::atomic<uint32_t> dirtyRingBytes{0};
  std::map<uint32_t, MemorySlot> slots;  // guarded by slotsLock
  std::mutex slotsLock;
  ~VmState();
};

// The part of a vCPU that other threads may reach: kick and dirty-ring harvesting.
struct VcpuShared {
  uint32_t vcpuId = 0;
  pthread_t thread{};
  // False while the vCPU is released (handed over, not yet adopted): a kick then only sets
  // immediate_exit, which the adopter's first KVM_RUN sees.
  bool hasThread = true;
  std::shared_ptr<Mapping> kvmRun;
  std::shared_ptr<Mapping> dirtyRing;  // null unless the VM enabled KVM_CAP_DIRTY_LOG_RING
  std::mutex lock;  // guards everything here against close()
  // For restoreParkedVcpuState(), from another thread while the vCPU's own waits (closed: -1).
  int fd = -1;
  size_t xsaveBytes = 0;
  uint32_t ringFetchIndex = 0;
  // The vCPU's TSC frequency in kHz as KVM last said (0: not asked yet, or set since): only
  // KVM_SET_TSC_KHZ changes it, so a state save or restore need not ask again each time.
  std::atomic<uint32_t> tscKhz{0};
  bool closed = false;
};

struct VcpuState {
  int fd = -1;
  // KVM_CAP_XSAVE2 when the vCPU was created: how many bytes KVM_SET_XSAVE reads and
  // KVM_GET_XSAVE2 writes. Fixed from then on (creating a vCPU locks the guest's xfeature
  // permissions), and still known after the VM's fd is closed.
  size_t xsaveBytes = 0;
  napi_env ownerEnv = nullptr;
  std::shared_ptr<VmState> vm;
  std::shared_ptr<VcpuShared> shared;
};

struct SystemState {
  int fd = -1;
  std::shared_mutex lock;
  bool closed = false;
};

enum class HandleKind { System, Vm, Vcpu };

// Registry of live handles by id.
class Handles {
 public:
  static uint32_t AddSystem(std::shared_ptr<SystemState> s, napi_env owner);
  static uint32_t AddVm(std::shared_ptr<VmState> s, napi_env owner);
  static uint32_t AddVcpu(std::shared_ptr<VcpuState> s);

  static std::shared_ptr<SystemState> System(Napi::Env env, const Napi::Value& id);
  static std::shared_ptr<VmState> Vm(Napi::Env env, const Napi::Value& id);
  // Only the thread that created a vCPU may use it (KVM expects vCPU ioctls from one thread).
  static std::shared_ptr<VcpuState> Vcpu(Napi::Env env, const Napi::Value& id);
  // Any thread; null when the vCPU is closed.
  static std::shared_ptr<VcpuShared> FindVcpuShared(uint32_t id);
  static uint32_t FindVmByFd(int fd);

  static std::shared_ptr<SystemState> RemoveSystem(uint32_t id);
  static std::shared_ptr<VmState> RemoveVm(uint32_t id);
  static std::shared_ptr<VcpuState> RemoveVcpu(uint32_t id);
  // A vCPU handed from its thread to another (releaseVcpu()): no thread owns it until one adopts
  // it. Release: false unless `env` owns it. Adopt: null unless it is released. RemoveReleased:
  // the vCPU, if it is still released (never adopted), taken out of the table.
  static bool ReleaseVcpu(napi_env env, uint32_t id);
  static std::shared_ptr<VcpuState> AdoptVcpu(napi_env env, uint32_t id);
  static std::shared_ptr<VcpuState> RemoveReleasedVcpu(uint32_t id);

  // Closes every handle a thread's environment created, when that environment is torn down.
  static void CloseOwnedBy(napi_env env);
  static size_t Count();
};

uint32_t HandleId(Napi::Env env, const Napi::Value& value, const char* what);

// Closing helpers shared by the close() bindings and environment teardown.
void CloseSystem(const std::shared_ptr<SystemState>& s);
void CloseVm(const std::shared_ptr<VmState>& s);
void CloseVcpu(const std::shared_ptr<VcpuState>& s);

// Wraps a mapping (or part of it) in an external ArrayBuffer that holds a reference to it.
Napi::ArrayBuffer ExposeMapping(Napi::Env env, const std::shared_ptr<Mapping>& mapping);

}  // namespace nodekvm
