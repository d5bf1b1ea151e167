// Blocking work on a thread of libuv's pool, its caller handed a promise: resolved with undefined,
// or rejected with the KvmError of the syscall the work recorded as failed (Fail()).
#pragma once

#include <napi.h>

#include "errors.h"

namespace nodekvm {

class PromiseWorker : public Napi::AsyncWorker {
 public:
  // Queues `worker` (which deletes itself once settled) and returns its promise.
  static Napi::Promise Start(PromiseWorker* worker) {
    Napi::Promise promise = worker->deferred_.Promise();
    worker->Queue();
    return promise;
  }

 protected:
  explicit PromiseWorker(Napi::Env env) : Napi::AsyncWorker(env), deferred_(Napi::Promise::Deferred::New(env)) {}

  // From Execute(): `syscall` failed with `err` (a positive errno).
  void Fail(const char* syscall, int err) {
    failedSyscall_ = syscall;
    err_ = err;
  }

  void OnOK() override {
    if (failedSyscall_ == nullptr) {
      deferred_.Resolve(Env().Undefined());
      return;
    }
    try {
      ThrowSyscallError(Env(), err_, failedSyscall_);
    } catch (const Napi::Error& error) {
      deferred_.Reject(error.Value());
    }
  }

 private:
  Napi::Promise::Deferred deferred_;
  const char* failedSyscall_ = nullptr;
  int err_ = 0;
};

}  // namespace nodekvm
