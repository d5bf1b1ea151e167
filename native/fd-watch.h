#pragma once
#include <napi.h>
namespace nodekvm {
// A device thread's wait for an fd (an eventfd KVM signals, a TAP) on its own event loop, as
// Node's sockets wait for theirs: libuv's poll watcher, which Node does not expose for any fd.
Napi::Value WatchFd(const Napi::CallbackInfo& info);
}  // namespace nodekvm
