// Socket options Node does not expose for stream sockets.
#pragma once

#include <napi.h>

namespace nodekvm {

Napi::Value SetSocketBuffers(const Napi::CallbackInfo& info);
Napi::Value DupSocket(const Napi::CallbackInfo& info);

}  // namespace nodekvm
