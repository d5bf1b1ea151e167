#pragma once
#include <napi.h>
namespace nodekvm {
Napi::Value SaveVmState(const Napi::CallbackInfo& info);
Napi::Value CheckVmState(const Napi::CallbackInfo& info);
Napi::Value RestoreVmState(const Napi::CallbackInfo& info);
}  // namespace nodekvm
