#pragma once
#include <napi.h>
namespace nodekvm {
// crc32c(data: ArrayBufferView, seed: number, portable?: boolean) -> number: CRC-32C (Castagnoli)
// of the view's bytes, continuing from `seed` like zlib's crc32(). `portable` forces the table
// implementation (for tests); otherwise the SSE4.2 crc32 instruction is used when the CPU has it.
Napi::Value Crc32c(const Napi::CallbackInfo& info);
// encodePagesSection(ram: Uint8Array, ranges: Float64Array, rangeCount, destinationZeroed, out: Uint8Array,
// sectionType) -> [sectionBytes, pagesSent, zeroPages]: the pages of `rangeCount` (firstPage,
// pageCount) pairs of guest RAM as one Pages section in `out` (see lib/migration/pages.ts):
// maximal runs of data and zero pages (zero pages left out with destinationZeroed), the data
// copied and checksummed in one pass. sectionBytes is 0 when there is nothing to send.
Napi::Value EncodePagesSection(const Napi::CallbackInfo& info);
// encodeLivePagesSection(ram, ranges, rangeCount, destinationZeroed, out, sectionType, dataRuns:
// Float64Array) -> [headBytes, pagesSent, zeroPages, dataRunCount]: the same section as a live
// one (flag 1, lib/migration/pages.ts), without copying the data: `out` gets the header and the
// range table (headBytes), then the 8 bytes that follow the data on the wire (the data's CRC, then
// the section's CRC, which leaves the data out); dataRuns gets each data run's [byteOffset,
// byteLength] in guest RAM, to be sent from there in order. headBytes is 0 when there is nothing
// to send.
Napi::Value EncodeLivePagesSection(const Napi::CallbackInfo& info);
}  // namespace nodekvm
