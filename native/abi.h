// Tables from abi.c (compiled as C): see there for why.
#pragma once

#ifdef __cplusplus
extern "C" {
#endif

struct nodekvm_abi_entry {
  const char* name;
  unsigned long long value;
};

// Each ends with a {0, 0} entry.
extern const struct nodekvm_abi_entry nodekvm_abi_sizes[];
extern const struct nodekvm_abi_entry nodekvm_abi_offsets[];
extern const struct nodekvm_abi_entry nodekvm_abi_constants[];
extern const struct nodekvm_abi_entry nodekvm_abi_requests[];

#ifdef __cplusplus
}

#include <cstdint>

namespace nodekvm {
// The value named `name` in `table`; aborts at load time if it is missing (a build error).
unsigned long long AbiValue(const nodekvm_abi_entry* table, const char* name);
inline unsigned long AbiRequest(const char* name) { return static_cast<unsigned long>(AbiValue(nodekvm_abi_requests, name)); }
inline uint32_t AbiSize(const char* name) { return static_cast<uint32_t>(AbiValue(nodekvm_abi_sizes, name)); }
}  // namespace nodekvm
#endif
