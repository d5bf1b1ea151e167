#include "layout.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "abi.h"

namespace nodekvm {

unsigned long long AbiValue(const nodekvm_abi_entry* table, const char* name) {
  for (const nodekvm_abi_entry* e = table; e->name != nullptr; e++) {
    if (std::strcmp(e->name, name) == 0) return e->value;
  }
  std::fprintf(stderr, "node-kvm: %s is missing from native/abi.c\n", name);
  std::abort();
}

namespace {
Napi::Object ToObject(Napi::Env env, const nodekvm_abi_entry* table) {
  Napi::Object object = Napi::Object::New(env);
  for (const nodekvm_abi_entry* e = table; e->name != nullptr; e++) {
    object.Set(e->name, Napi::Number::New(env, static_cast<double>(e->value)));
  }
  return object;
}
}  // namespace

Napi::Value Layout(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object result = Napi::Object::New(env);
  result.Set("sizes", ToObject(env, nodekvm_abi_sizes));
  result.Set("offsets", ToObject(env, nodekvm_abi_offsets));
  result.Set("constants", ToObject(env, nodekvm_abi_constants));
  return result;
}

}  // namespace nodekvm
