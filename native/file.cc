#include "file.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/stat.h>

#include <unistd.h>

#include <cmath>
#include <vector>

#include "errors.h"

namespace nodekvm {

// fileDeallocate(fd, offset, length, zero) with fallocate(2), keeping the file's size: `zero`
// false punches a hole (a discard: the blocks go back to the file system and read as zeros);
// true zeroes the range (FALLOC_FL_ZERO_RANGE, blocks stay allocated). Throws a KvmError with
// code EOPNOTSUPP where the file system cannot, so the caller can fall back to writing zeros.
Napi::Value FileDeallocate(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsNumber() || !info[1].IsNumber() || !info[2].IsNumber() || !info[3].IsBoolean()) {
    ThrowTypeError(env, "fd, offset and length must be numbers, zero a boolean");
  }
  double fd = info[0].As<Napi::Number>().DoubleValue();
  double offset = info[1].As<Napi::Number>().DoubleValue();
  double length = info[2].As<Napi::Number>().DoubleValue();
  if (!(fd >= 0 && fd <= 0x7fffffff) || fd != std::floor(fd)) ThrowOutOfRangeError(env, "fd must be a non-negative integer");
  const double limit = 9007199254740991.0;  // 2^53 - 1: exact in a double
  if (!(offset >= 0 && offset <= limit) || offset != std::floor(offset)) ThrowOutOfRangeError(env, "offset must be a non-negative integer");
  if (!(length > 0 && length <= limit - offset) || length != std::floor(length)) ThrowOutOfRangeError(env, "length must be a positive integer");
  int mode = info[3].As<Napi::Boolean>().Value() ? (FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE) : (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE);
  if (fallocate(static_cast<int>(fd), mode, static_cast<off_t>(offset), static_cast<off_t>(length)) < 0) ThrowSyscallError(env, errno, "fallocate");
  return env.Undefined();
}

// fileLock(fd, kind) with an open file description lock (F_OFD_SETLK) on the whole file, as QEMU
// locks its images: 'shared' (F_RDLCK), 'exclusive' (F_WRLCK) or 'unlock'. OFD locks belong to the
// open file, not the process, so two opens in one process conflict as two processes do, and
// closing the fd releases the lock. Never waits: a conflict throws EAGAIN.
Napi::Value FileLock(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsNumber() || !info[1].IsString()) ThrowTypeError(env, "fd must be a number, kind a string");
  double fd = info[0].As<Napi::Number>().DoubleValue();
  if (!(fd >= 0 && fd <= 0x7fffffff) || fd != std::floor(fd)) ThrowOutOfRangeError(env, "fd must be a non-negative integer");
  std::string kind = info[1].As<Napi::String>().Utf8Value();
  struct flock lock = {};
  if (kind == "shared") {
    lock.l_type = F_RDLCK;
  } else if (kind == "exclusive") {
    lock.l_type = F_WRLCK;
  } else if (kind == "unlock") {
    lock.l_type = F_UNLCK;
  } else {
    ThrowInvalidValueError(env, "kind must be 'shared', 'exclusive' or 'unlock'");
  }
  lock.l_whence = SEEK_SET;
  lock.l_start = 0;
  lock.l_len = 0;  // to the end of the file, however long it grows
  if (fcntl(static_cast<int>(fd), F_OFD_SETLK, &lock) < 0) {
    // POSIX allows EACCES for a conflict too; one code for callers to test.
    ThrowSyscallError(env, errno == EACCES ? EAGAIN : errno, "fcntl(F_OFD_SETLK)");
  }
  return env.Undefined();
}

// fileDup(fd, writable) -> a close-on-exec duplicate of `fd`: the same open file description,
// and so the same OFD lock (a disk image handed over by a migration on this host keeps its
// lock). `fd` must be a regular file or a block device, open for reading, and for writing too
// if `writable`: checked here, as the fd may come from another process.
Napi::Value FileDup(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsNumber() || !info[1].IsBoolean()) ThrowTypeError(env, "fd must be a number, writable a boolean");
  double fd = info[0].As<Napi::Number>().DoubleValue();
  if (!(fd >= 0 && fd <= 0x7fffffff) || fd != std::floor(fd)) ThrowOutOfRangeError(env, "fd must be a non-negative integer");
  bool writable = info[1].As<Napi::Boolean>().Value();
  struct stat st;
  if (fstat(static_cast<int>(fd), &st) < 0) ThrowSyscallError(env, errno, "fstat");
  if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode)) ThrowInvalidValueError(env, "fd is not a regular file or a block device");
  int flags = fcntl(static_cast<int>(fd), F_GETFL);
  if (flags < 0) ThrowSyscallError(env, errno, "fcntl(F_GETFL)");
  int mode = flags & O_ACCMODE;
  if (mode == O_WRONLY || (writable && mode != O_RDWR)) {
    ThrowInvalidValueError(env, writable ? "fd is not open for reading and writing" : "fd is not open for reading");
  }
  int copy = fcntl(static_cast<int>(fd), F_DUPFD_CLOEXEC, 0);
  if (copy < 0) ThrowSyscallError(env, errno, "fcntl(F_DUPFD_CLOEXEC)");
  return Napi::Number::New(env, copy);
}

