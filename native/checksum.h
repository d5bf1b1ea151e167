#pragma once
#include <napi.h>
namespace nodekvm {
// crc32c(data: ArrayBufferView, seed: number, portable?: boolean) -> number: CRC-32C (Castagnoli)
// of the view's bytes, continuing from `seed` like zlib's crc32(). `portable` forces the table
// implementation (for tests); otherwise the SSE4.2 crc32 instruction is used when the CPU has it.
Napi::Value Crc32c(const Napi::CallbackInfo& info);
}  // namespace nodekvm
