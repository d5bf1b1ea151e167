#include "handles.h"

#include <sys/mman.h>
#include <unistd.h>

#include <vector>

#include "errors.h"
#include "unmapper.h"

namespace nodekvm {

Mapping::~Mapping() {
  bool mapped = addr != nullptr && addr != MAP_FAILED;
  if (mapped && size >= kBackgroundUnmapBytes) {
    // The fd goes now (cheap: the mapping still holds the file), the pages on the unmapper's
    // thread, where the file's last reference goes with them. Nothing can reach the range
    // meanwhile, and no new mapping can take its place until it is unmapped.
    if (fd >= 0) close(fd);
    UnmapLater(addr, size);
    return;
  }
  if (mapped) munmap(addr, size);
  if (fd >= 0) close(fd);
}

void Mapping::Release() {
  if (addr == nullptr || addr == MAP_FAILED) return;
  // MAP_FIXED replaces the pages in place: for kvm_run the kernel drops the vCPU file (and with
  // it the VM) now, and the address range cannot be reused before ~Mapping unmaps it.
  mmap(addr, size, PROT_NONE, MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  keepAlive.reset();
}

VmState::~VmState() {
  // Slots release their mappings here, when neither the VM fd nor any vCPU can reach them.
  slots.clear();
}

namespace {

struct Entry {
  HandleKind kind;
  napi_env owner;
  std::shared_ptr<SystemState> system;
  std::shared_ptr<VmState> vm;
  std::shared_ptr<VcpuState> vcpu;
  // A released vCPU (owner null): the thread that let go of it, whose teardown closes it if no
  // thread adopted it meanwhile.
  napi_env releasedBy = nullptr;
};

std::mutex tableLock;
std::unordered_map<uint32_t, Entry> table;
uint32_t nextId = 1;

uint32_t Add(Entry entry) {
  std::lock_guard<std::mutex> guard(tableLock);
  uint32_t id = nextId++;
  table.emplace(id, std::move(entry));
  return id;
}

const Entry* Find(uint32_t id, HandleKind kind) {
  auto it = table.find(id);
  if (it == table.end() || it->second.kind != kind) return nullptr;
  return &it->second;
}

const char* KindName(HandleKind kind) {
  switch (kind) {
    case HandleKind::System: return "Kvm";
    case HandleKind::Vm: return "Vm";
    case HandleKind::Vcpu: return "Vcpu";
  }
  return "handle";
}

[[noreturn]] void ThrowClosed(Napi::Env env, HandleKind kind) {
  ThrowStateError(env, "EBADF", std::string(KindName(kind)) + " handle is closed");
}

}  // namespace

uint32_t HandleId(Napi::Env env, const Napi::Value& value, const char* what) {
  if (!value.IsNumber()) ThrowTypeError(env, std::string(what) + " must be a handle number");
  double d = value.As<Napi::Number>().DoubleValue();
  if (!(d >= 0 && d <= 4294967295.0) || d != static_cast<double>(static_cast<uint32_t>(d))) {
    ThrowOutOfRangeError(env, std::string(what) + " is not a valid handle");
  }
  return static_cast<uint32_t>(d);
}

uint32_t Handles::AddSystem(std::shared_ptr<SystemState> s, napi_env owner) {
  return Add(Entry{HandleKind::System, owner, std::move(s), nullptr, nullptr});
}
uint32_t Handles::AddVm(std::shared_ptr<VmState> s, napi_env owner) {
  return Add(Entry{HandleKind::Vm, owner, nullptr, std::move(s), nullptr});
}
uint32_t Handles::AddVcpu(std::shared_ptr<VcpuState> s) {
  napi_env owner = s->ownerEnv;
  return Add(Entry{HandleKind::Vcpu, owner, nullptr, nullptr, std::move(s)});
}

std::shared_ptr<SystemState> Handles::System(Napi::Env env, const Napi::Value& v) {
  uint32_t id = HandleId(env, v, "kvm");
  std::lock_guard<std::mutex> guard(tableLock);
  const Entry* e = Find(id, HandleKind::System);
  if (e == nullptr) ThrowClosed(env, HandleKind::System);
  return e->system;
}

std::shared_ptr<VmState> Handles::Vm(Napi::Env env, const Napi::Value& v) {
  uint32_t id = HandleId(env, v, "vm");
  std::lock_guard<std::mutex> guard(tableLock);
  const Entry* e = Find(id, HandleKind::Vm);
  if (e == nullptr) ThrowClosed(env, HandleKind::Vm);
  return e->vm;
}

std::shared_ptr<VcpuState> Handles::Vcpu(Napi::Env env, const Napi::Value& v) {
  uint32_t id = HandleId(env, v, "vcpu");
  std::shared_ptr<VcpuState> vcpu;
  {
    std::lock_guard<std::mutex> guard(tableLock);
    const Entry* e = Find(id, HandleKind::Vcpu);
    if (e == nullptr) ThrowClosed(env, HandleKind::Vcpu);
    vcpu = e->vcpu;
  }
  if (vcpu->ownerEnv == nullptr) {
    ThrowStateError(env, "ERR_KVM_WRONG_THREAD",
                    "vCPU " + std::to_string(vcpu->shared->vcpuId) + " was handed over (vcpu.handOver()): only the thread that adopts it may use it");
  }
  if (vcpu->ownerEnv != static_cast<napi_env>(env)) {
    ThrowStateError(env, "ERR_KVM_WRONG_THREAD",
                    "vCPU " + std::to_string(vcpu->shared->vcpuId) +
                        " belongs to the thread that created it; use its kick handle from other threads");
  }
  return vcpu;
}

std::shared_ptr<VcpuShared> Handles::FindVcpuShared(uint32_t id) {
  std::lock_guard<std::mutex> guard(tableLock);
  const Entry* e = Find(id, HandleKind::Vcpu);
  return e == nullptr ? nullptr : e->vcpu->shared;
}

uint32_t Handles::FindVmByFd(int fd) {
  std::lock_guard<std::mutex> guard(tableLock);
  for (auto& [id, e] : table) {
    if (e.kind == HandleKind::Vm && e.vm->fd == fd) return id;
  }
  return 0;
}

std::shared_ptr<SystemState> Handles::RemoveSystem(uint32_t id) {
  std::lock_guard<std::mutex> guard(tableLock);
  auto it = table.find(id);
  if (it == table.end() || it->second.kind != HandleKind::System) return nullptr;
  auto s = it->second.system;
  table.erase(it);
  return s;
}

std::shared_ptr<VmState> Handles::RemoveVm(uint32_t id) {
  std::lock_guard<std::mutex> guard(tableLock);
  auto it = table.find(id);
  if (it == table.end() || it->second.kind != HandleKind::Vm) return nullptr;
  auto s = it->second.vm;
  table.erase(it);
  return s;
}

std::shared_ptr<VcpuState> Handles::RemoveVcpu(uint32_t id) {
  std::lock_guard<std::mutex> guard(tableLock);
  auto it = table.find(id);
  if (it == table.end() || it->second.kind != HandleKind::Vcpu) return nullptr;
  auto s = it->second.vcpu;
  table.erase(it);
  return s;
}

bool Handles::ReleaseVcpu(napi_env env, uint32_t id) {
  std::lock_guard<std::mutex> guard(tableLock);
  auto it = table.find(id);
  if (it == table.end() || it->second.kind != HandleKind::Vcpu || it->second.owner != env) return false;
  it->second.owner = nullptr;
  it->second.releasedBy = env;
  it->second.vcpu->ownerEnv = nullptr;
  return true;
}

std::shared_ptr<VcpuState> Handles::AdoptVcpu(napi_env env, uint32_t id) {
  std::lock_guard<std::mutex> guard(tableLock);
  auto it = table.find(id);
  if (it == table.end() || it->second.kind != HandleKind::Vcpu || it->second.owner != nullptr) return nullptr;
  it->second.owner = env;
  it->second.releasedBy = nullptr;
  it->second.vcpu->ownerEnv = env;
  return it->second.vcpu;
}

std::shared_ptr<VcpuState> Handles::RemoveReleasedVcpu(uint32_t id) {
  std::lock_guard<std::mutex> guard(tableLock);
  auto it = table.find(id);
  if (it == table.end() || it->second.kind != HandleKind::Vcpu || it->second.owner != nullptr) return nullptr;
  auto s = it->second.vcpu;
  table.erase(it);
  return s;
}

size_t Handles::Count() {
  std::lock_guard<std::mutex> guard(tableLock);
  return table.size();
}

void Handles::CloseOwnedBy(napi_env env) {
  std::vector<Entry> owned;
  {
    std::lock_guard<std::mutex> guard(tableLock);
    for (auto it = table.begin(); it != table.end();) {
      if (it->second.owner == env || (it->second.owner == nullptr && it->second.releasedBy == env)) {
        owned.push_back(std::move(it->second));
        it = table.erase(it);
      } else {
        ++it;
      }
    }
  }
  // vCPUs first: they pin the VM's memory slots.
  for (auto& e : owned) if (e.vcpu) CloseVcpu(e.vcpu);
  for (auto& e : owned) if (e.vm) CloseVm(e.vm);
  for (auto& e : owned) if (e.system) CloseSystem(e.system);
}

void CloseSystem(const std::shared_ptr<SystemState>& s) {
  std::unique_lock<std::shared_mutex> guard(s->lock);
  if (s->closed) return;
  s->closed = true;
  close(s->fd);
  s->fd = -1;
}

void CloseVm(const std::shared_ptr<VmState>& s) {
  std::unique_lock<std::shared_mutex> guard(s->lock);
  if (s->closed) return;
  s->closed = true;
  close(s->fd);
  // fd stays recorded for diagnostics but `closed` guards every use.
}

void CloseVcpu(const std::shared_ptr<VcpuState>& s) {
  if (s->fd < 0) return;
  {
    // Kickers and harvesters hold the lock while they touch the thread or the ring.
    std::lock_guard<std::mutex> guard(s->shared->lock);
    s->shared->closed = true;
    s->shared->fd = -1;
    s->shared->dirtyRing.reset();
    // kvm_run stays mapped while an ArrayBuffer holds it; that mapping keeps the VM alive, so
    // the kernel never sees guest RAM unmapped under a live vCPU.
    s->shared->kvmRun.reset();
  }
  close(s->fd);
  s->fd = -1;
  s->vm.reset();
}

namespace {
void FinalizeMappingRef(Napi::Env, void*, std::shared_ptr<Mapping>* ref) { delete ref; }
}  // namespace

Napi::ArrayBuffer ExposeMapping(Napi::Env env, const std::shared_ptr<Mapping>& mapping) {
  auto* ref = new std::shared_ptr<Mapping>(mapping);
  return Napi::ArrayBuffer::New(env, mapping->addr, mapping->size, FinalizeMappingRef, ref);
}

}  // namespace nodekvm
