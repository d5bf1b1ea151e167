// Guest memory: page-aligned mmap'd regions exposed to JavaScript as external ArrayBuffers with
// no copy. Each ArrayBuffer and each VM memory slot holds a reference; the region is unmapped
// only when the last one goes, so JavaScript can never touch unmapped memory.
//
// Three backings:
// - anonymous: a memfd that JavaScript never sees, mapped MAP_SHARED;
// - memfd: the same, with the memfd exposed (memory.fd) for sharing and snapshots;
// - file: a regular file mapped MAP_PRIVATE (copy-on-write: guest writes never reach the file).
// Each keeps a private open file description of what backs it, so that populatedRanges() can
// lseek(SEEK_DATA) without moving the position of an fd that JavaScript holds.
#include "memory.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <mutex>
#include <unordered_map>
#include <utility>
#include <vector>

#include "errors.h"
#include "promise-worker.h"

namespace nodekvm {

namespace {

constexpr uint64_t kPageSize = 4096;
// The largest ArrayBuffer Node 20 can create (buffer.constants.MAX_LENGTH). Beyond it, Node runs
// the external buffer's finalizer when creation fails, and node-addon-api then frees its
// finalizer data a second time: a double free.
constexpr uint64_t kMaxMemoryBytes = 1ull << 32;
// The seals of guest RAM's memfd: its size never changes.
constexpr int kRamSeals = F_SEAL_SHRINK | F_SEAL_GROW;
#ifndef F_SEAL_FUTURE_WRITE
#define F_SEAL_FUTURE_WRITE 0x0010
#endif

// /proc/self/pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst).
constexpr uint64_t kPagemapPresent = 1ull << 63;
constexpr uint64_t kPagemapSwapped = 1ull << 62;
constexpr uint64_t kPagemapFileOrSharedAnon = 1ull << 61;
constexpr size_t kPagemapChunkEntries = 8192;

enum class Backing { Anonymous, Memfd, File };

const char* BackingName(Backing backing) {
  switch (backing) {
    case Backing::Anonymous: return "anonymous";
    case Backing::Memfd: return "memfd";
    case Backing::File: return "file";
  }
  return "anonymous";
}

// Guest RAM. Every GuestMapping is created here; the rest of the addon sees it as a Mapping.
struct GuestMapping : Mapping {
  Backing backing = Backing::Anonymous;
  // The memfd or file behind the mapping, opened privately (see the top of this file).
  int backingFd = -1;
  // Where the mapping starts in the file (file backing only).
  uint64_t fileOffset = 0;
  ~GuestMapping() {
    if (backingFd >= 0) close(backingFd);
  }
};

using Ranges = std::vector<std::pair<uint64_t, uint64_t>>;  // [start, end) in bytes, sorted

void AppendRange(Ranges& ranges, uint64_t start, uint64_t end) {
  if (!ranges.empty() && start <= ranges.back().second) {
    ranges.back().second = std::max(ranges.back().second, end);
  } else {
    ranges.emplace_back(start, end);
  }
}

struct FdCloser {
  int fd;
  ~FdCloser() {
    if (fd >= 0) close(fd);
  }
};

std::mutex registryLock;
// Handles name mappings weakly: attach() works while anything still holds the mapping.
std::unordered_map<uint32_t, std::weak_ptr<GuestMapping>> registry;
uint32_t nextMemoryId = 1;

// The reference of the GuestMemory that created a mapping. Held here rather than by an
// ArrayBuffer, so that JavaScript gets one (memoryAttach) only once it reads guest RAM: V8 counts
// a large external ArrayBuffer as memory pressure and collects garbage for it at once, which
// would cost a restore that never reads RAM a few milliseconds. Dropped by close()
// (memoryRelease), by the GuestMemory's collection (its finalizer calls memoryRelease), or when
// the thread that created it ends.
struct Owner {
  std::shared_ptr<GuestMapping> mapping;
  napi_env env;
};
std::unordered_map<uint32_t, Owner> owners;

std::shared_ptr<GuestMapping> FindGuestMapping(Napi::Env env, const Napi::Value& id) {
  uint32_t memoryId = HandleId(env, id, "memory");
  std::lock_guard<std::mutex> guard(registryLock);
  auto it = registry.find(memoryId);
  std::shared_ptr<GuestMapping> mapping = it == registry.end() ? nullptr : it->second.lock();
  if (!mapping) ThrowStateError(env, "EBADF", "GuestMemory is closed");
  return mapping;
}

// A new open file description of the file behind `fd`, so that lseek on it moves no position
// that anyone else shares. Falls back to dup() where /proc is not mounted.
int ReopenPrivately(int fd, int flags) {
  char path[64];
  snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
  int reopened = open(path, flags | O_CLOEXEC);
  return reopened >= 0 ? reopened : fcntl(fd, F_DUPFD_CLOEXEC, 0);
}

// The regular file open as `fd`, reopened read-only (ReopenPrivately()) once checked to hold `size`
// bytes from the page-aligned `offset`: what memoryMapFile() and memoryMapFileOver() map.
int OpenFileRange(Napi::Env env, int fd, uint64_t offset, uint64_t size) {
  if (offset % kPageSize) ThrowInvalidValueError(env, "offset must be page-aligned (4096)");
  if (offset > static_cast<uint64_t>(INT64_MAX) - size) ThrowOutOfRangeError(env, "offset + size is beyond the largest file offset");
  FdCloser file{ReopenPrivately(fd, O_RDONLY)};
  if (file.fd < 0) ThrowSyscallError(env, errno, "open(fd)");
  struct stat st;
  if (fstat(file.fd, &st) < 0) ThrowSyscallError(env, errno, "fstat");
  if (!S_ISREG(st.st_mode)) ThrowTypeError(env, "file must be a regular file");
  if (static_cast<uint64_t>(st.st_size) < offset + size) {
    ThrowOutOfRangeError(env, "offset + size (" + std::to_string(offset + size) + ") is beyond the end of the file (" +
                                  std::to_string(st.st_size) + " bytes)");
  }
  int checked = file.fd;
  file.fd = -1;
  return checked;
}

void CheckSize(Napi::Env env, uint64_t size) {
  if (size == 0 || size % kPageSize) ThrowInvalidValueError(env, "size must be a positive multiple of the page size (4096)");
  if (size > kMaxMemoryBytes) ThrowOutOfRangeError(env, "size is larger than one ArrayBuffer can hold (4 GiB)");
}

uint32_t RegisterOwned(Napi::Env env, const std::shared_ptr<GuestMapping>& mapping) {
  std::lock_guard<std::mutex> guard(registryLock);
  uint32_t id = nextMemoryId++;
  registry.emplace(id, mapping);
  owners.emplace(id, Owner{mapping, env});
  return id;
}

// Guest RAM in a memfd, exposed (memory.fd) or not; its backingFd is the caller's to fill.
std::shared_ptr<GuestMapping> NewMemfdMapping(uint64_t size, bool exposeMemfd) {
  auto mapping = std::make_shared<GuestMapping>();
  mapping->size = size;
  mapping->backing = exposeMemfd ? Backing::Memfd : Backing::Anonymous;
  return mapping;
}

// What memoryCreate() and memoryFromFd() do once the mapping's memfd is open as its backingFd:
// the exposed fd, the mapping, the handle. Returns [id, fd].
Napi::Value MapMemfd(Napi::Env env, const std::shared_ptr<GuestMapping>& mapping, bool hugepages, bool mergeable) {
  if (mapping->backing == Backing::Memfd) {
    mapping->fd = ReopenPrivately(mapping->backingFd, O_RDWR);
    if (mapping->fd < 0) ThrowSyscallError(env, errno, "open(memfd)");
  }
  // MAP_SHARED: the kernel keeps guest RAM as one object, so fork() never splits it into
  // private copies.
  void* addr = mmap(nullptr, mapping->size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, mapping->backingFd, 0);
  if (addr == MAP_FAILED) ThrowSyscallError(env, errno, "mmap");
  mapping->addr = addr;
  // Advice is best effort: a host without THP or KSM still runs the guest.
  if (hugepages) madvise(addr, mapping->size, MADV_HUGEPAGE);
  if (mergeable) madvise(addr, mapping->size, MADV_MERGEABLE);
  Napi::Array result = Napi::Array::New(env, 2);
  result.Set(0u, Napi::Number::New(env, RegisterOwned(env, mapping)));
  result.Set(1u, Napi::Number::New(env, mapping->fd));
  return result;
}

// Appends the data ranges (lseek SEEK_DATA/SEEK_HOLE) of `fd` within [start, end), page-rounded,
// as offsets from `start`.
void AppendDataRanges(Napi::Env env, int fd, uint64_t start, uint64_t end, Ranges& ranges) {
  uint64_t position = start;
  while (position < end) {
    off_t data = lseek(fd, static_cast<off_t>(position), SEEK_DATA);
    if (data < 0) {
      if (errno == ENXIO) return;  // no data at or after position
      ThrowSyscallError(env, errno, "lseek(SEEK_DATA)");
    }
    if (static_cast<uint64_t>(data) >= end) return;
    off_t hole = lseek(fd, data, SEEK_HOLE);
    if (hole < 0) {
      // ENXIO: the file shrank between the two calls; what is left of the range is data.
      if (errno != ENXIO) ThrowSyscallError(env, errno, "lseek(SEEK_HOLE)");
      hole = static_cast<off_t>(end);
    }
    uint64_t from = static_cast<uint64_t>(data) & ~(kPageSize - 1);
    uint64_t to = std::min(end, (static_cast<uint64_t>(hole) + kPageSize - 1) & ~(kPageSize - 1));
    if (to <= from) to = std::min(end, from + kPageSize);
    AppendRange(ranges, from - start, to - start);
    position = to;
  }
}

// Pages of a MAP_PRIVATE file mapping that hold a private copy (present and anonymous, or
// swapped out), from /proc/self/pagemap. mincore() would miss copies that are swapped out.
void AppendPrivateCopies(Napi::Env env, const GuestMapping& mapping, Ranges& ranges) {
  FdCloser pagemap{open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC)};
  if (pagemap.fd < 0) ThrowSyscallError(env, errno, "open(/proc/self/pagemap)");
  uint64_t firstPage = reinterpret_cast<uint64_t>(mapping.addr) / kPageSize;
  uint64_t pageCount = mapping.size / kPageSize;
  std::vector<uint64_t> entries(std::min<uint64_t>(pageCount, kPagemapChunkEntries));
  for (uint64_t done = 0; done < pageCount;) {
    size_t want = static_cast<size_t>(std::min<uint64_t>(pageCount - done, entries.size()));
    ssize_t got = pread(pagemap.fd, entries.data(), want * sizeof(uint64_t), static_cast<off_t>((firstPage + done) * sizeof(uint64_t)));
    if (got < 0) {
      if (errno == EINTR) continue;
      ThrowSyscallError(env, errno, "pread(/proc/self/pagemap)");
    }
    size_t count = static_cast<size_t>(got) / sizeof(uint64_t);
    if (count == 0) ThrowSyscallError(env, EIO, "pread(/proc/self/pagemap)");
    for (size_t i = 0; i < count; i++) {
      uint64_t entry = entries[i];
      bool privateCopy = (entry & kPagemapPresent) && !(entry & kPagemapFileOrSharedAnon);
      if (privateCopy || (entry & kPagemapSwapped)) {
        uint64_t offset = (done + i) * kPageSize;
        AppendRange(ranges, offset, offset + kPageSize);
      }
    }
    done += count;
  }
}

Ranges Union(const Ranges& a, const Ranges& b) {
  Ranges merged;
  merged.reserve(a.size() + b.size());
  size_t i = 0, j = 0;
  while (i < a.size() || j < b.size()) {
    const auto& next = j == b.size() || (i < a.size() && a[i].first <= b[j].first) ? a[i++] : b[j++];
    AppendRange(merged, next.first, next.second);
  }
  return merged;
}

}  // namespace

