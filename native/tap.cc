#include "tap.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <sched.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <cmath>
#include <string>
#include <thread>

#include "errors.h"

namespace nodekvm {

namespace {

// struct virtio_net_hdr_v1 (virtio 1.x 5.1.6): the 10-byte legacy header and num_buffers.
constexpr int kVnetHeaderBytes = 12;

struct TapResult {
  int fd = -1;
  int err = 0;
  const char* syscall = "";
  std::string name;
};

// Sets what every TAP we serve needs: the 12-byte header, no offloads (none is negotiated with
// the guest, so the kernel must hand us only whole, checksummed frames), non-blocking reads.
bool ConfigureTap(int fd, TapResult& result) {
  int headerBytes = kVnetHeaderBytes;
  if (ioctl(fd, TUNSETVNETHDRSZ, &headerBytes) < 0) {
    result.err = errno;
    result.syscall = "ioctl(TUNSETVNETHDRSZ)";
    return false;
  }
  if (ioctl(fd, TUNSETOFFLOAD, 0UL) < 0) {
    result.err = errno;
    result.syscall = "ioctl(TUNSETOFFLOAD)";
    return false;
  }
  int flags = fcntl(fd, F_GETFL);
  if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0) {
    result.err = errno;
    result.syscall = "fcntl(F_SETFL)";
    return false;
  }
  return true;
}

// Opens /dev/net/tun and attaches it to the TAP `name` (created if it does not exist; "" lets
// the kernel pick tapN) in the calling thread's network namespace.
TapResult OpenTap(const std::string& name) {
  TapResult result;
  int fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) {
    result.err = errno;
    result.syscall = "open(/dev/net/tun)";
    return result;
  }
  struct ifreq request;
  memset(&request, 0, sizeof(request));
  request.ifr_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
  memcpy(request.ifr_name, name.data(), name.size());
  if (ioctl(fd, TUNSETIFF, &request) < 0) {
    result.err = errno;
    result.syscall = "ioctl(TUNSETIFF)";
    close(fd);
    return result;
  }
  if (!ConfigureTap(fd, result)) {
    close(fd);
    return result;
  }
  result.fd = fd;
  result.name.assign(request.ifr_name, strnlen(request.ifr_name, IFNAMSIZ));
  return result;
}

// The same from a thread that first joins the network namespace at `netnsPath` (a file such as
// /run/netns/NAME or /proc/PID/ns/net). setns(CLONE_NEWNET) changes only the calling thread,
// and a TAP belongs to the namespace that opened /dev/net/tun, so a short-lived thread serves:
// the VMM's own threads never leave their namespace.
TapResult OpenTapIn(const std::string& netnsPath, const std::string& name) {
  TapResult result;
  std::thread worker([&]() {
    int ns = open(netnsPath.c_str(), O_RDONLY | O_CLOEXEC);
    if (ns < 0) {
      result.err = errno;
      result.syscall = "open(netns)";
      return;
    }
    int joined = setns(ns, CLONE_NEWNET);
    int setnsErrno = errno;
    close(ns);
    if (joined < 0) {
      result.err = setnsErrno;
      result.syscall = "setns(CLONE_NEWNET)";
      return;
    }
    result = OpenTap(name);
  });
  worker.join();
  return result;
}

int FdArgument(const Napi::CallbackInfo& info, size_t index) {
  Napi::Env env = info.Env();
  if (!info[index].IsNumber()) ThrowTypeError(env, "fd must be a number");
  double fd = info[index].As<Napi::Number>().DoubleValue();
  if (!(fd >= 0 && fd <= 0x7fffffff) || fd != std::floor(fd)) ThrowOutOfRangeError(env, "fd must be a non-negative integer");
  return static_cast<int>(fd);
}

}  // namespace

// tapOpen(name, netnsPath | null) -> [fd, name]: a non-blocking, close-on-exec fd on the TAP
// `name` with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, a 12-byte vnet header and no offloads.
Napi::Value TapOpen(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsString()) ThrowTypeError(env, "name must be a string");
  std::string name = info[0].As<Napi::String>().Utf8Value();
  if (name.size() >= IFNAMSIZ || name.find('\0') != std::string::npos || name.find('/') != std::string::npos) {
    ThrowInvalidValueError(env, "an interface name is at most 15 bytes, without NUL or '/'");
  }
  bool inNamespace = !info[1].IsUndefined() && !info[1].IsNull();
  if (inNamespace && !info[1].IsString()) ThrowTypeError(env, "netnsPath must be a string or null");
  TapResult result = inNamespace ? OpenTapIn(info[1].As<Napi::String>().Utf8Value(), name) : OpenTap(name);
  if (result.fd < 0) ThrowSyscallError(env, result.err, result.syscall);
  Napi::Array out = Napi::Array::New(env, 2);
  out.Set(0u, Napi::Number::New(env, result.fd));
  out.Set(1u, Napi::String::New(env, result.name));
  return out;
}

// tapAdopt(fd) -> [fd, name]: takes an fd some other process opened on a TAP (a privileged helper
// handing it over). Checks it is a TAP with IFF_VNET_HDR and without packet information, sets it
// up as tapOpen does, and returns a close-on-exec duplicate: the caller keeps its own fd.
Napi::Value TapAdopt(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = FdArgument(info, 0);
  struct ifreq request;
  memset(&request, 0, sizeof(request));
  if (ioctl(fd, TUNGETIFF, &request) < 0) ThrowSyscallError(env, errno, "ioctl(TUNGETIFF)");
  int flags = request.ifr_flags;
  if ((flags & (IFF_TUN | IFF_TAP)) != IFF_TAP) ThrowInvalidValueError(env, "fd is a TUN device, not a TAP");
  if (!(flags & IFF_NO_PI)) ThrowInvalidValueError(env, "the TAP fd must be opened with IFF_NO_PI");
  if (!(flags & IFF_VNET_HDR)) ThrowInvalidValueError(env, "the TAP fd must be opened with IFF_VNET_HDR");
  int copy = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (copy < 0) ThrowSyscallError(env, errno, "fcntl(F_DUPFD_CLOEXEC)");
  TapResult result;
  if (!ConfigureTap(copy, result)) {
    close(copy);
    ThrowSyscallError(env, result.err, result.syscall);
  }
  Napi::Array out = Napi::Array::New(env, 2);
  out.Set(0u, Napi::Number::New(env, copy));
  out.Set(1u, Napi::String::New(env, std::string(request.ifr_name, strnlen(request.ifr_name, IFNAMSIZ))));
  return out;
}

}  // namespace nodekvm
