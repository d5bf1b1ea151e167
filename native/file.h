// File operations Node does not offer: freeing and zeroing ranges of a disk image, and locking it.
#pragma once

#include <napi.h>

namespace nodekvm {

Napi::Value FileDeallocate(const Napi::CallbackInfo& info);
Napi::Value FileLock(const Napi::CallbackInfo& info);
Napi::Value FileDup(const Napi::CallbackInfo& info);
Napi::Value FileDataRanges(const Napi::CallbackInfo& info);
Napi::Value FileIdentity(const Napi::CallbackInfo& info);

}  // namespace nodekvm