uint64_t ReadU64(Napi::Env env, const Napi::Value& value, const char* name) {
  if (value.IsBigInt()) {
    bool lossless = false;
    uint64_t v = value.As<Napi::BigInt>().Uint64Value(&lossless);
    if (!lossless) ThrowOutOfRangeError(env, std::string(name) + " must be an integer 0..2^64-1");
    return v;
  }
  if (value.IsNumber()) {
    double d = value.As<Napi::Number>().DoubleValue();
    if (!(d >= 0 && d <= 9007199254740991.0) || d != static_cast<double>(static_cast<uint64_t>(d))) {
      ThrowOutOfRangeError(env, std::string(name) + " must be a non-negative safe integer");
    }
    return static_cast<uint64_t>(d);
  }
  ThrowTypeError(env, std::string(name) + " must be a number or bigint");
}

std::shared_ptr<Mapping> FindMemory(Napi::Env env, const Napi::Value& id) { return FindGuestMapping(env, id); }

// memoryCreate(size, memfd, hugepages, mergeable) -> [id, fd]; memoryAttach(id) gives the ArrayBuffer.
Napi::Value MemoryCreate(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint64_t size = ReadU64(env, info[0], "size");
  bool exposeMemfd = info[1].ToBoolean();
  bool hugepages = info[2].ToBoolean();
  bool mergeable = info[3].ToBoolean();
  CheckSize(env, size);

  auto mapping = NewMemfdMapping(size, exposeMemfd);
  // Anonymous RAM is a memfd too, only not exposed: shared anonymous memory is the same shmem
  // object, but without an fd its holes (pages never touched) cannot be found by lseek.
  mapping->backingFd = memfd_create("node-kvm-guest-ram", MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (mapping->backingFd < 0) ThrowSyscallError(env, errno, "memfd_create");
  if (ftruncate(mapping->backingFd, static_cast<off_t>(size)) < 0) ThrowSyscallError(env, errno, "ftruncate");
  // Its size is fixed for good: a page the guest or the VMM touches can never be cut off from
  // under the mapping (SIGBUS), whoever else holds the memfd (a migration on this host hands it
  // over; memoryFromFd() accepts only a memfd sealed so).
  if (fcntl(mapping->backingFd, F_ADD_SEALS, kRamSeals | F_SEAL_SEAL) < 0) ThrowSyscallError(env, errno, "fcntl(F_ADD_SEALS)");
  return MapMemfd(env, mapping, hugepages, mergeable);
}

// memoryMapFile(fd, offset, size, hugepages) -> id: `size` bytes of the regular
// file open as `fd`, from `offset`, mapped MAP_PRIVATE. The caller may close `fd` afterwards.
// Touching a page of a file mapping past the end of its file raises SIGBUS, so the file must be
// long enough now and must not be truncated while it is mapped.
Napi::Value MemoryMapFile(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = FdArg(env, info[0]);
  uint64_t offset = ReadU64(env, info[1], "offset");
  uint64_t size = ReadU64(env, info[2], "size");
  bool hugepages = info[3].ToBoolean();
  CheckSize(env, size);

  auto mapping = std::make_shared<GuestMapping>();
  mapping->size = size;
  mapping->backing = Backing::File;
  mapping->fileOffset = offset;
  mapping->backingFd = OpenFileRange(env, fd, offset, size);
  // MAP_PRIVATE needs only read access to the file; guest writes make private copies.
  void* addr = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_NORESERVE, mapping->backingFd,
                    static_cast<off_t>(offset));
  if (addr == MAP_FAILED) ThrowSyscallError(env, errno, "mmap");
  mapping->addr = addr;
  if (hugepages) madvise(addr, size, MADV_HUGEPAGE);
  return Napi::Number::New(env, RegisterOwned(env, mapping));
}

