#include "file.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/stat.h>

#include <cmath>

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

}  // namespace nodekvm
