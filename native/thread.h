#pragma once
#include <napi.h>
namespace nodekvm {
// The calling thread's name (as shown in /proc/<pid>/task/*/comm) and CPU affinity: a vCPU is a
// Linux thread, named and pinned like any other.
Napi::Value SetThreadName(const Napi::CallbackInfo& info);
Napi::Value SetThreadAffinity(const Napi::CallbackInfo& info);
Napi::Value SetThreadBatch(const Napi::CallbackInfo& info);
}  // namespace nodekvm