// memoryShareFd(id) -> a new close-on-exec fd of the memfd behind anonymous or memfd memory, for
// another process to map the same pages (a migration on this host); the caller closes it. File
// mappings have none: their guest writes are private copies that no fd reaches.
Napi::Value MemoryShareFd(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto mapping = FindGuestMapping(env, info[0]);
  if (mapping->backing == Backing::File) {
    ThrowInvalidValueError(env, "a file mapping (copy-on-write) has no memfd to share: its written pages are private to this process");
  }
  int fd = fcntl(mapping->backingFd, F_DUPFD_CLOEXEC, 0);
  if (fd < 0) ThrowSyscallError(env, errno, "fcntl(F_DUPFD_CLOEXEC)");
  return Napi::Number::New(env, fd);
}

// memoryFromFd(fd, size, expose) -> [id, fd]: maps the memfd `fd` (from another process, say)
// shared, as memoryCreate() maps its own, exposing a private fd of it if `expose`. The caller
// keeps and closes `fd`. Checked first, since the fd may come from a peer we do not trust: a
// regular shmem file of exactly `size` bytes, open for reading and writing, sealed against
// shrinking and growing (so no page can vanish under the mapping and fault) and not against
// writing.
Napi::Value MemoryFromFd(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = FdArg(env, info[0]);
  uint64_t size = ReadU64(env, info[1], "size");
  bool exposeMemfd = info[2].ToBoolean();
  CheckSize(env, size);
  struct stat st;
  if (fstat(fd, &st) < 0) ThrowSyscallError(env, errno, "fstat");
  if (!S_ISREG(st.st_mode)) ThrowInvalidValueError(env, "fd is not a memfd (not a regular file)");
  int seals = fcntl(fd, F_GET_SEALS);
  if (seals < 0) {
    if (errno == EINVAL) ThrowInvalidValueError(env, "fd is not a memfd (it takes no seals)");
    ThrowSyscallError(env, errno, "fcntl(F_GET_SEALS)");
  }
  if ((seals & kRamSeals) != kRamSeals) ThrowInvalidValueError(env, "the memfd is not sealed against shrinking and growing (F_SEAL_SHRINK | F_SEAL_GROW)");
  if (seals & (F_SEAL_WRITE | F_SEAL_FUTURE_WRITE)) ThrowInvalidValueError(env, "the memfd is sealed against writing");
  // Read after the seals: from then on the size cannot change.
  if (fstat(fd, &st) < 0) ThrowSyscallError(env, errno, "fstat");
  if (static_cast<uint64_t>(st.st_size) != size) {
    ThrowInvalidValueError(env, "the memfd holds " + std::to_string(st.st_size) + " bytes, not " + std::to_string(size));
  }
  int flags = fcntl(fd, F_GETFL);
  if (flags < 0) ThrowSyscallError(env, errno, "fcntl(F_GETFL)");
  if ((flags & O_ACCMODE) != O_RDWR) ThrowInvalidValueError(env, "the memfd is not open for reading and writing");

  auto mapping = NewMemfdMapping(size, exposeMemfd);
  // A private open file description (see the top of this file): the peer's position stays its own.
  mapping->backingFd = ReopenPrivately(fd, O_RDWR);
  if (mapping->backingFd < 0) ThrowSyscallError(env, errno, "open(memfd)");
  return MapMemfd(env, mapping, false, false);
}

