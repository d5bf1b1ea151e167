#pragma once
#include <napi.h>
namespace nodekvm {
Napi::Value VmFromFd(const Napi::CallbackInfo& info);
Napi::Value SetUserMemoryRegion(const Napi::CallbackInfo& info);
Napi::Value GetDirtyLog(const Napi::CallbackInfo& info);
Napi::Value ClearDirtyLog(const Napi::CallbackInfo& info);
Napi::Value CloseVmHandle(const Napi::CallbackInfo& info);
Napi::Value CloseVmHandleAsync(const Napi::CallbackInfo& info);
Napi::Value CreateEventFd(const Napi::CallbackInfo& info);
}  // namespace nodekvm
