// Large mappings (guest RAM) are unmapped on a thread of their own. Unmapping a populated GiB
// takes 50-60 ms of kernel time (its page tables zapped, then the memfd's pages freed when the
// mapping's reference to the file was the last), which on the thread that dropped the last
// reference (the event loop's, in a close() or a finalizer) would hold up everything else.
#pragma once

#include <napi.h>

#include <cstddef>

namespace nodekvm {
// Mappings at least this large are unmapped in the background; smaller ones at once.
constexpr size_t kBackgroundUnmapBytes = size_t{16} << 20;
// munmap(addr, size) on the unmapper thread, soon; at once if that thread cannot be started.
void UnmapLater(void* addr, size_t size);
// memoryUnmapsSettled() -> Promise<void>: resolves once every unmap queued before the call is done.
Napi::Value MemoryUnmapsSettled(const Napi::CallbackInfo& info);
}  // namespace nodekvm