// memoryReplace(id, otherId): from now on the pages of memory `id` are those of memory
// `otherId`'s memfd, in place: the other memfd is mapped over the same addresses (MAP_FIXED), so
// every view of `id` (in any thread) and every VM memory slot over it see them, and its own pages
// go with its memfd. For a machine built before its RAM arrives (a migration on this host hands
// it over). Both must be memfd-backed and of one size; `otherId` stays as it was. Its exposed fd,
// if any, is made to name the new memfd (the same number). Nothing may use the memory meanwhile.
Napi::Value MemoryReplace(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto target = FindGuestMapping(env, info[0]);
  auto source = FindGuestMapping(env, info[1]);
  if (target == source) ThrowInvalidValueError(env, "a memory cannot replace itself");
  if (target->backing == Backing::File || source->backing == Backing::File) ThrowInvalidValueError(env, "only memfd-backed memory can be replaced, or replace another");
  if (target->size != source->size) ThrowInvalidValueError(env, "the memories differ in size");
  int backing = ReopenPrivately(source->backingFd, O_RDWR);
  if (backing < 0) ThrowSyscallError(env, errno, "open(memfd)");
  int exposed = -1;
  if (target->fd >= 0) {
    exposed = ReopenPrivately(source->backingFd, O_RDWR);
    if (exposed < 0) {
      int error = errno;
      close(backing);
      ThrowSyscallError(env, error, "open(memfd)");
    }
  }
  void* addr = mmap(target->addr, target->size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED | MAP_NORESERVE, backing, 0);
  if (addr == MAP_FAILED) {
    int error = errno;
    // The old pages again, if the kernel took them away (MAP_FIXED unmaps first).
    mmap(target->addr, target->size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED | MAP_NORESERVE, target->backingFd, 0);
    close(backing);
    if (exposed >= 0) close(exposed);
    ThrowSyscallError(env, error, "mmap(MAP_FIXED)");
  }
  close(target->backingFd);
  target->backingFd = backing;
  if (exposed >= 0) {
    // The number every view was given now names the new memfd.
    if (dup3(exposed, target->fd, O_CLOEXEC) < 0) {
      int error = errno;
      close(exposed);
      ThrowSyscallError(env, error, "dup3");
    }
    close(exposed);
  }
  return env.Undefined();
}

