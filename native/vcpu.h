#pragma once
#include <napi.h>
namespace nodekvm {
Napi::Value CreateVcpu(const Napi::CallbackInfo& info);
Napi::Value ReleaseVcpu(const Napi::CallbackInfo& info);
Napi::Value AdoptVcpu(const Napi::CallbackInfo& info);
Napi::Value CloseReleasedVcpu(const Napi::CallbackInfo& info);
Napi::Value Run(const Napi::CallbackInfo& info);
Napi::Value Kick(const Napi::CallbackInfo& info);
Napi::Value HarvestDirtyRing(const Napi::CallbackInfo& info);
Napi::Value CloseVcpuHandle(const Napi::CallbackInfo& info);
Napi::Value KickSignal(const Napi::CallbackInfo& info);
}  // namespace nodekvm
