// Errors thrown by the addon, each with a string `code`. A failed syscall becomes the KvmError
// class that the TypeScript layer registers at load time (see setErrorClass in addon.cc), shaped
// like Node's own system errors: code ('EINVAL'), errno (negative), syscall ('ioctl(KVM_CREATE_VCPU)').
#pragma once

#include <napi.h>

#include <climits>
#include <string>

namespace nodekvm {

// Throws a KvmError for `err` (a positive errno) raised by `syscall`.
[[noreturn]] void ThrowSyscallError(Napi::Env env, int err, const std::string& syscall);

// Argument errors carry the codes Node gives its own (and lib/kvm/errors.ts's ErrorCode names).
[[noreturn]] inline void ThrowWithCode(Napi::Error error, const char* code) {
  error.Set("code", Napi::String::New(error.Env(), code));
  throw error;
}

// An argument of the wrong type: a TypeError, code ERR_INVALID_ARG_TYPE.
[[noreturn]] inline void ThrowTypeError(Napi::Env env, const std::string& message) {
  ThrowWithCode(Napi::TypeError::New(env, message), "ERR_INVALID_ARG_TYPE");
}

// A number that is not an integer or lies outside its bounds: a RangeError, code ERR_OUT_OF_RANGE.
[[noreturn]] inline void ThrowOutOfRangeError(Napi::Env env, const std::string& message) {
  ThrowWithCode(Napi::RangeError::New(env, message), "ERR_OUT_OF_RANGE");
}

// Any other refused value (misaligned, a buffer of the wrong size, an unknown name or flag, a slot
// that does not exist): a RangeError, code ERR_INVALID_ARG_VALUE.
[[noreturn]] inline void ThrowInvalidValueError(Napi::Env env, const std::string& message) {
  ThrowWithCode(Napi::RangeError::New(env, message), "ERR_INVALID_ARG_VALUE");
}

// An fd argument: a number that is an int and not negative (else ERR_INVALID_ARG_TYPE or
// ERR_OUT_OF_RANGE).
inline int FdArg(Napi::Env env, const Napi::Value& value) {
  if (!value.IsNumber()) ThrowTypeError(env, "fd must be a number");
  double fdNumber = value.As<Napi::Number>().DoubleValue();
  if (!(fdNumber >= 0 && fdNumber <= INT_MAX) || fdNumber != static_cast<double>(static_cast<int>(fdNumber))) {
    ThrowOutOfRangeError(env, "fd must be an integer 0..2^31-1");
  }
  return static_cast<int>(fdNumber);
}

// Handle misuse that is not a syscall failure: closed handles, wrong thread.
[[noreturn]] void ThrowStateError(Napi::Env env, const std::string& code, const std::string& message);

}  // namespace nodekvm
