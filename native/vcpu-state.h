#pragma once
#include <napi.h>
namespace nodekvm {
Napi::Value SaveVcpuState(const Napi::CallbackInfo& info);
Napi::Value SaveParkedVcpuState(const Napi::CallbackInfo& info);
Napi::Value CheckVcpuState(const Napi::CallbackInfo& info);
Napi::Value RestoreVcpuState(const Napi::CallbackInfo& info);
Napi::Value RestoreParkedVcpuState(const Napi::CallbackInfo& info);
}  // namespace nodekvm
