#include "socket.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/socket.h>

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

}  // namespace nodekvm
