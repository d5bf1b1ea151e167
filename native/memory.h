#pragma once
#include <napi.h>

#include <memory>

#include "handles.h"

namespace nodekvm {
Napi::Value MemoryCreate(const Napi::CallbackInfo& info);
Napi::Value MemoryMapFile(const Napi::CallbackInfo& info);
Napi::Value MemoryShareFd(const Napi::CallbackInfo& info);
Napi::Value MemoryFromFd(const Napi::CallbackInfo& info);
Napi::Value MemoryReplace(const Napi::CallbackInfo& info);
Napi::Value MemoryMapFileOver(const Napi::CallbackInfo& info);
Napi::Value MemoryAttach(const Napi::CallbackInfo& info);
Napi::Value MemoryRelease(const Napi::CallbackInfo& info);
// memoryRetain(id) -> id: a reference that keeps the mapping (no view of it) until memoryRelease()
// of the id returned: for native work still under way on guest RAM.
Napi::Value MemoryRetain(const Napi::CallbackInfo& info);
Napi::Value MemoryWrite(const Napi::CallbackInfo& info);
Napi::Value MemoryFill(const Napi::CallbackInfo& info);
// Drops the references of the GuestMemory objects of a thread that is ending.
void ReleaseMemoryOwnedBy(napi_env env);
Napi::Value MemoryPopulatedRanges(const Napi::CallbackInfo& info);
Napi::Value MemoryDontneed(const Napi::CallbackInfo& info);
Napi::Value MemoryDontneedAsync(const Napi::CallbackInfo& info);
Napi::Value MemoryPopulate(const Napi::CallbackInfo& info);
Napi::Value MemoryInfo(const Napi::CallbackInfo& info);
Napi::Value DetachBuffer(const Napi::CallbackInfo& info);
// The live mapping behind a guest memory handle, or a thrown error.
std::shared_ptr<Mapping> FindMemory(Napi::Env env, const Napi::Value& id);
// Reads a non-negative integer (number or bigint) that must fit in 64 bits.
uint64_t ReadU64(Napi::Env env, const Napi::Value& value, const char* name);
}  // namespace nodekvm