// memoryMapFileOver(id, fd, offset): from now on memory `id` is the regular file open as `fd`,
// from `offset`, mapped copy-on-write over the same addresses (MAP_FIXED), as memoryMapFile()
// maps one: every view of it and every VM memory slot over it see the file's bytes, and its own
// pages go with its memfd. For a VM whose memory slot was made before the file was known (a
// spare VM taking a snapshot's RAM): no slot is added then. Memfd-backed memory with no exposed
// fd only. Nothing may use the memory meanwhile, and KVM must not have run a guest on it.
Napi::Value MemoryMapFileOver(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto target = FindGuestMapping(env, info[0]);
  int fd = FdArg(env, info[1]);
  uint64_t offset = ReadU64(env, info[2], "offset");
  if (target->backing == Backing::File) ThrowInvalidValueError(env, "this memory is a file mapping already");
  if (target->fd >= 0) ThrowInvalidValueError(env, "memory with an exposed memfd cannot become a file mapping");
  FdCloser backing{OpenFileRange(env, fd, offset, target->size)};
  void* addr = mmap(target->addr, target->size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED | MAP_NORESERVE, backing.fd,
                    static_cast<off_t>(offset));
  if (addr == MAP_FAILED) {
    int error = errno;
    // The old pages again, if the kernel took them away (MAP_FIXED unmaps first).
    mmap(target->addr, target->size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED | MAP_NORESERVE, target->backingFd, 0);
    ThrowSyscallError(env, error, "mmap(MAP_FIXED)");
  }
  close(target->backingFd);
  target->backingFd = backing.fd;
  backing.fd = -1;
  target->backing = Backing::File;
  target->fileOffset = offset;
  return env.Undefined();
}

