#pragma once
#include <napi.h>

namespace nodekvm {
Napi::Value UffdOpen(const Napi::CallbackInfo& info);
Napi::Value UffdReadFaults(const Napi::CallbackInfo& info);
Napi::Value UffdCopy(const Napi::CallbackInfo& info);
Napi::Value UffdZero(const Napi::CallbackInfo& info);
Napi::Value UffdWake(const Napi::CallbackInfo& info);
Napi::Value UffdClose(const Napi::CallbackInfo& info);
}  // namespace nodekvm
