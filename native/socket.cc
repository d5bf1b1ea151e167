#include "socket.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <cstring>
#include <vector>

#include "errors.h"

namespace nodekvm {

// setSocketBuffers(fd, sendBytes, receiveBytes) -> [sendBytes, receiveBytes] as the kernel set
// them (Linux doubles the value asked for, capped at net.core.{w,r}mem_max). Node offers no way to
// size a stream socket's buffers; a migration wants megabytes in flight, so that the sender keeps
// sending while the receiver copies a section into guest RAM. 0 leaves a direction as it is.
Napi::Value SetSocketBuffers(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsNumber() || !info[1].IsNumber() || !info[2].IsNumber()) ThrowTypeError(env, "fd, sendBytes and receiveBytes must be numbers");
  double fdValue = info[0].As<Napi::Number>().DoubleValue();
  if (!(fdValue >= 0 && fdValue <= 0x7fffffff) || fdValue != static_cast<int>(fdValue)) ThrowOutOfRangeError(env, "fd must be a non-negative integer");
  int fd = static_cast<int>(fdValue);
  int sizes[2];
  for (int i = 0; i < 2; i++) {
    double bytes = info[1 + i].As<Napi::Number>().DoubleValue();
    if (!(bytes >= 0 && bytes <= 0x7fffffff) || bytes != static_cast<int>(bytes)) ThrowOutOfRangeError(env, "buffer sizes must be integers 0..2^31-1");
    sizes[i] = static_cast<int>(bytes);
  }
  int type = 0;
  socklen_t typeLength = sizeof(type);
  if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &typeLength) < 0) ThrowSyscallError(env, errno, "getsockopt(SO_TYPE)");
  const int options[2] = {SO_SNDBUF, SO_RCVBUF};
  const char* names[2] = {"setsockopt(SO_SNDBUF)", "setsockopt(SO_RCVBUF)"};
  Napi::Array result = Napi::Array::New(env, 2);
  for (int i = 0; i < 2; i++) {
    int value = sizes[i];
    if (value > 0 && setsockopt(fd, SOL_SOCKET, options[i], &value, sizeof(value)) < 0) ThrowSyscallError(env, errno, names[i]);
    int actual = 0;
    socklen_t length = sizeof(actual);
    if (getsockopt(fd, SOL_SOCKET, options[i], &actual, &length) < 0) ThrowSyscallError(env, errno, "getsockopt");
    result.Set(i, Napi::Number::New(env, actual));
  }
  return result;
}

// keepFromChildren(buffer: ArrayBuffer): the whole pages of `buffer` are left out of the
// processes this one forks (MADV_DONTFORK). Node forks for every child process it spawns, and a
// page the parent then writes is copied first (a copy-on-write fault), page by page: a migration
// source's section buffers cost 2,000 such faults per 8 MiB after each spawn. A child that execs
// at once never touches them. Best effort: returns false if the kernel refused.
Napi::Value KeepFromChildren(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsArrayBuffer()) ThrowTypeError(env, "buffer must be an ArrayBuffer");
  Napi::ArrayBuffer buffer = info[0].As<Napi::ArrayBuffer>();
  const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  uintptr_t start = reinterpret_cast<uintptr_t>(buffer.Data());
  uintptr_t end = start + buffer.ByteLength();
  start = (start + page - 1) & ~(page - 1);
  end &= ~(page - 1);
  if (end <= start) return Napi::Boolean::New(env, true);
  return Napi::Boolean::New(env, madvise(reinterpret_cast<void*>(start), end - start, MADV_DONTFORK) == 0);
}

// dupSocket(fd) -> a new fd (close-on-exec) for the same stream socket. Lets a connection that
// Node accepted be handed to a new net.Socket with options the server cannot give its sockets
// (a read buffer of the caller's size), once the old one, idle, is destroyed.
Napi::Value DupSocket(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsNumber()) ThrowTypeError(env, "fd must be a number");
  double fdValue = info[0].As<Napi::Number>().DoubleValue();
  if (!(fdValue >= 0 && fdValue <= 0x7fffffff) || fdValue != static_cast<int>(fdValue)) ThrowOutOfRangeError(env, "fd must be a non-negative integer");
  int fd = static_cast<int>(fdValue);
  int type = 0;
  socklen_t typeLength = sizeof(type);
  if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &typeLength) < 0) ThrowSyscallError(env, errno, "getsockopt(SO_TYPE)");
  if (type != SOCK_STREAM) ThrowInvalidValueError(env, "fd is not a stream socket");
  int copy = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (copy < 0) ThrowSyscallError(env, errno, "fcntl(F_DUPFD_CLOEXEC)");
  return Napi::Number::New(env, copy);
}