// memoryRelease(id): drops the creating GuestMemory's reference; calling it again does nothing.
// Views (ArrayBuffers) and memory slots keep the mapping until they go.
Napi::Value MemoryRelease(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint32_t memoryId = HandleId(env, info[0], "memory");
  std::shared_ptr<GuestMapping> dropped;  // unmapped, if it was the last reference, outside the lock
  {
    std::lock_guard<std::mutex> guard(registryLock);
    auto it = owners.find(memoryId);
    if (it != owners.end()) {
      dropped = std::move(it->second.mapping);
      owners.erase(it);
    }
  }
  return env.Undefined();
}

void ReleaseMemoryOwnedBy(napi_env env) {
  std::vector<std::shared_ptr<GuestMapping>> dropped;
  {
    std::lock_guard<std::mutex> guard(registryLock);
    for (auto it = owners.begin(); it != owners.end();) {
      if (it->second.env == env) {
        dropped.push_back(std::move(it->second.mapping));
        it = owners.erase(it);
      } else {
        ++it;
      }
    }
  }
}

// memoryRetain(id) -> id: another reference that keeps the mapping, without a view of it (an
// ArrayBuffer would cost a garbage collection); memoryRelease(that id) drops it.
Napi::Value MemoryRetain(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto mapping = FindGuestMapping(env, info[0]);
  return Napi::Number::New(env, RegisterOwned(env, mapping));
}

