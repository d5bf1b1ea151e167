// The system handle: /dev/kvm. Opening it and creating VMs; its other ioctls are in ioctl.cc.
#include "kvm.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "abi.h"
#include "errors.h"
#include "handles.h"

namespace nodekvm {

namespace {
const unsigned long kGetApiVersion = AbiRequest("KVM_GET_API_VERSION");
const unsigned long kGetVcpuMmapSize = AbiRequest("KVM_GET_VCPU_MMAP_SIZE");
const unsigned long kCreateVm = AbiRequest("KVM_CREATE_VM");
}  // namespace

Napi::Value OpenSystem(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsString()) ThrowTypeError(env, "path must be a string");
  std::string path = info[0].As<Napi::String>().Utf8Value();
  if (path.find('\0') != std::string::npos) ThrowTypeError(env, "path must not contain NUL bytes");
  int fd = open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) ThrowSyscallError(env, errno, "open(" + path + ")");
  int version = ioctl(fd, kGetApiVersion, 0);
  if (version < 0) {
    int err = errno;
    close(fd);
    ThrowSyscallError(env, err, "ioctl(KVM_GET_API_VERSION)");
  }
  auto state = std::make_shared<SystemState>();
  state->fd = fd;
  return Napi::Number::New(env, Handles::AddSystem(std::move(state), env));
}

Napi::Value CreateVm(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto system = Handles::System(env, info[0]);
  if (!info[1].IsNumber()) ThrowTypeError(env, "type must be a number");
  double type = info[1].As<Napi::Number>().DoubleValue();
  if (!(type >= 0 && type <= 255) || type != static_cast<int>(type)) ThrowOutOfRangeError(env, "type must be an integer 0..255");
  std::shared_lock<std::shared_mutex> hold(system->lock);
  if (system->closed) ThrowStateError(env, "EBADF", "Kvm handle is closed");
  int mmapSize = ioctl(system->fd, kGetVcpuMmapSize, 0);
  if (mmapSize < 0) ThrowSyscallError(env, errno, "ioctl(KVM_GET_VCPU_MMAP_SIZE)");
  int fd;
  do {
    fd = ioctl(system->fd, kCreateVm, static_cast<unsigned long>(type));
  } while (fd < 0 && errno == EINTR);
  if (fd < 0) ThrowSyscallError(env, errno, "ioctl(KVM_CREATE_VM)");
  fcntl(fd, F_SETFD, FD_CLOEXEC);
  auto state = std::make_shared<VmState>();
  state->fd = fd;
  state->vcpuMmapSize = mmapSize;
  uint32_t id = Handles::AddVm(std::move(state), env);
  Napi::Array result = Napi::Array::New(env, 2);
  result.Set(0u, Napi::Number::New(env, id));
  result.Set(1u, Napi::Number::New(env, fd));
  return result;
}

Napi::Value CloseSystemHandle(const Napi::CallbackInfo& info) {
  uint32_t id = HandleId(info.Env(), info[0], "kvm");
  auto state = Handles::RemoveSystem(id);
  if (state) CloseSystem(state);
  return info.Env().Undefined();
}

}  // namespace nodekvm
