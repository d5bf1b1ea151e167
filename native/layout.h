#pragma once
#include <napi.h>
namespace nodekvm {
// layout() -> { sizes: {struct: bytes}, offsets: {'struct.field': offset}, constants: {NAME: value} }
// from the kernel headers this addon was built against; the TypeScript struct definitions and
// constants are tested against it so they cannot drift.
Napi::Value Layout(const Napi::CallbackInfo& info);
}  // namespace nodekvm
