// Guest memory: page-aligned mmap'd regions exposed to JavaScript as external ArrayBuffers with
// no copy. Each ArrayBuffer and each VM memory slot holds a reference; the region is unmapped
// only when the last one goes, so JavaScript can never touch unmapped memory.
#include "memory.h"

#include <errno.h>
#include <sys/mman.h>
#include <unistd.h>

#include <mutex>
#include <unordered_map>

#include "errors.h"

namespace nodekvm {

namespace {

constexpr uint64_t kPageSize = 4096;
// The largest ArrayBuffer Node 20 can create (buffer.constants.MAX_LENGTH). Beyond it, Node runs
// the external buffer's finalizer when creation fails, and node-addon-api then frees its
// finalizer data a second time: a double free.
constexpr uint64_t kMaxMemoryBytes = 1ull << 32;

std::mutex registryLock;
// Handles name mappings weakly: attach() works while anything still holds the mapping.
std::unordered_map<uint32_t, std::weak_ptr<Mapping>> registry;
uint32_t nextMemoryId = 1;

}  // namespace

uint64_t ReadU64(Napi::Env env, const Napi::Value& value, const char* name) {
  if (value.IsBigInt()) {
    bool lossless = false;
    uint64_t v = value.As<Napi::BigInt>().Uint64Value(&lossless);
    if (!lossless) ThrowRangeError(env, std::string(name) + " must be an integer 0..2^64-1");
    return v;
  }
  if (value.IsNumber()) {
    double d = value.As<Napi::Number>().DoubleValue();
    if (!(d >= 0 && d <= 9007199254740991.0) || d != static_cast<double>(static_cast<uint64_t>(d))) {
      ThrowRangeError(env, std::string(name) + " must be a non-negative safe integer");
    }
    return static_cast<uint64_t>(d);
  }
  ThrowTypeError(env, std::string(name) + " must be a number or bigint");
}

std::shared_ptr<Mapping> FindMemory(Napi::Env env, const Napi::Value& id) {
  uint32_t memoryId = HandleId(env, id, "memory");
  std::lock_guard<std::mutex> guard(registryLock);
  auto it = registry.find(memoryId);
  std::shared_ptr<Mapping> mapping = it == registry.end() ? nullptr : it->second.lock();
  if (!mapping) ThrowStateError(env, "EBADF", "GuestMemory is closed");
  return mapping;
}

// memoryCreate(size, memfd, hugepages, mergeable) -> [id, ArrayBuffer, fd]
Napi::Value MemoryCreate(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint64_t size = ReadU64(env, info[0], "size");
  bool useMemfd = info[1].ToBoolean();
  bool hugepages = info[2].ToBoolean();
  bool mergeable = info[3].ToBoolean();
  if (size == 0 || size % kPageSize) ThrowRangeError(env, "size must be a positive multiple of the page size (4096)");
  if (size > kMaxMemoryBytes) ThrowRangeError(env, "size is larger than one ArrayBuffer can hold (4 GiB)");

  auto mapping = std::make_shared<Mapping>();
  mapping->size = size;
  int flags = MAP_SHARED | MAP_NORESERVE;
  if (useMemfd) {
    mapping->fd = memfd_create("node-kvm-guest-ram", MFD_CLOEXEC);
    if (mapping->fd < 0) ThrowSyscallError(env, errno, "memfd_create");
    if (ftruncate(mapping->fd, static_cast<off_t>(size)) < 0) ThrowSyscallError(env, errno, "ftruncate");
  } else {
    // Shared anonymous: the kernel keeps it as one object, so fork() or a later memfd export
    // never splits guest RAM into private copies.
    flags |= MAP_ANONYMOUS;
  }
  void* addr = mmap(nullptr, size, PROT_READ | PROT_WRITE, flags, mapping->fd, 0);
  if (addr == MAP_FAILED) ThrowSyscallError(env, errno, "mmap");
  mapping->addr = addr;
  // Advice is best effort: a host without THP or KSM still runs the guest.
  if (hugepages) madvise(addr, size, MADV_HUGEPAGE);
  if (mergeable) madvise(addr, size, MADV_MERGEABLE);

  uint32_t id;
  {
    std::lock_guard<std::mutex> guard(registryLock);
    id = nextMemoryId++;
    registry.emplace(id, mapping);
  }
  Napi::Array result = Napi::Array::New(env, 3);
  result.Set(0u, Napi::Number::New(env, id));
  result.Set(1u, ExposeMapping(env, mapping));
  result.Set(2u, Napi::Number::New(env, mapping->fd));
  return result;
}

// memoryAttach(id) -> [ArrayBuffer, size, fd]: another view of the same mapping (any thread).
Napi::Value MemoryAttach(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto mapping = FindMemory(env, info[0]);
  Napi::Array result = Napi::Array::New(env, 3);
  result.Set(0u, ExposeMapping(env, mapping));
  result.Set(1u, Napi::Number::New(env, static_cast<double>(mapping->size)));
  result.Set(2u, Napi::Number::New(env, mapping->fd));
  return result;
}

// memoryInfo() -> { mappings, bytes }: live guest mappings, for leak checks.
Napi::Value MemoryInfo(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint64_t live = 0, bytes = 0;
  {
    std::lock_guard<std::mutex> guard(registryLock);
    for (auto it = registry.begin(); it != registry.end();) {
      if (auto m = it->second.lock()) {
        live++;
        bytes += m->size;
        ++it;
      } else {
        it = registry.erase(it);
      }
    }
  }
  Napi::Object result = Napi::Object::New(env);
  result.Set("mappings", Napi::Number::New(env, static_cast<double>(live)));
  result.Set("bytes", Napi::Number::New(env, static_cast<double>(bytes)));
  return result;
}

// detachBuffer(arrayBuffer): makes every view of it zero-length and drops its reference.
Napi::Value DetachBuffer(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsArrayBuffer()) ThrowTypeError(env, "buffer must be an ArrayBuffer");
  auto buffer = info[0].As<Napi::ArrayBuffer>();
  if (!buffer.IsDetached()) buffer.Detach();
  return env.Undefined();
}

}  // namespace nodekvm
