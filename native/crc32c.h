// CRC-32C (native/crc32c.cc) as plain functions of the CRC register (preset ~0 and inverted at
// the end by the caller), for the addon and for the C reference benchmark (bench/c/kvm-bench.c),
// so that both checksum with the same code.
#pragma once
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/** The register after `length` bytes of `data`, with the fastest implementation this CPU has. */
uint32_t nodekvm_crc32c_register(uint32_t reg, const uint8_t* data, size_t length);
/** The same with tables only (for tests). */
uint32_t nodekvm_crc32c_register_portable(uint32_t reg, const uint8_t* data, size_t length);
/** Copies `length` bytes from `src` to `dst` and runs the register over the copy, reading the data from memory once. */
uint32_t nodekvm_copy_crc32c_register(uint32_t reg, uint8_t* dst, const uint8_t* src, size_t length);

#ifdef __cplusplus
}
#endif
