// TAP network devices (/dev/net/tun) for virtio-net: frames with a virtio_net_hdr in front.
#pragma once

#include <napi.h>

namespace nodekvm {

Napi::Value TapOpen(const Napi::CallbackInfo& info);
Napi::Value TapAdopt(const Napi::CallbackInfo& info);

}  // namespace nodekvm