// fileDataRanges(fd, start, end) -> Float64Array of [offset, length] pairs: where the file holds
// data within [start, end) (lseek SEEK_DATA/SEEK_HOLE; holes read as zeros), rounded out to
// 4 KiB and clamped to the range. Moves the fd's file position: for fds read with positions.
Napi::Value FileDataRanges(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsNumber() || !info[1].IsNumber() || !info[2].IsNumber()) ThrowTypeError(env, "fd, start and end must be numbers");
  double fdNumber = info[0].As<Napi::Number>().DoubleValue();
  double startNumber = info[1].As<Napi::Number>().DoubleValue();
  double endNumber = info[2].As<Napi::Number>().DoubleValue();
  if (!(fdNumber >= 0 && fdNumber <= 0x7fffffff) || fdNumber != std::floor(fdNumber)) ThrowOutOfRangeError(env, "fd must be a non-negative integer");
  const double limit = 9007199254740991.0;  // 2^53 - 1: exact in a double
  if (!(startNumber >= 0 && startNumber <= limit) || startNumber != std::floor(startNumber)) ThrowOutOfRangeError(env, "start must be a non-negative integer");
  if (!(endNumber >= startNumber && endNumber <= limit) || endNumber != std::floor(endNumber)) ThrowOutOfRangeError(env, "end must be an integer from start to 2^53 - 1");
  const int fd = static_cast<int>(fdNumber);
  const off_t start = static_cast<off_t>(startNumber);
  const off_t end = static_cast<off_t>(endNumber);
  const off_t page = 4096;
  std::vector<double> pairs;
  for (off_t position = start; position < end;) {
    off_t data = lseek(fd, position, SEEK_DATA);
    if (data < 0) {
      if (errno == ENXIO) break;  // no data at or after position
      ThrowSyscallError(env, errno, "lseek(SEEK_DATA)");
    }
    if (data >= end) break;
    off_t hole = lseek(fd, data, SEEK_HOLE);
    if (hole < 0) {
      // ENXIO: the file shrank between the two calls; what is left of the range is data.
      if (errno != ENXIO) ThrowSyscallError(env, errno, "lseek(SEEK_HOLE)");
      hole = end;
    }
    off_t from = std::max(start, data - data % page);
    off_t to = std::min(end, hole % page ? hole + page - hole % page : hole);
    if (to <= from) to = std::min(end, from + page);
    if (!pairs.empty() && pairs[pairs.size() - 2] + pairs.back() >= static_cast<double>(from)) {
      pairs.back() = static_cast<double>(to) - pairs[pairs.size() - 2];
    } else {
      pairs.push_back(static_cast<double>(from));
      pairs.push_back(static_cast<double>(to - from));
    }
    position = to;
  }
  auto out = Napi::Float64Array::New(env, pairs.size());
  for (size_t i = 0; i < pairs.size(); i++) out[i] = pairs[i];
  return out;
}

// fileIdentity(fd) -> [dev: bigint, ino: bigint, size: number, regular: boolean]: fstat(2)'s
// device and inode (which file an fd is, exactly: 64-bit numbers), its size, whether it is a
// regular file. Without the Date objects fs.fstatSync() makes, which cost a restore more than the
// syscall does.
Napi::Value FileIdentity(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = FdArg(env, info[0]);
  struct stat st;
  if (fstat(fd, &st) < 0) ThrowSyscallError(env, errno, "fstat");
  auto out = Napi::Array::New(env, 4);
  out.Set(0u, Napi::BigInt::New(env, static_cast<uint64_t>(st.st_dev)));
  out.Set(1u, Napi::BigInt::New(env, static_cast<uint64_t>(st.st_ino)));
  out.Set(2u, Napi::Number::New(env, static_cast<double>(st.st_size)));
  out.Set(3u, Napi::Boolean::New(env, S_ISREG(st.st_mode)));
  return out;
}

}  // namespace nodekvm