// memoryAttach(id) -> [ArrayBuffer, size, fd, backing]: another view of the same mapping (any
// thread).
Napi::Value MemoryAttach(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto mapping = FindGuestMapping(env, info[0]);
  Napi::Array result = Napi::Array::New(env, 4);
  result.Set(0u, ExposeMapping(env, mapping));
  result.Set(1u, Napi::Number::New(env, static_cast<double>(mapping->size)));
  result.Set(2u, Napi::Number::New(env, mapping->fd));
  result.Set(3u, Napi::String::New(env, BackingName(mapping->backing)));
  return result;
}

// memoryPopulatedRanges(id) -> Float64Array of [offsetBytes, lengthBytes] pairs: page-aligned,
// sorted, coalesced ranges outside of which every byte of the memory reads as zero.
// memfd and anonymous: the memfd's data ranges (pages never touched are holes; swapped-out
// pages count as data). File: the file's data ranges within the mapped window, plus the pages
// the guest or the VMM copied on write.
Napi::Value MemoryPopulatedRanges(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto mapping = FindGuestMapping(env, info[0]);
  Ranges ranges;
  if (mapping->backing == Backing::File) {
    Ranges fileData, privateCopies;
    AppendDataRanges(env, mapping->backingFd, mapping->fileOffset, mapping->fileOffset + mapping->size, fileData);
    AppendPrivateCopies(env, *mapping, privateCopies);
    ranges = Union(fileData, privateCopies);
  } else {
    AppendDataRanges(env, mapping->backingFd, 0, mapping->size, ranges);
  }
  auto out = Napi::Float64Array::New(env, ranges.size() * 2);
  for (size_t i = 0; i < ranges.size(); i++) {
    out[2 * i] = static_cast<double>(ranges[i].first);
    out[2 * i + 1] = static_cast<double>(ranges[i].second - ranges[i].first);
  }
  return out;
}

// Arguments 1 and 2 of memoryDontneed/memoryPopulate: a page-aligned range inside the mapping.
static void CheckRange(Napi::Env env, const Mapping& mapping, uint64_t offset, uint64_t length) {
  if (offset > mapping.size || length > mapping.size - offset) ThrowOutOfRangeError(env, "offset + length is beyond the end of the guest memory");
}

static void ReadPageRange(Napi::Env env, const Napi::CallbackInfo& info, const Mapping& mapping, uint64_t* offset, uint64_t* length) {
  *offset = ReadU64(env, info[1], "offset");
  *length = ReadU64(env, info[2], "length");
  if (*offset % kPageSize || *length % kPageSize) ThrowInvalidValueError(env, "offset and length must be page-aligned (4096)");
  CheckRange(env, mapping, *offset, *length);
}

namespace {
// Gives [offset, offset + length) back to the kernel; on failure, the syscall's name (errno set).
const char* DropPages(const GuestMapping& mapping, uint64_t offset, uint64_t length) {
  if (mapping.backing == Backing::File) {
    return madvise(static_cast<char*>(mapping.addr) + offset, length, MADV_DONTNEED) < 0 ? "madvise(MADV_DONTNEED)" : nullptr;
  }
  return fallocate(mapping.backingFd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(offset), static_cast<off_t>(length)) < 0
      ? "fallocate(FALLOC_FL_PUNCH_HOLE)" : nullptr;
}

class DontneedWorker : public PromiseWorker {
 public:
  DontneedWorker(Napi::Env env, std::shared_ptr<GuestMapping> mapping, uint64_t offset, uint64_t length)
      : PromiseWorker(env), mapping_(std::move(mapping)), offset_(offset), length_(length) {}
  void Execute() override {
    if (length_ > 0) {
      if (const char* failed = DropPages(*mapping_, offset_, length_)) Fail(failed, errno);
    }
    // The mapping's last reference may go here (closed meanwhile): off the event loop, as it should.
    mapping_.reset();
  }

