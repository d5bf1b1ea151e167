// Socket options Node does not expose for stream sockets, and passing file descriptors over a
// unix socket (SCM_RIGHTS).
#pragma once

#include <napi.h>

namespace nodekvm {

Napi::Value SetSocketBuffers(const Napi::CallbackInfo& info);
Napi::Value DupSocket(const Napi::CallbackInfo& info);
Napi::Value SpinRead(const Napi::CallbackInfo& info);
Napi::Value KeepFromChildren(const Napi::CallbackInfo& info);
Napi::Value SendWithFds(const Napi::CallbackInfo& info);
Napi::Value ReceiveWithFds(const Napi::CallbackInfo& info);

}  // namespace nodekvm