// spinRead(fd, buffer, maxMs) -> bytes read into `buffer` (> 0), 0 at the end of the stream, -1 if
// nothing came within maxMs. Polls the socket with this thread spinning (recv with MSG_DONTWAIT),
// never sleeping: for the moments a peer is known to be about to send, since a thread woken from
// a wait takes 0.1-0.3 ms to run again on this kind of host, and then runs on cold caches.
// A failure other than EAGAIN throws.
Napi::Value SpinRead(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsNumber()) ThrowTypeError(env, "fd must be a number");
  double fdValue = info[0].As<Napi::Number>().DoubleValue();
  if (!(fdValue >= 0 && fdValue <= 0x7fffffff) || fdValue != static_cast<int>(fdValue)) ThrowOutOfRangeError(env, "fd must be a non-negative integer");
  if (!info[1].IsTypedArray() || info[1].As<Napi::TypedArray>().TypedArrayType() != napi_uint8_array) ThrowTypeError(env, "buffer must be a Uint8Array");
  if (!info[2].IsNumber()) ThrowTypeError(env, "maxMs must be a number");
  double maxMs = info[2].As<Napi::Number>().DoubleValue();
  if (!(maxMs >= 0 && maxMs <= 1000)) ThrowOutOfRangeError(env, "maxMs must be 0..1000");
  Napi::Uint8Array buffer = info[1].As<Napi::Uint8Array>();
  if (buffer.ByteLength() == 0) ThrowOutOfRangeError(env, "buffer must not be empty");
  int fd = static_cast<int>(fdValue);
  timespec now;
  clock_gettime(CLOCK_MONOTONIC, &now);
  const double deadline = now.tv_sec * 1e3 + now.tv_nsec / 1e6 + maxMs;
  for (unsigned polls = 0;; polls++) {
    ssize_t got = recv(fd, buffer.Data(), buffer.ByteLength(), MSG_DONTWAIT);
    if (got >= 0) return Napi::Number::New(env, static_cast<double>(got));
    if (errno == EINTR) continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK) ThrowSyscallError(env, errno, "recv");
    // The clock only every few polls: a recv that finds nothing costs about as much as reading it.
    if ((polls & 7) == 7) {
      clock_gettime(CLOCK_MONOTONIC, &now);
      if (now.tv_sec * 1e3 + now.tv_nsec / 1e6 >= deadline) return Napi::Number::New(env, -1);
    }
    __builtin_ia32_pause();
  }
}

namespace {

// The kernel's limit on file descriptors in one SCM_RIGHTS message (SCM_MAX_FD).
constexpr size_t kMaxPassedFds = 253;
// How long a send waits for room in a full socket buffer before giving up.
constexpr int kSendWaitMs = 5000;

int ReadFd(Napi::Env env, const Napi::Value& value, const char* name) {
  if (!value.IsNumber()) ThrowTypeError(env, std::string(name) + " must be a number");
  double number = value.As<Napi::Number>().DoubleValue();
  if (!(number >= 0 && number <= 0x7fffffff) || number != static_cast<int>(number)) {
    ThrowOutOfRangeError(env, std::string(name) + " must be a non-negative integer");
  }
  return static_cast<int>(number);
}

// Only a stream socket of the unix domain carries file descriptors (and says the peer is on this host).
void CheckUnixStream(Napi::Env env, int fd) {
  int domain = 0, type = 0;
  socklen_t length = sizeof(domain);
  if (getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &length) < 0) ThrowSyscallError(env, errno, "getsockopt(SO_DOMAIN)");
  length = sizeof(type);
  if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &length) < 0) ThrowSyscallError(env, errno, "getsockopt(SO_TYPE)");
  if (domain != AF_UNIX || type != SOCK_STREAM) ThrowInvalidValueError(env, "fd is not a unix stream socket");
}

}  // namespace

// sendWithFds(socketFd, data, fds) -> undefined: `data` (a Uint8Array, at least one byte) with
// the file descriptors `fds` attached (SCM_RIGHTS) to its first byte, all of it written before it
// returns. The socket may be non-blocking (one Node owns): a full buffer is waited out with
// poll(2), for a few seconds at most. Node's own writes must be finished (nothing queued), or
// the bytes would interleave.
Napi::Value SendWithFds(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int socketFd = ReadFd(env, info[0], "socketFd");
  if (!info[1].IsTypedArray() || info[1].As<Napi::TypedArray>().TypedArrayType() != napi_uint8_array) ThrowTypeError(env, "data must be a Uint8Array");
  if (!info[2].IsArray()) ThrowTypeError(env, "fds must be an array of file descriptors");
  auto data = info[1].As<Napi::Uint8Array>();
  auto list = info[2].As<Napi::Array>();
  if (data.ByteLength() == 0) ThrowInvalidValueError(env, "data must hold at least one byte (file descriptors ride on a byte)");
  if (list.Length() > kMaxPassedFds) ThrowOutOfRangeError(env, "at most 253 file descriptors per message");
  std::vector<int> fds(list.Length());
  for (uint32_t i = 0; i < list.Length(); i++) fds[i] = ReadFd(env, list.Get(i), "fds[i]");
  CheckUnixStream(env, socketFd);

  // Copied: the bytes must not move under sendmsg, and a JavaScript view could.
  std::vector<uint8_t> bytes(data.Data(), data.Data() + data.ByteLength());
  size_t sent = 0;
  bool fdsSent = fds.empty();
  std::vector<uint8_t> control(CMSG_SPACE(sizeof(int) * (fds.empty() ? 1 : fds.size())));
  while (sent < bytes.size()) {
    struct iovec iov = {bytes.data() + sent, bytes.size() - sent};
    struct msghdr message = {};
    message.msg_iov = &iov;
    message.msg_iovlen = 1;
    if (!fdsSent) {
      std::memset(control.data(), 0, control.size());
      message.msg_control = control.data();
      message.msg_controllen = CMSG_SPACE(sizeof(int) * fds.size());
      struct cmsghdr* header = CMSG_FIRSTHDR(&message);
      header->cmsg_level = SOL_SOCKET;
      header->cmsg_type = SCM_RIGHTS;
      header->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
      std::memcpy(CMSG_DATA(header), fds.data(), sizeof(int) * fds.size());
    }
    ssize_t written = sendmsg(socketFd, &message, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (written < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) {
        struct pollfd wait = {socketFd, POLLOUT, 0};
        int ready = poll(&wait, 1, kSendWaitMs);
        if (ready < 0 && errno != EINTR) ThrowSyscallError(env, errno, "poll");
        if (ready == 0) ThrowSyscallError(env, ETIMEDOUT, "sendmsg");
        continue;
      }
      ThrowSyscallError(env, errno, "sendmsg");
    }
    sent += static_cast<size_t>(written);
    fdsSent = true;
  }
  return env.Undefined();
}