 private:
  std::shared_ptr<GuestMapping> mapping_;
  uint64_t offset_;
  uint64_t length_;
};
}  // namespace

// memoryDontneed(id, offset, length): gives the pages of [offset, offset + length) back to the
// kernel. memfd and anonymous memory then reads as zero there (fallocate PUNCH_HOLE: madvise
// alone would leave the data in the memfd); a file mapping drops its private copies and reads the
// file's bytes again (MADV_DONTNEED).
Napi::Value MemoryDontneed(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto mapping = FindGuestMapping(env, info[0]);
  uint64_t offset, length;
  ReadPageRange(env, info, *mapping, &offset, &length);
  if (length == 0) return env.Undefined();
  if (const char* failed = DropPages(*mapping, offset, length)) ThrowSyscallError(env, errno, failed);
  return env.Undefined();
}

// memoryDontneedAsync(id, offset, length) -> Promise<void>: memoryDontneed() on libuv's pool
// (freeing a populated GiB takes the kernel 70 ms). The mapping is held until it is done.
Napi::Value MemoryDontneedAsync(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto mapping = FindGuestMapping(env, info[0]);
  uint64_t offset, length;
  ReadPageRange(env, info, *mapping, &offset, &length);
  return PromiseWorker::Start(new DontneedWorker(env, std::move(mapping), offset, length));
}

// memoryWrite(id, offset, data): copies the Uint8Array `data` into guest memory at `offset`. For
// writes made before JavaScript needs the memory as an ArrayBuffer (a boot image, say): making
// that costs V8 a garbage collection for so much external memory.
Napi::Value MemoryWrite(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto mapping = FindGuestMapping(env, info[0]);
  uint64_t offset = ReadU64(env, info[1], "offset");
  if (!info[2].IsTypedArray() || info[2].As<Napi::TypedArray>().TypedArrayType() != napi_uint8_array) {
    ThrowTypeError(env, "data must be a Uint8Array");
  }
  auto data = info[2].As<Napi::Uint8Array>();
  size_t length = data.ByteLength();
  CheckRange(env, *mapping, offset, length);
  // memmove: `data` may be a view of this same memory.
  if (length > 0) memmove(static_cast<uint8_t*>(mapping->addr) + offset, data.Data(), length);
  return env.Undefined();
}

// memoryFill(id, offset, length, byte): sets [offset, offset + length) to `byte`.
Napi::Value MemoryFill(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto mapping = FindGuestMapping(env, info[0]);
  uint64_t offset = ReadU64(env, info[1], "offset");
  uint64_t length = ReadU64(env, info[2], "length");
  uint64_t byte = ReadU64(env, info[3], "byte");
  if (byte > 0xff) ThrowOutOfRangeError(env, "byte must be 0..255");
  CheckRange(env, *mapping, offset, length);
  if (length > 0) memset(static_cast<uint8_t*>(mapping->addr) + offset, static_cast<int>(byte), length);
  return env.Undefined();
}

// memoryPopulate(id, offset, length) -> bool: allocates and maps the pages of [offset, offset +
// length) for writing in one call (MADV_POPULATE_WRITE, Linux 5.14), instead of one page fault per
// page as they are first written: for filling fresh memory in bulk, as an incoming migration does.
// False where the kernel lacks it (nothing happens; the writes then fault as usual).
Napi::Value MemoryPopulate(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto mapping = FindGuestMapping(env, info[0]);
  uint64_t offset, length;
  ReadPageRange(env, info, *mapping, &offset, &length);
#ifndef MADV_POPULATE_WRITE
  constexpr int MADV_POPULATE_WRITE = 23;
#endif
  if (length == 0) return Napi::Boolean::New(env, true);
  if (madvise(static_cast<char*>(mapping->addr) + offset, length, MADV_POPULATE_WRITE) < 0) {
    if (errno == EINVAL) return Napi::Boolean::New(env, false);
    ThrowSyscallError(env, errno, "madvise(MADV_POPULATE_WRITE)");
  }
  return Napi::Boolean::New(env, true);
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
