// Errors thrown by the addon. A failed syscall becomes the KvmError class that the TypeScript
// layer registers at load time (see setErrorClass in addon.cc), shaped like Node's own system
// errors: code ('EINVAL'), errno (negative), syscall ('ioctl(KVM_CREATE_VCPU)').
#pragma once

#include <napi.h>

#include <string>

namespace nodekvm {

// Throws a KvmError for `err` (a positive errno) raised by `syscall`.
[[noreturn]] void ThrowSyscallError(Napi::Env env, int err, const std::string& syscall);

[[noreturn]] inline void ThrowTypeError(Napi::Env env, const std::string& message) {
  throw Napi::TypeError::New(env, message);
}

[[noreturn]] inline void ThrowRangeError(Napi::Env env, const std::string& message) {
  throw Napi::RangeError::New(env, message);
}

// Handle misuse that is not a syscall failure: closed handles, wrong thread.
[[noreturn]] void ThrowStateError(Napi::Env env, const std::string& code, const std::string& message);

}  // namespace nodekvm