// receiveWithFds(socketFd, maxBytes, maxFds) -> [bytes, fds, fdsDropped] or null when nothing
// is there yet (the socket is non-blocking): one recvmsg(2) of at most `maxBytes`. The kernel
// never returns the bytes of two messages carrying file descriptors in one read, so `fds` are
// those attached to the bytes read. Received descriptors are close-on-exec and the caller's to
// close, all of them, whatever it then decides. Beyond `maxFds` they are closed here and
// `fdsDropped` is true (so is it when the kernel had to drop some: MSG_CTRUNC). Bytes of length 0:
// the peer closed the connection.
Napi::Value ReceiveWithFds(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int socketFd = ReadFd(env, info[0], "socketFd");
  if (!info[1].IsNumber() || !info[2].IsNumber()) ThrowTypeError(env, "maxBytes and maxFds must be numbers");
  double maxBytes = info[1].As<Napi::Number>().DoubleValue();
  double maxFds = info[2].As<Napi::Number>().DoubleValue();
  if (!(maxBytes >= 1 && maxBytes <= 16 * 1024 * 1024) || maxBytes != static_cast<int>(maxBytes)) ThrowOutOfRangeError(env, "maxBytes must be an integer 1..16 MiB");
  if (!(maxFds >= 0 && maxFds <= kMaxPassedFds) || maxFds != static_cast<int>(maxFds)) ThrowOutOfRangeError(env, "maxFds must be an integer 0..253");
  CheckUnixStream(env, socketFd);

  std::vector<uint8_t> bytes(static_cast<size_t>(maxBytes));
  // Room for as many as one message may carry, so that none is lost to a short buffer.
  std::vector<uint8_t> control(CMSG_SPACE(sizeof(int) * kMaxPassedFds));
  struct iovec iov = {bytes.data(), bytes.size()};
  struct msghdr message = {};
  message.msg_iov = &iov;
  message.msg_iovlen = 1;
  message.msg_control = control.data();
  message.msg_controllen = control.size();
  ssize_t got;
  do {
    got = recvmsg(socketFd, &message, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
  } while (got < 0 && errno == EINTR);
  if (got < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK) return env.Null();
    ThrowSyscallError(env, errno, "recvmsg");
  }
  std::vector<int> fds;
  bool dropped = (message.msg_flags & MSG_CTRUNC) != 0;
  for (struct cmsghdr* header = CMSG_FIRSTHDR(&message); header != nullptr; header = CMSG_NXTHDR(&message, header)) {
    if (header->cmsg_level != SOL_SOCKET || header->cmsg_type != SCM_RIGHTS) continue;
    size_t count = (header->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    const uint8_t* data = CMSG_DATA(header);
    for (size_t i = 0; i < count; i++) {
      int fd;
      std::memcpy(&fd, data + i * sizeof(int), sizeof(int));
      if (fds.size() < static_cast<size_t>(maxFds)) {
        fds.push_back(fd);
      } else {
        close(fd);
        dropped = true;
      }
    }
  }
  Napi::Array result = Napi::Array::New(env, 3);
  result.Set(0u, Napi::Buffer<uint8_t>::Copy(env, bytes.data(), static_cast<size_t>(got)));
  Napi::Array list = Napi::Array::New(env, fds.size());
  for (size_t i = 0; i < fds.size(); i++) list.Set(static_cast<uint32_t>(i), Napi::Number::New(env, fds[i]));
  result.Set(1u, list);
  result.Set(2u, Napi::Boolean::New(env, dropped));
  return result;
}

}  // namespace nodekvm
