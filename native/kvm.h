#pragma once
#include <napi.h>
namespace nodekvm {
Napi::Value OpenSystem(const Napi::CallbackInfo& info);
Napi::Value CreateVm(const Napi::CallbackInfo& info);
Napi::Value CloseSystemHandle(const Napi::CallbackInfo& info);
}  // namespace nodekvm
