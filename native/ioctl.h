// The whitelist of KVM ioctls that JavaScript may issue with a struct argument. The TypeScript
// layer encodes structs into byte buffers; this table says how large each argument must be so
// that the kernel never reads or writes past it. Ioctls whose arguments carry host pointers
// (memory regions, dirty logs) are not here: they have dedicated bindings that build the pointer
// natively from validated handles.
#pragma once

#include <napi.h>

#include <cstdint>

namespace nodekvm {

enum class ArgKind {
  None,          // no argument
  Value,         // an integer passed by value
  Struct,        // a fixed-size struct; size from the request's _IOC_SIZE
  U64Pointer,    // a pointer to one u64 (KVM_SET_IDENTITY_MAP_ADDR)
  CountedArray,  // a u32 element count at offset 0, then elements after a fixed header
  NestedState,   // struct kvm_nested_state: its total size is the u32 at offset 4
  Xsave2,        // struct kvm_xsave grown to KVM_CAP_XSAVE2 bytes
};

enum class FdKind { System, Vm, Vcpu };

struct IoctlOp {
  const char* name;
  unsigned long request;
  FdKind fdKind;
  ArgKind argKind;
  uint32_t headerBytes;   // CountedArray
  uint32_t elementBytes;  // CountedArray
  uint32_t maxCount;      // CountedArray
};

// `ioctl(handle, op, arg)`: runs the op on the handle's fd and returns the ioctl's result.
Napi::Value Ioctl(const Napi::CallbackInfo& info);
// { KVM_GET_REGS: opIndex, ... } for the TypeScript layer.
Napi::Object IoctlOps(Napi::Env env);

}  // namespace nodekvm
