// A userfaultfd over one guest memory, for post-copy migration: the whole mapping registered for
// MISSING faults (a vCPU's or device thread's access to a page the memfd lacks blocks until the
// page is placed), the faults read as page indexes of that memory, pages placed with UFFDIO_COPY
// or UFFDIO_ZEROPAGE. JavaScript names pages, never addresses: every range is checked here against
// the registered memory, which the handle keeps mapped, so nothing outside guest RAM is reachable.
// KVM's faults come from the kernel, so the fd is opened without UFFD_USER_MODE_ONLY (root).
#include "userfaultfd.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <memory>
#include <mutex>
#include <unordered_map>

#include "abi.h"
#include "errors.h"
#include "handles.h"
#include "memory.h"

namespace nodekvm {

namespace {

constexpr uint64_t kPageSize = 4096;
const unsigned long kUffdApi = AbiRequest("UFFDIO_API");
const unsigned long kUffdRegister = AbiRequest("UFFDIO_REGISTER");
const unsigned long kUffdUnregister = AbiRequest("UFFDIO_UNREGISTER");
const unsigned long kUffdCopy = AbiRequest("UFFDIO_COPY");
const unsigned long kUffdZeropage = AbiRequest("UFFDIO_ZEROPAGE");
const unsigned long kUffdWake = AbiRequest("UFFDIO_WAKE");

struct Uffd {
  int fd = -1;
  std::shared_ptr<Mapping> memory;  // kept mapped while registered
  bool registered = false;
  std::mutex lock;
  ~Uffd() {
    if (registered) {
      uffdio_range range{reinterpret_cast<uint64_t>(memory->addr), memory->size};
      ioctl(fd, kUffdUnregister, &range);
    }
    if (fd >= 0) close(fd);
  }
};

std::mutex tableLock;
std::unordered_map<uint32_t, std::shared_ptr<Uffd>> table;
uint32_t nextId = 1;

std::shared_ptr<Uffd> Find(Napi::Env env, const Napi::Value& id) {
  uint32_t uffdId = HandleId(env, id, "userfaultfd");
  std::lock_guard<std::mutex> guard(tableLock);
  auto it = table.find(uffdId);
  if (it == table.end()) ThrowStateError(env, "EBADF", "Userfaultfd handle is closed");
  return it->second;
}

// Reads [firstPage, firstPage + pageCount) from the arguments and checks it lies in the memory.
void PageRange(Napi::Env env, const Uffd& uffd, const Napi::Value& first, uint64_t pageCount, uint64_t* start) {
  uint64_t firstPage = ReadU64(env, first, "firstPage");
  uint64_t pages = uffd.memory->size / kPageSize;
  if (pageCount == 0 || firstPage > pages || pageCount > pages - firstPage) {
    ThrowOutOfRangeError(env, "pages " + std::to_string(firstPage) + "+" + std::to_string(pageCount) + " lie outside guest memory of " +
                                  std::to_string(pages) + " pages");
  }
  *start = reinterpret_cast<uint64_t>(uffd.memory->addr) + firstPage * kPageSize;
}

}  // namespace

// uffdOpen(memoryId) -> [id, fd]: a non-blocking userfaultfd with the whole guest memory
// registered for MISSING faults. The fd is for watching readiness only.
Napi::Value UffdOpen(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto memory = FindMemory(env, info[0]);
  auto uffd = std::make_shared<Uffd>();
  uffd->memory = memory;
  uffd->fd = static_cast<int>(syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK));
  if (uffd->fd < 0) ThrowSyscallError(env, errno, "userfaultfd");
  uffdio_api api{};
  api.api = UFFD_API;
  if (ioctl(uffd->fd, kUffdApi, &api) < 0) ThrowSyscallError(env, errno, "ioctl(UFFDIO_API)");
  uffdio_register reg{};
  reg.range.start = reinterpret_cast<uint64_t>(memory->addr);
  reg.range.len = memory->size;
  reg.mode = UFFDIO_REGISTER_MODE_MISSING;
  if (ioctl(uffd->fd, kUffdRegister, &reg) < 0) ThrowSyscallError(env, errno, "ioctl(UFFDIO_REGISTER)");
  uffd->registered = true;
  const uint64_t needed = (1ull << _UFFDIO_COPY) | (1ull << _UFFDIO_ZEROPAGE) | (1ull << _UFFDIO_WAKE);
  if ((reg.ioctls & needed) != needed) ThrowSyscallError(env, EOPNOTSUPP, "ioctl(UFFDIO_REGISTER): no COPY/ZEROPAGE/WAKE for this memory");
  uint32_t id;
  {
    std::lock_guard<std::mutex> guard(tableLock);
    id = nextId++;
    table.emplace(id, uffd);
  }
  Napi::Array result = Napi::Array::New(env, 2);
  result.Set(0u, Napi::Number::New(env, id));
  result.Set(1u, Napi::Number::New(env, uffd->fd));
  return result;
}

// uffdReadFaults(id, out: Float64Array) -> count: the page indexes of the pending page faults (as
// many as fit), without waiting. Other events (none are enabled) are skipped.
Napi::Value UffdReadFaults(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto uffd = Find(env, info[0]);
  if (!info[1].IsTypedArray() || info[1].As<Napi::TypedArray>().TypedArrayType() != napi_float64_array) {
    ThrowTypeError(env, "out must be a Float64Array");
  }
  Napi::Float64Array out = info[1].As<Napi::Float64Array>();
  size_t capacity = std::min<size_t>(out.ElementLength(), 256);
  uffd_msg msgs[256];
  size_t count = 0;
  uint64_t base = reinterpret_cast<uint64_t>(uffd->memory->addr);
  while (count < capacity) {
    ssize_t got = read(uffd->fd, msgs, (capacity - count) * sizeof(uffd_msg));
    if (got < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN) break;
      ThrowSyscallError(env, errno, "read(userfaultfd)");
    }
    size_t n = static_cast<size_t>(got) / sizeof(uffd_msg);
    if (n == 0) break;
    for (size_t i = 0; i < n; i++) {
      if (msgs[i].event != UFFD_EVENT_PAGEFAULT) continue;
      uint64_t address = msgs[i].arg.pagefault.address;
      if (address < base || address - base >= uffd->memory->size) continue;
      out[count++] = static_cast<double>((address - base) / kPageSize);
    }
  }
  return Napi::Number::New(env, static_cast<double>(count));
}

// uffdCopy(id, firstPage, data) -> pages placed: `data` (whole pages) into the missing pages from
// firstPage on, waking whoever waits on them. A page already there (EEXIST) is left as it is.
Napi::Value UffdCopy(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto uffd = Find(env, info[0]);
  if (!info[2].IsTypedArray() || info[2].As<Napi::TypedArray>().TypedArrayType() != napi_uint8_array) ThrowTypeError(env, "data must be a Uint8Array");
  Napi::Uint8Array data = info[2].As<Napi::Uint8Array>();
  size_t bytes = data.ByteLength();
  if (bytes == 0 || bytes % kPageSize) ThrowInvalidValueError(env, "data must be a positive whole number of pages");
  uint64_t start;
  PageRange(env, *uffd, info[1], bytes / kPageSize, &start);
  const uint8_t* src = data.Data();
  uint64_t done = 0;
  uint64_t placed = 0;
  while (done < bytes) {
    uffdio_copy copy{};
    copy.dst = start + done;
    copy.src = reinterpret_cast<uint64_t>(src + done);
    copy.len = bytes - done;
    int result = ioctl(uffd->fd, kUffdCopy, &copy);
    int err = result < 0 ? errno : 0;
    if (copy.copy > 0) {
      done += static_cast<uint64_t>(copy.copy);
      placed += static_cast<uint64_t>(copy.copy);
      continue;
    }
    if (err == EAGAIN || err == EINTR) continue;
    if (err == EEXIST || copy.copy == -EEXIST) {
      // This page is there already: wake anyone who faulted on it and go on with the next.
      uffdio_range range{start + done, kPageSize};
      ioctl(uffd->fd, kUffdWake, &range);
      done += kPageSize;
      continue;
    }
    ThrowSyscallError(env, err != 0 ? err : static_cast<int>(-copy.copy), "ioctl(UFFDIO_COPY)");
  }
  return Napi::Number::New(env, static_cast<double>(placed / kPageSize));
}

// uffdZero(id, firstPage, pageCount) -> pages placed: zero pages, as uffdCopy.
Napi::Value UffdZero(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto uffd = Find(env, info[0]);
  uint64_t pageCount = ReadU64(env, info[2], "pageCount");
  uint64_t start;
  PageRange(env, *uffd, info[1], pageCount, &start);
  uint64_t bytes = pageCount * kPageSize;
  uint64_t done = 0;
  uint64_t placed = 0;
  while (done < bytes) {
    uffdio_zeropage zero{};
    zero.range.start = start + done;
    zero.range.len = bytes - done;
    int result = ioctl(uffd->fd, kUffdZeropage, &zero);
    int err = result < 0 ? errno : 0;
    if (zero.zeropage > 0) {
      done += static_cast<uint64_t>(zero.zeropage);
      placed += static_cast<uint64_t>(zero.zeropage);
      continue;
    }
    if (err == EAGAIN || err == EINTR) continue;
    if (err == EEXIST || zero.zeropage == -EEXIST) {
      uffdio_range range{start + done, kPageSize};
      ioctl(uffd->fd, kUffdWake, &range);
      done += kPageSize;
      continue;
    }
    ThrowSyscallError(env, err != 0 ? err : static_cast<int>(-zero.zeropage), "ioctl(UFFDIO_ZEROPAGE)");
  }
  return Napi::Number::New(env, static_cast<double>(placed / kPageSize));
}

// uffdWake(id, firstPage, pageCount): wakes threads waiting on faults in those pages.
Napi::Value UffdWake(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto uffd = Find(env, info[0]);
  uint64_t pageCount = ReadU64(env, info[2], "pageCount");
  uint64_t start;
  PageRange(env, *uffd, info[1], pageCount, &start);
  uffdio_range range{start, pageCount * kPageSize};
  if (ioctl(uffd->fd, kUffdWake, &range) < 0) ThrowSyscallError(env, errno, "ioctl(UFFDIO_WAKE)");
  return env.Undefined();
}

// uffdClose(id): unregisters the memory (faults are then served by the memfd as usual: waiters
// are woken and retry) and closes the fd. A second call does nothing.
Napi::Value UffdClose(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint32_t uffdId = HandleId(env, info[0], "userfaultfd");
  std::shared_ptr<Uffd> dropped;
  {
    std::lock_guard<std::mutex> guard(tableLock);
    auto it = table.find(uffdId);
    if (it == table.end()) return env.Undefined();
    dropped = std::move(it->second);
    table.erase(it);
  }
  return env.Undefined();
}

}  // namespace nodekvm
