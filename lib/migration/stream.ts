// The migration stream: a fixed header, then typed sections, each with its own length limit and
// CRC-32C (Castagnoli, see checksum.ts). A snapshot file is the same stream written to a file.
// The reader checks every length against its limit before allocating and every checksum before
// returning a section, and decodePages() checks every range of a Pages section against guest RAM
// before it applies any.
//
// All integers are little-endian.
//
// Header (HEADER_BYTES = 68):
//   0  magic 'NODE-KVM'      8  version u32        12 kind u32 (StreamKindCode)
//   16 memoryBytes u64       24 vcpuCount u32      28 reserved u32 (0)
//   32 streamId [16]         48 parentId [16] (zeros unless diff snapshot)
//   64 CRC-32C of bytes 0..63
// Section: type u16, flags u16, payload length u32, payload, CRC-32C of all that precedes it.
import { randomBytes } from 'node:crypto';
import { read as fsRead } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import type { Readable, Writable } from 'node:stream';
import { PAGE_SIZE } from '../kvm/constants.js';
import { crc32c } from './checksum.js';

export const STREAM_MAGIC = 'NODE-KVM';
export const STREAM_VERSION = 1;
export const HEADER_BYTES = 68;
export const STREAM_ID_BYTES = 16;
/** type + flags + length before the payload. */
export const SECTION_HEADER_BYTES = 8;
/** Section header plus the CRC-32C after the payload. */
export const SECTION_OVERHEAD_BYTES = SECTION_HEADER_BYTES + 4;

const MiB = 1024 * 1024;

// ---------------------------------------------------------------------------------------------
// Errors

export type StreamErrorCode =
  | 'ETRUNCATED' // the stream or file ended (or the peer closed) before what was announced
  | 'ETIMEDOUT' // the peer sent nothing for longer than the stall timeout
  | 'ECHECKSUM'
  | 'EMAGIC'
  | 'EVERSION'
  | 'EMISMATCH' // valid, but for another machine (memory size, vCPU count, parent snapshot)
  | 'ETOOBIG'
  | 'EFORMAT';

/** A migration stream or snapshot file that cannot be used: the message says what is wrong. */
export class StreamError extends Error {
  readonly code: StreamErrorCode;

  constructor(code: StreamErrorCode, message: string) {
    super(message);
    this.name = 'StreamError';
    this.code = code;
  }
}

// ---------------------------------------------------------------------------------------------
// Byte helpers

const TWO_32 = 2 ** 32;

export function viewOf(bytes: Uint8Array): DataView {
  return new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

/** Writes a safe integer as u64. */
export function setU64(view: DataView, offset: number, value: number): void {
  view.setUint32(offset, value % TWO_32, true);
  view.setUint32(offset + 4, Math.floor(value / TWO_32), true);
}

/** Reads a u64, or returns -1 when it is beyond Number.MAX_SAFE_INTEGER. */
export function getU64(view: DataView, offset: number): number {
  const high = view.getUint32(offset + 4, true);
  if (high > 0x1fffff) return -1;
  return high * TWO_32 + view.getUint32(offset, true);
}

const isZeroId = (id: Uint8Array): boolean => id.every((byte) => byte === 0);
export const hexId = (id: Uint8Array): string => Buffer.from(id.buffer, id.byteOffset, id.byteLength).toString('hex');

const ZERO_PAGE = Buffer.alloc(PAGE_SIZE);
const ZERO_BLOCK_PAGES = 16;
const ZERO_BLOCK = Buffer.alloc(ZERO_BLOCK_PAGES * PAGE_SIZE);

/** Whether the 4 KiB page at `offset` of `bytes` is all zeros (a memcmp, no allocation). */
export function isZeroPage(bytes: Uint8Array, offset: number): boolean {
  return ZERO_PAGE.compare(bytes, offset, offset + PAGE_SIZE) === 0;
}

/**
 * Calls `onRun(firstPageIndex, pageCount, zero)` for the maximal runs of all-zero and not-all-zero
 * pages of `bytes` (a whole number of pages), in order.
 */
export function forEachPageRun(bytes: Uint8Array, onRun: (firstPageIndex: number, pageCount: number, zero: boolean) => void): void {
  const pageCount = Math.floor(bytes.length / PAGE_SIZE);
  let runStart = 0;
  let runZero = false;
  let page = 0;
  while (page < pageCount) {
    // Idle guest RAM is mostly zero: test 64 KiB at once before testing pages one by one.
    let zero: boolean;
    let step = 1;
    if (page + ZERO_BLOCK_PAGES <= pageCount && ZERO_BLOCK.compare(bytes, page * PAGE_SIZE, (page + ZERO_BLOCK_PAGES) * PAGE_SIZE) === 0) {
      zero = true;
      step = ZERO_BLOCK_PAGES;
    } else {
      zero = isZeroPage(bytes, page * PAGE_SIZE);
    }
    if (page === 0) runZero = zero;
    else if (zero !== runZero) {
      onRun(runStart, page - runStart, runZero);
      runStart = page;
      runZero = zero;
    }
    page += step;
  }
  if (pageCount > 0) onRun(runStart, pageCount - runStart, runZero);
}

// ---------------------------------------------------------------------------------------------
// Header

export type StreamKind = 'migration' | 'snapshot' | 'diff-snapshot';
export const StreamKindCode: Record<StreamKind, number> = { migration: 1, snapshot: 2, 'diff-snapshot': 3 };
const KIND_BY_CODE = new Map<number, StreamKind>(Object.entries(StreamKindCode).map(([kind, code]) => [code, kind as StreamKind]));

export interface StreamHeader {
  version: number;
  kind: StreamKind;
  /** Guest RAM size, a multiple of PAGE_SIZE. */
  memoryBytes: number;
  vcpuCount: number;
  /** Random, names this stream (a snapshot's identity for the diff snapshots layered on it). */
  streamId: Uint8Array;
  /** The streamId of the snapshot a diff snapshot is layered on; zeros otherwise. */
  parentId: Uint8Array;
}

export interface StreamHeaderInit {
  kind: StreamKind;
  memoryBytes: number;
  vcpuCount: number;
  /** Default: 16 random bytes. */
  streamId?: Uint8Array;
  parentId?: Uint8Array;
}

/** Largest vCPU count a header may announce (KVM_MAX_VCPUS on x86 is 1024 today; room to grow). */
export const MAX_STREAM_VCPUS = 4096;

function checkId(id: unknown, name: string): Uint8Array {
  if (!(id instanceof Uint8Array)) throw new TypeError(`${name} must be a Uint8Array`);
  if (id.length !== STREAM_ID_BYTES) throw new RangeError(`${name} must be ${STREAM_ID_BYTES} bytes, got ${id.length}`);
  return id;
}

export function newStreamId(): Uint8Array {
  return new Uint8Array(randomBytes(STREAM_ID_BYTES));
}

export function encodeHeader(init: StreamHeaderInit): Uint8Array {
  if (typeof init !== 'object' || init === null) throw new TypeError('header must be an object');
  if (typeof init.kind !== 'string' || !Object.hasOwn(StreamKindCode, init.kind)) {
    throw new RangeError(`kind must be 'migration', 'snapshot' or 'diff-snapshot', got ${String(init.kind)}`);
  }
  const kindCode = StreamKindCode[init.kind];
  const { memoryBytes, vcpuCount } = init;
  if (typeof memoryBytes !== 'number' || !Number.isSafeInteger(memoryBytes) || memoryBytes <= 0 || memoryBytes % PAGE_SIZE !== 0) {
    throw new RangeError(`memoryBytes must be a positive multiple of ${PAGE_SIZE}, got ${String(memoryBytes)}`);
  }
  if (typeof vcpuCount !== 'number' || !Number.isInteger(vcpuCount) || vcpuCount < 1 || vcpuCount > MAX_STREAM_VCPUS) {
    throw new RangeError(`vcpuCount must be an integer 1..${MAX_STREAM_VCPUS}, got ${String(vcpuCount)}`);
  }
  const streamId = init.streamId === undefined ? newStreamId() : checkId(init.streamId, 'streamId');
  const parentId = init.parentId === undefined ? new Uint8Array(STREAM_ID_BYTES) : checkId(init.parentId, 'parentId');
  if (init.kind === 'diff-snapshot' && isZeroId(parentId)) throw new RangeError('a diff-snapshot header needs the parentId of its parent snapshot');
  if (init.kind !== 'diff-snapshot' && !isZeroId(parentId)) throw new RangeError(`parentId is only for diff-snapshot headers, not ${init.kind}`);

  const bytes = new Uint8Array(HEADER_BYTES);
  const view = viewOf(bytes);
  bytes.set(Buffer.from(STREAM_MAGIC, 'latin1'), 0);
  view.setUint32(8, STREAM_VERSION, true);
  view.setUint32(12, kindCode, true);
  setU64(view, 16, memoryBytes);
  view.setUint32(24, vcpuCount, true);
  view.setUint32(28, 0, true);
  bytes.set(streamId, 32);
  bytes.set(parentId, 48);
  view.setUint32(64, crc32c(bytes.subarray(0, 64)), true);
  return bytes;
}

/** Parses and validates a header (exactly HEADER_BYTES bytes). Throws StreamError. */
export function decodeHeader(bytes: Uint8Array): StreamHeader {
  if (bytes.length < HEADER_BYTES) {
    throw new StreamError('ETRUNCATED', `migration stream truncated: expected ${HEADER_BYTES} bytes of the stream header, got ${bytes.length}`);
  }
  const magic = Buffer.from(bytes.buffer, bytes.byteOffset, 8);
  if (!magic.equals(Buffer.from(STREAM_MAGIC, 'latin1'))) {
    throw new StreamError('EMAGIC', `not a node-kvm migration stream or snapshot: the first 8 bytes are ${magic.toString('hex')}, expected '${STREAM_MAGIC}'`);
  }
  const view = viewOf(bytes);
  // The version comes before the checksum: another version may lay out its header differently.
  const version = view.getUint32(8, true);
  if (version !== STREAM_VERSION) {
    throw new StreamError('EVERSION', `stream version ${version} is not supported (this build reads ${STREAM_VERSION})`);
  }
  if (crc32c(bytes.subarray(0, 64)) !== view.getUint32(64, true)) throw new StreamError('ECHECKSUM', 'checksum mismatch in the stream header');
  const kindCode = view.getUint32(12, true);
  const kind = KIND_BY_CODE.get(kindCode);
  if (!kind) throw new StreamError('EFORMAT', `unknown stream kind ${kindCode} in the stream header`);
  const memoryBytes = getU64(view, 16);
  if (memoryBytes <= 0 || memoryBytes % PAGE_SIZE !== 0) {
    throw new StreamError('EFORMAT', `the stream header gives a guest RAM size of ${memoryBytes < 0 ? 'more than 2^53' : memoryBytes} bytes, not a positive multiple of ${PAGE_SIZE}`);
  }
  const vcpuCount = view.getUint32(24, true);
  if (vcpuCount < 1 || vcpuCount > MAX_STREAM_VCPUS) {
    throw new StreamError('EFORMAT', `the stream header gives ${vcpuCount} vCPUs; expected 1..${MAX_STREAM_VCPUS}`);
  }
  const reserved = view.getUint32(28, true);
  if (reserved !== 0) throw new StreamError('EFORMAT', `the stream header has reserved field ${reserved}; expected 0`);
  const streamId = bytes.slice(32, 48);
  const parentId = bytes.slice(48, 64);
  if (kind === 'diff-snapshot' && isZeroId(parentId)) throw new StreamError('EFORMAT', 'a diff-snapshot header has no parent id');
  if (kind !== 'diff-snapshot' && !isZeroId(parentId)) throw new StreamError('EFORMAT', `a ${kind} header has a parent id; only diff snapshots have one`);
  return { version, kind, memoryBytes, vcpuCount, streamId, parentId };
}

/** Throws EMISMATCH when the stream is not for the machine described by `expected`. */
export function checkHeader(header: StreamHeader, expected: { kind?: StreamKind; memoryBytes?: number; vcpuCount?: number }): void {
  if (expected.kind !== undefined && header.kind !== expected.kind) {
    throw new StreamError('EMISMATCH', `expected a ${expected.kind} stream, got a ${header.kind} stream`);
  }
  if (expected.memoryBytes !== undefined && header.memoryBytes !== expected.memoryBytes) {
    throw new StreamError('EMISMATCH', `the stream carries ${header.memoryBytes} bytes of guest RAM; this machine has ${expected.memoryBytes}`);
  }
  if (expected.vcpuCount !== undefined && header.vcpuCount !== expected.vcpuCount) {
    throw new StreamError('EMISMATCH', `the stream carries ${header.vcpuCount} vCPUs; this machine has ${expected.vcpuCount}`);
  }
}

// ---------------------------------------------------------------------------------------------
// Sections

export const SectionType = {
  /** Machine configuration (state-codec JSON). */
  Config: 1,
  /** Guest pages: see encodePages(). */
  Pages: 2,
  /** Snapshot files only: where the raw RAM image lies in the file. */
  RamImage: 3,
  /** One per vCPU, in vCPU index order (state-codec JSON). */
  VcpuState: 4,
  /** irqchip, PIT, clock (state-codec JSON). */
  VmState: 5,
  /** Device state (state-codec JSON). */
  DeviceState: 6,
  /** Last section; empty. */
  End: 7,
  /** Why the sender gave up (UTF-8 text); also usable from destination to source. */
  Error: 8,
  /**
   * Empty. From the source: answer once everything before this has been taken in; the
   * destination answers with one of its own. Lets the source pause its guest only when the
   * destination has caught up, so that no backlog is drained inside the downtime.
   */
  Sync: 9,
} as const;
export type SectionTypeNumber = (typeof SectionType)[keyof typeof SectionType];
export type SectionName = keyof typeof SectionType;

export const RAM_IMAGE_PAYLOAD_BYTES = 24;

/** Largest payload of each section type; the reader refuses longer ones before allocating. */
export const MAX_SECTION_PAYLOAD_BYTES: Record<SectionName, number> = {
  Config: 1 * MiB,
  Pages: 64 * MiB,
  RamImage: RAM_IMAGE_PAYLOAD_BYTES,
  VcpuState: 16 * MiB,
  VmState: 16 * MiB,
  DeviceState: 16 * MiB,
  End: 0,
  Error: 64 * 1024,
  Sync: 0,
};

const NAME_BY_TYPE = new Map<number, SectionName>(Object.entries(SectionType).map(([name, type]) => [type, name as SectionName]));

export function sectionName(type: number): string {
  return NAME_BY_TYPE.get(type) ?? `unknown (${type})`;
}

export interface Section {
  type: SectionTypeNumber;
  name: SectionName;
  flags: number;
  payload: Uint8Array;
}

/** One complete section (header, a copy of `payload`, CRC) in one buffer. */
export function encodeSection(type: SectionTypeNumber, payload: Uint8Array, flags = 0): Uint8Array {
  const name = NAME_BY_TYPE.get(type);
  if (!name) throw new RangeError(`type must be a SectionType, got ${String(type)}`);
  if (!(payload instanceof Uint8Array)) throw new TypeError('payload must be a Uint8Array');
  if (!Number.isInteger(flags) || flags < 0 || flags > 0xffff) throw new RangeError(`flags must be an integer 0..65535, got ${flags}`);
  const max = MAX_SECTION_PAYLOAD_BYTES[name];
  if (payload.length > max) throw new RangeError(`a ${name} section holds at most ${max} bytes, got ${payload.length}`);
  const section = new Uint8Array(SECTION_OVERHEAD_BYTES + payload.length);
  section.set(payload, SECTION_HEADER_BYTES);
  sealSection(section, type, flags);
  return section;
}

/** Fills in the header and CRC of a section whose payload is already in place. */
function sealSection(section: Uint8Array, type: number, flags: number): void {
  const view = viewOf(section);
  const payloadBytes = section.length - SECTION_OVERHEAD_BYTES;
  view.setUint16(0, type, true);
  view.setUint16(2, flags, true);
  view.setUint32(4, payloadBytes, true);
  view.setUint32(SECTION_HEADER_BYTES + payloadBytes, crc32c(section.subarray(0, SECTION_HEADER_BYTES + payloadBytes)), true);
}

export const encodeEnd = (): Uint8Array => encodeSection(SectionType.End, new Uint8Array(0));

export function encodeErrorSection(message: string): Uint8Array {
  // A message over the limit is cut short (its last character may then decode as U+FFFD).
  const bytes = Buffer.from(String(message), 'utf8');
  return encodeSection(SectionType.Error, bytes.subarray(0, MAX_SECTION_PAYLOAD_BYTES.Error));
}

export function decodeErrorSection(payload: Uint8Array): string {
  return Buffer.from(payload.buffer, payload.byteOffset, payload.byteLength).toString('utf8');
}

export interface RamImage {
  /** Where the image starts in the snapshot file; a multiple of PAGE_SIZE. */
  fileOffset: number;
  sizeBytes: number;
  /** CRC-32C of the whole image (zero pages included). */
  crc32c: number;
}

export function encodeRamImage(image: RamImage): Uint8Array {
  const { fileOffset, sizeBytes } = image;
  if (!Number.isSafeInteger(fileOffset) || fileOffset < 0 || fileOffset % PAGE_SIZE !== 0) {
    throw new RangeError(`fileOffset must be a non-negative multiple of ${PAGE_SIZE}, got ${fileOffset}`);
  }
  if (!Number.isSafeInteger(sizeBytes) || sizeBytes <= 0 || sizeBytes % PAGE_SIZE !== 0) {
    throw new RangeError(`sizeBytes must be a positive multiple of ${PAGE_SIZE}, got ${sizeBytes}`);
  }
  if (!Number.isInteger(image.crc32c) || image.crc32c < 0 || image.crc32c > 0xffffffff) throw new RangeError(`crc32c must be a u32, got ${image.crc32c}`);
  const payload = new Uint8Array(RAM_IMAGE_PAYLOAD_BYTES);
  const view = viewOf(payload);
  setU64(view, 0, fileOffset);
  setU64(view, 8, sizeBytes);
  view.setUint32(16, image.crc32c, true);
  return encodeSection(SectionType.RamImage, payload);
}

export function decodeRamImage(payload: Uint8Array): RamImage {
  if (payload.length !== RAM_IMAGE_PAYLOAD_BYTES) {
    throw new StreamError('EFORMAT', `a RamImage section holds ${RAM_IMAGE_PAYLOAD_BYTES} bytes, got ${payload.length}`);
  }
  const view = viewOf(payload);
  const fileOffset = getU64(view, 0);
  const sizeBytes = getU64(view, 8);
  if (fileOffset < 0 || fileOffset % PAGE_SIZE !== 0) {
    throw new StreamError('EFORMAT', `the RAM image offset ${fileOffset < 0 ? 'beyond 2^53' : fileOffset} is not a multiple of ${PAGE_SIZE}`);
  }
  if (sizeBytes <= 0 || sizeBytes % PAGE_SIZE !== 0) {
    throw new StreamError('EFORMAT', `the RAM image size ${sizeBytes < 0 ? 'beyond 2^53' : sizeBytes} is not a positive multiple of ${PAGE_SIZE}`);
  }
  if (view.getUint32(20, true) !== 0) throw new StreamError('EFORMAT', 'the RamImage section has a non-zero reserved field');
  return { fileOffset, sizeBytes, crc32c: view.getUint32(16, true) };
}

// ---------------------------------------------------------------------------------------------
// Pages sections
//
// Payload: u32 rangeCount; per range u64 firstPage (guest frame number), u32 pageCount, u32 flags;
// then the data of the ranges without PAGES_ZERO, in range order.

/** Range flag: every page of the range is zero; no data follows for it. */
export const PAGES_ZERO = 1;
export const PAGE_RANGE_BYTES = 16;
/** Default data per Pages section: big enough to amortize, small enough to interleave. */
export const DEFAULT_PAGES_DATA_BYTES = 2 * MiB;
const MAX_PAGES_DATA_BYTES = 32 * MiB;
const MAX_RANGES_PER_SECTION = 65536;
/** Pages read from the caller's memory at a time. */
const READ_BLOCK_PAGES = 256;
const MAX_RANGE_PAGES = 0xffffffff;

export interface EncodePagesOptions {
  /** Page data per section at most (a multiple of PAGE_SIZE). Default 2 MiB. */
  maxDataBytesPerSection?: number;
  /**
   * The destination's RAM is known to be zero where these pages go (the first full pass): zero
   * pages are then left out of the stream altogether. Otherwise (later passes, diff snapshots) they
   * are sent as zero ranges, because the destination may hold older data there.
   */
  destinationZeroed?: boolean;
  /** When given, every range must lie below this guest RAM size. */
  memoryBytes?: number;
  /**
   * Where each section is built: a buffer of exactly `byteLength` bytes, every one of which will
   * be written. Default: a new Uint8Array. A sender that recycles its buffers once written avoids
   * faulting in fresh memory for every section.
   */
  allocate?: (byteLength: number) => Uint8Array;
}

export interface EncodedPages {
  /** Complete Pages sections, each in its own buffer. */
  sections: Uint8Array[];
  /** Non-zero pages, sent with their data. */
  pagesSent: number;
  /** Pages found all-zero: sent as zero ranges, or left out with destinationZeroed. */
  zeroPages: number;
  /** Total size of `sections`. */
  bytes: number;
}

interface PendingRange {
  firstPage: number;
  pageCount: number;
  zero: boolean;
  data: Uint8Array[];
}

/**
 * Encodes the pages of `ranges` into Pages sections. `read(guestPhysAddr, byteLength)` returns the
 * bytes there, as a view that stays valid until encodePages() returns (a view of guest RAM). Data
 * is copied into the section buffers, and each section's CRC covers the copy, so the guest may
 * change its pages afterwards without invalidating the stream.
 */
export function encodePages(
  ranges: readonly PageRangeLike[],
  read: (guestPhysAddr: number, byteLength: number) => Uint8Array,
  options: EncodePagesOptions = {},
): EncodedPages {
  if (!Array.isArray(ranges)) throw new TypeError('ranges must be an array of { firstPage, pageCount }');
  if (typeof read !== 'function') throw new TypeError('read must be a function');
  const maxData = options.maxDataBytesPerSection ?? DEFAULT_PAGES_DATA_BYTES;
  if (!Number.isInteger(maxData) || maxData < PAGE_SIZE || maxData > MAX_PAGES_DATA_BYTES || maxData % PAGE_SIZE !== 0) {
    throw new RangeError(`maxDataBytesPerSection must be a multiple of ${PAGE_SIZE} from ${PAGE_SIZE} to ${MAX_PAGES_DATA_BYTES}, got ${maxData}`);
  }
  let memoryPages = Math.floor(Number.MAX_SAFE_INTEGER / PAGE_SIZE);
  if (options.memoryBytes !== undefined) {
    const { memoryBytes } = options;
    if (!Number.isSafeInteger(memoryBytes) || memoryBytes < 0 || memoryBytes % PAGE_SIZE !== 0) {
      throw new RangeError(`memoryBytes must be a multiple of ${PAGE_SIZE}, got ${memoryBytes}`);
    }
    memoryPages = memoryBytes / PAGE_SIZE;
  }
  const destinationZeroed = options.destinationZeroed === true;
  const allocate = options.allocate;
  if (allocate !== undefined && typeof allocate !== 'function') throw new TypeError('allocate must be a function');

  const result: EncodedPages = { sections: [], pagesSent: 0, zeroPages: 0, bytes: 0 };
  let pending: PendingRange[] = [];
  let pendingDataBytes = 0;

  const flush = (): void => {
    if (pending.length === 0) return;
    const sectionBytes = SECTION_OVERHEAD_BYTES + 4 + pending.length * PAGE_RANGE_BYTES + pendingDataBytes;
    const section = allocate ? allocate(sectionBytes) : new Uint8Array(sectionBytes);
    if (!(section instanceof Uint8Array) || section.length !== sectionBytes) throw new RangeError(`allocate(${sectionBytes}) must return a Uint8Array of that length`);
    const view = viewOf(section);
    let entry = SECTION_HEADER_BYTES;
    view.setUint32(entry, pending.length, true);
    entry += 4;
    let dataAt = entry + pending.length * PAGE_RANGE_BYTES;
    for (const range of pending) {
      setU64(view, entry, range.firstPage);
      view.setUint32(entry + 8, range.pageCount, true);
      view.setUint32(entry + 12, range.zero ? PAGES_ZERO : 0, true);
      entry += PAGE_RANGE_BYTES;
      for (const chunk of range.data) {
        section.set(chunk, dataAt);
        dataAt += chunk.length;
      }
    }
    sealSection(section, SectionType.Pages, 0);
    result.sections.push(section);
    result.bytes += section.length;
    pending = [];
    pendingDataBytes = 0;
  };

  const addZero = (firstPage: number, pageCount: number): void => {
    result.zeroPages += pageCount;
    if (destinationZeroed) return;
    const last = pending.at(-1);
    if (last?.zero && last.firstPage + last.pageCount === firstPage && last.pageCount + pageCount <= MAX_RANGE_PAGES) {
      last.pageCount += pageCount;
      return;
    }
    if (pending.length === MAX_RANGES_PER_SECTION) flush();
    pending.push({ firstPage, pageCount, zero: true, data: [] });
  };

  const addData = (firstPage: number, data: Uint8Array): void => {
    result.pagesSent += data.length / PAGE_SIZE;
    let offset = 0;
    while (offset < data.length) {
      const room = maxData - pendingDataBytes;
      if (room === 0 || pending.length === MAX_RANGES_PER_SECTION) {
        flush();
        continue;
      }
      const take = Math.min(room, data.length - offset);
      const chunk = data.subarray(offset, offset + take);
      const page = firstPage + offset / PAGE_SIZE;
      const last = pending.at(-1);
      if (last && !last.zero && last.firstPage + last.pageCount === page) {
        last.pageCount += take / PAGE_SIZE;
        last.data.push(chunk);
      } else {
        pending.push({ firstPage: page, pageCount: take / PAGE_SIZE, zero: false, data: [chunk] });
      }
      pendingDataBytes += take;
      offset += take;
    }
  };

  ranges.forEach((range, index) => {
    const { firstPage, pageCount } = checkPageRange(range, `ranges[${index}]`);
    if (firstPage + pageCount > memoryPages) {
      throw new RangeError(`ranges[${index}] (pages ${firstPage}..${firstPage + pageCount - 1}) lies beyond guest RAM (${memoryPages} pages)`);
    }
    const endPage = firstPage + pageCount;
    for (let blockPage = firstPage; blockPage < endPage; blockPage += READ_BLOCK_PAGES) {
      const blockPages = Math.min(READ_BLOCK_PAGES, endPage - blockPage);
      const bytes = read(blockPage * PAGE_SIZE, blockPages * PAGE_SIZE);
      if (!(bytes instanceof Uint8Array) || bytes.length !== blockPages * PAGE_SIZE) {
        throw new RangeError(`read(${blockPage * PAGE_SIZE}, ${blockPages * PAGE_SIZE}) must return a Uint8Array of ${blockPages * PAGE_SIZE} bytes`);
      }
      forEachPageRun(bytes, (runIndex, runPages, zero) => {
        if (zero) addZero(blockPage + runIndex, runPages);
        else addData(blockPage + runIndex, bytes.subarray(runIndex * PAGE_SIZE, (runIndex + runPages) * PAGE_SIZE));
      });
    }
  });
  flush();
  return result;
}

/** A PageRange (types.ts), or anything with the same two fields. */
export interface PageRangeLike {
  firstPage: number;
  pageCount: number;
}

function checkPageRange(range: PageRangeLike, name: string): PageRangeLike {
  if (typeof range !== 'object' || range === null) throw new TypeError(`${name} must be { firstPage, pageCount }`);
  const { firstPage, pageCount } = range;
  if (typeof firstPage !== 'number' || !Number.isSafeInteger(firstPage) || firstPage < 0) {
    throw new RangeError(`${name}.firstPage must be a non-negative integer, got ${String(firstPage)}`);
  }
  if (typeof pageCount !== 'number' || !Number.isSafeInteger(pageCount) || pageCount < 0 || firstPage + pageCount > Number.MAX_SAFE_INTEGER / PAGE_SIZE) {
    throw new RangeError(`${name}.pageCount must be a non-negative integer, got ${String(pageCount)}`);
  }
  return range;
}

export interface DecodedPages {
  /** Pages carried with data. */
  pages: number;
  /** Pages of zero ranges. */
  zeroPages: number;
}

/** The range table of a Pages section, checked against guest RAM and the section's length. */
export interface PageTable extends DecodedPages {
  rangeCount: number;
  /** Guest-physical address of each range. */
  addrs: Float64Array;
  /** Byte length of each range. */
  lengths: Float64Array;
  /** Where each range's data starts in the payload; -1 for a zero range. */
  dataOffsets: Float64Array;
  /** Where the table ends (and the page data starts) in the payload. */
  tableBytes: number;
}

/** The table size a Pages payload announces in its first 4 bytes. */
export function pageTableBytes(payloadStart: Uint8Array): number {
  return 4 + viewOf(payloadStart).getUint32(0, true) * PAGE_RANGE_BYTES; // < 2^37: exact
}

function checkMemoryBytes(memoryBytes: number): void {
  if (typeof memoryBytes !== 'number' || !Number.isSafeInteger(memoryBytes) || memoryBytes <= 0 || memoryBytes % PAGE_SIZE !== 0) {
    throw new RangeError(`memoryBytes must be a positive multiple of ${PAGE_SIZE}, got ${String(memoryBytes)}`);
  }
}

/**
 * Checks the range table at the start of a Pages payload of `payloadBytes` bytes (`payloadStart`
 * holds at least the table): every range inside a guest RAM of `memoryBytes`, flags known, and the
 * data lengths adding up to exactly the rest of the payload.
 */
export function decodePageTable(payloadStart: Uint8Array, payloadBytes: number, memoryBytes: number): PageTable {
  checkMemoryBytes(memoryBytes);
  const memoryPages = memoryBytes / PAGE_SIZE;
  if (payloadBytes < 4 || payloadStart.length < 4) throw new StreamError('EFORMAT', `a Pages section of ${payloadBytes} bytes is too short for its range count`);
  const view = viewOf(payloadStart);
  const rangeCount = view.getUint32(0, true);
  const tableEnd = pageTableBytes(payloadStart);
  if (tableEnd > payloadBytes) {
    throw new StreamError('EFORMAT', `a Pages section announces ${rangeCount} ranges (${tableEnd} bytes of table) but holds ${payloadBytes} bytes`);
  }
  if (payloadStart.length < tableEnd) throw new RangeError(`payloadStart must hold the whole table (${tableEnd} bytes), got ${payloadStart.length}`);
  const table: PageTable = {
    rangeCount, pages: 0, zeroPages: 0, tableBytes: tableEnd,
    addrs: new Float64Array(rangeCount), lengths: new Float64Array(rangeCount), dataOffsets: new Float64Array(rangeCount),
  };
  let dataAt = tableEnd;
  for (let i = 0; i < rangeCount; i++) {
    const entry = 4 + i * PAGE_RANGE_BYTES;
    const firstPage = getU64(view, entry);
    const pageCount = view.getUint32(entry + 8, true);
    const flags = view.getUint32(entry + 12, true);
    if ((flags & ~PAGES_ZERO) !== 0) throw new StreamError('EFORMAT', `Pages range ${i} has unknown flags 0x${flags.toString(16)}`);
    if (pageCount === 0) throw new StreamError('EFORMAT', `Pages range ${i} is empty`);
    // firstPage is -1 beyond 2^53; both operands below 2^53 keep the subtraction exact.
    if (firstPage < 0 || firstPage > memoryPages || pageCount > memoryPages - firstPage) {
      const first = firstPage < 0 ? `0x${view.getBigUint64(entry, true).toString(16)}` : `0x${firstPage.toString(16)}`;
      throw new StreamError('EFORMAT', `Pages range ${i} (${pageCount} pages from page ${first}) lies outside guest RAM (0x${memoryPages.toString(16)} pages)`);
    }
    table.addrs[i] = firstPage * PAGE_SIZE;
    table.lengths[i] = pageCount * PAGE_SIZE;
    if (flags & PAGES_ZERO) {
      table.dataOffsets[i] = -1;
      table.zeroPages += pageCount;
    } else {
      table.dataOffsets[i] = dataAt;
      dataAt += pageCount * PAGE_SIZE;
      table.pages += pageCount;
    }
  }
  if (dataAt !== payloadBytes) {
    throw new StreamError('EFORMAT', `a Pages section's ranges announce ${dataAt - tableEnd} bytes of page data but it holds ${payloadBytes - tableEnd}`);
  }
  return table;
}

/**
 * Checks a Pages payload in full against a guest RAM of `memoryBytes` (every range inside it, data
 * lengths adding up exactly), then calls `apply` once per range in order: `data` is the range's
 * bytes (a view into `payload`), or null for a range of zero pages (the caller zero-fills
 * `byteLength` bytes). Nothing is applied unless the whole payload is valid.
 */
export function decodePages(
  payload: Uint8Array,
  memoryBytes: number,
  apply: (guestPhysAddr: number, byteLength: number, data: Uint8Array | null) => void,
): DecodedPages {
  if (!(payload instanceof Uint8Array)) throw new TypeError('payload must be a Uint8Array');
  checkMemoryBytes(memoryBytes);
  if (typeof apply !== 'function') throw new TypeError('apply must be a function');
  const table = decodePageTable(payload, payload.length, memoryBytes);
  const { addrs, lengths, dataOffsets } = table;
  for (let i = 0; i < table.rangeCount; i++) {
    const at = dataOffsets[i];
    apply(addrs[i], lengths[i], at < 0 ? null : payload.subarray(at, at + lengths[i]));
  }
  return { pages: table.pages, zeroPages: table.zeroPages };
}

/** decodePages() into guest RAM given as one byte array (its length is the RAM size). */
export function decodePagesInto(payload: Uint8Array, memory: Uint8Array): DecodedPages {
  if (!(memory instanceof Uint8Array)) throw new TypeError('memory must be a Uint8Array');
  return decodePages(payload, memory.length, (guestPhysAddr, byteLength, data) => {
    if (data) memory.set(data, guestPhysAddr);
    else memory.fill(0, guestPhysAddr, guestPhysAddr + byteLength);
  });
}

// ---------------------------------------------------------------------------------------------
// Reading

/** Where a stream's bytes come from. */
export interface ByteSource {
  /**
   * Exactly `length` bytes, or a StreamError (ETRUNCATED when the source ends first). `what`
   * names the thing being read, for the error message ("a Pages section").
   */
  read(length: number, what?: string): Promise<Uint8Array>;
}

/** Reads the header, then one section at a time, each checked in full before it is returned. */
export class SectionReader {
  readonly #source: ByteSource;
  #header: StreamHeader | undefined;
  #ended = false;

  constructor(source: ByteSource) {
    if (typeof source !== 'object' || source === null || typeof source.read !== 'function') {
      throw new TypeError('source must be a ByteSource (an object with read(length))');
    }
    this.#source = source;
  }

  /** The header, once readHeader() has returned. */
  get header(): StreamHeader | undefined {
    return this.#header;
  }

  /** Whether the End section has been read. */
  get ended(): boolean {
    return this.#ended;
  }

  async readHeader(): Promise<StreamHeader> {
    if (this.#header) throw new Error('the stream header has already been read');
    const bytes = await this.#source.read(HEADER_BYTES, 'the stream header');
    this.#header = decodeHeader(bytes);
    return this.#header;
  }

  /** The next section, its length limit and CRC checked. After End, there is no next. */
  async next(): Promise<Section> {
    if (!this.#header) throw new Error('read the stream header (readHeader()) before its sections');
    if (this.#ended) throw new Error('the stream has ended: no section follows End');
    const head = await this.#source.read(SECTION_HEADER_BYTES, 'a section header');
    const view = viewOf(head);
    const type = view.getUint16(0, true);
    const flags = view.getUint16(2, true);
    const length = view.getUint32(4, true);
    const name = NAME_BY_TYPE.get(type);
    if (!name) throw new StreamError('EFORMAT', `unknown section type ${type}`);
    const max = MAX_SECTION_PAYLOAD_BYTES[name];
    if (length > max) throw new StreamError('ETOOBIG', `a ${name} section of ${length} bytes is over the ${max}-byte limit`);
    // The head's checksum now: a source may reuse its bytes for the next read.
    const headCrc = crc32c(head);
    const body = await this.#source.read(length + 4, `a ${name} section`);
    const expected = viewOf(body).getUint32(length, true);
    if (crc32c(body.subarray(0, length), headCrc) !== expected) throw new StreamError('ECHECKSUM', `checksum mismatch in ${name} section`);
    if (type === SectionType.End) this.#ended = true;
    return { type: type as SectionTypeNumber, name, flags, payload: body.subarray(0, length) };
  }
}

function checkLength(length: number): void {
  if (!Number.isSafeInteger(length) || length < 0) throw new RangeError(`length must be a non-negative integer, got ${length}`);
}

/** A ByteSource over bytes in memory. */
export class BufferSource implements ByteSource {
  readonly #bytes: Uint8Array;
  #position = 0;

  constructor(bytes: Uint8Array) {
    if (!(bytes instanceof Uint8Array)) throw new TypeError('bytes must be a Uint8Array');
    this.#bytes = bytes;
  }

  get position(): number {
    return this.#position;
  }

  async read(length: number, what = 'data'): Promise<Uint8Array> {
    checkLength(length);
    const available = this.#bytes.length - this.#position;
    if (available < length) {
      this.#position = this.#bytes.length;
      throw new StreamError('ETRUNCATED', `migration stream truncated: expected ${length} bytes of ${what}, got ${available}`);
    }
    const bytes = this.#bytes.subarray(this.#position, this.#position + length);
    this.#position += length;
    return bytes;
  }
}

export function bufferSource(bytes: Uint8Array): BufferSource {
  return new BufferSource(bytes);
}

/** Above this much unread data the socket is paused until the reader catches up. */
const SOCKET_HIGH_WATER_BYTES = 16 * MiB;

/**
 * A ByteSource over a socket or any Readable: it takes the 'data' chunks, hands out views of them
 * when a read falls inside one chunk and copies only reads that span chunks. It pauses the
 * socket while more than 16 MiB wait unread. A read fails with ETRUNCATED when the peer closes or
 * the socket errors first, and with ETIMEDOUT when no data arrives for `timeoutMs` while a read
 * waits. After a failure every read fails the same way. close() detaches it from the socket.
 */
export class SocketSource implements ByteSource {
  readonly #socket: Readable;
  readonly #timeoutMs: number;
  #chunks: Uint8Array[] = [];
  #chunkIndex = 0;
  #chunkOffset = 0;
  #buffered = 0;
  #received = 0;
  #closed = false;
  #failure: StreamError | undefined;
  #pending: { length: number; what: string; resolve: (bytes: Uint8Array) => void; reject: (error: StreamError) => void } | undefined;
  #timer: NodeJS.Timeout | undefined;

  readonly #onData = (chunk: Buffer | string): void => {
    const bytes = typeof chunk === 'string' ? Buffer.from(chunk) : chunk;
    if (bytes.length === 0) return;
    this.#chunks.push(bytes);
    this.#buffered += bytes.length;
    this.#received += bytes.length;
    const pending = this.#pending;
    if (pending) {
      if (this.#buffered >= pending.length) {
        this.#pending = undefined;
        this.#stopTimer();
        pending.resolve(this.#take(pending.length));
      } else {
        this.#startTimer();
      }
    }
    if (!this.#pending && this.#buffered >= SOCKET_HIGH_WATER_BYTES && !this.#socket.isPaused()) this.#socket.pause();
  };

  readonly #onEnd = (): void => {
    this.#fail(new StreamError('ETRUNCATED', `migration stream truncated: peer closed the migration stream after ${this.#received} bytes`), true);
  };

  readonly #onError = (error: Error): void => {
    this.#fail(new StreamError('ETRUNCATED', `migration stream failed after ${this.#received} bytes: ${error.message}`), false);
  };


  constructor(socket: Readable, timeoutMs: number) {
    if (typeof socket !== 'object' || socket === null || typeof socket.on !== 'function' || typeof socket.pause !== 'function') {
      throw new TypeError('socket must be a net.Socket or a Readable stream');
    }
    if (typeof timeoutMs !== 'number' || !(timeoutMs > 0) || (Number.isFinite(timeoutMs) && timeoutMs > 0x7fffffff)) {
      throw new RangeError(`timeoutMs must be a positive number of ms up to ${0x7fffffff} (or Infinity), got ${String(timeoutMs)}`);
    }
    this.#socket = socket;
    this.#timeoutMs = timeoutMs;
    socket.on('data', this.#onData);
    socket.on('end', this.#onEnd);
    socket.on('close', this.#onEnd);
    socket.on('error', this.#onError);
    if (socket.readableEnded || socket.destroyed) this.#onEnd();
  }

  /** Bytes received from the socket so far (read or not). */
  get bytesReceived(): number {
    return this.#received;
  }

  /** Bytes received but not yet read. */
  get bytesBuffered(): number {
    return this.#buffered;
  }

  read(length: number, what = 'data'): Promise<Uint8Array> {
    checkLength(length);
    if (this.#closed) return Promise.reject(new Error('the SocketSource is closed'));
    if (this.#pending) return Promise.reject(new Error('a read is already waiting: read one thing at a time'));
    if (this.#buffered >= length) return Promise.resolve(this.#take(length));
    if (this.#failure) return Promise.reject(this.#describe(this.#failure, length, what));
    return new Promise((resolve, reject) => {
      this.#pending = { length, what, resolve, reject };
      this.#startTimer();
      if (this.#socket.isPaused()) this.#socket.resume();
    });
  }

  /**
   * Closes this source and returns the bytes it had received but not handed out, in order: for a
   * caller that reads the rest of the stream another way.
   */
  detach(): Uint8Array[] {
    if (this.#pending) throw new Error('a read is waiting: detach() only between reads');
    const rest: Uint8Array[] = [];
    for (let i = this.#chunkIndex; i < this.#chunks.length; i++) {
      const chunk = this.#chunks[i];
      rest.push(i === this.#chunkIndex ? chunk.subarray(this.#chunkOffset) : chunk);
    }
    this.#chunks = [];
    this.#chunkIndex = 0;
    this.#chunkOffset = 0;
    this.#buffered = 0;
    this.close();
    return rest.filter((chunk) => chunk.length > 0);
  }

  /** Stops listening to the socket (leaves the socket itself alone); a waiting read fails. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#stopTimer();
    const socket = this.#socket;
    socket.off('data', this.#onData);
    socket.off('end', this.#onEnd);
    socket.off('close', this.#onEnd);
    socket.off('error', this.#onError);
    const pending = this.#pending;
    this.#pending = undefined;
    pending?.reject(new StreamError('ETRUNCATED', `migration stream closed locally while waiting for ${pending.length} bytes of ${pending.what}`));
  }

  #describe(failure: StreamError, length: number, what: string): StreamError {
    return new StreamError(failure.code, `${failure.message} (expected ${length} bytes of ${what}, got ${this.#buffered})`);
  }

  #fail(failure: StreamError, ended: boolean): void {
    if (this.#failure && ended) return; // 'close' after 'end' or 'error': keep the first reason
    this.#failure = failure;
    this.#stopTimer();
    const pending = this.#pending;
    if (pending) {
      this.#pending = undefined;
      pending.reject(this.#describe(failure, pending.length, pending.what));
    }
  }

  #startTimer(): void {
    if (!Number.isFinite(this.#timeoutMs)) return;
    this.#stopTimer();
    this.#timer = setTimeout(() => {
      this.#timer = undefined;
      this.#fail(new StreamError('ETIMEDOUT', `migration stream stalled: no data for ${this.#timeoutMs} ms after ${this.#received} bytes`), false);
    }, this.#timeoutMs);
  }

  #stopTimer(): void {
    if (this.#timer) clearTimeout(this.#timer);
    this.#timer = undefined;
  }

  /** Removes `length` (<= buffered) bytes from the front: a view when one chunk holds them all. */
  #take(length: number): Uint8Array {
    if (length === 0) return new Uint8Array(0);
    this.#buffered -= length;
    const first = this.#chunks[this.#chunkIndex];
    if (first.length - this.#chunkOffset >= length) {
      const bytes = first.subarray(this.#chunkOffset, this.#chunkOffset + length);
      this.#advance(length);
      return bytes;
    }
    const bytes = Buffer.allocUnsafe(length);
    let filled = 0;
    while (filled < length) {
      const chunk = this.#chunks[this.#chunkIndex];
      const take = Math.min(chunk.length - this.#chunkOffset, length - filled);
      bytes.set(chunk.subarray(this.#chunkOffset, this.#chunkOffset + take), filled);
      filled += take;
      this.#advance(take);
    }
    return bytes;
  }

  #advance(length: number): void {
    this.#chunkOffset += length;
    if (this.#chunkOffset === this.#chunks[this.#chunkIndex].length) {
      this.#chunkIndex++;
      this.#chunkOffset = 0;
      // Drop consumed chunks in batches so the array never shifts one element at a time.
      if (this.#chunkIndex === this.#chunks.length) {
        this.#chunks = [];
        this.#chunkIndex = 0;
      } else if (this.#chunkIndex >= 1024) {
        this.#chunks = this.#chunks.slice(this.#chunkIndex);
        this.#chunkIndex = 0;
      }
    }
  }
}

export function socketSource(socket: Readable, timeoutMs: number): SocketSource {
  return new SocketSource(socket, timeoutMs);
}

/** A ByteSource over a file (an fd or a FileHandle), reading with pread from `startOffset` on. */
/** What a FileSource reads at a time for small reads. */
const READ_AHEAD_BYTES = 256 * 1024;

export class FileSource implements ByteSource {
  readonly #file: number | FileHandle;
  #position: number;
  /** Bytes read ahead, from file offset #aheadStart. */
  #ahead: Uint8Array | undefined;
  #aheadStart = 0;

  constructor(file: number | FileHandle, startOffset = 0) {
    if (typeof file === 'number') {
      if (!Number.isInteger(file) || file < 0) throw new RangeError(`file must be a file descriptor, got ${file}`);
    } else if (typeof file !== 'object' || file === null || typeof file.read !== 'function') {
      throw new TypeError('file must be a file descriptor or a FileHandle');
    }
    checkLength(startOffset);
    this.#file = file;
    this.#position = startOffset;
  }

  /** Where the next read starts. */
  get position(): number {
    return this.#position;
  }

  async read(length: number, what = 'data'): Promise<Uint8Array> {
    checkLength(length);
    const start = this.#position;
    const ahead = this.#ahead;
    if (ahead && start >= this.#aheadStart && start + length <= this.#aheadStart + ahead.length) {
      this.#position = start + length;
      return ahead.subarray(start - this.#aheadStart, start - this.#aheadStart + length);
    }
    if (length < READ_AHEAD_BYTES) {
      // Small reads (a snapshot's sections before its RAM image) come from one bigger read: one
      // trip to the thread pool instead of one per section header and payload.
      const block = Buffer.allocUnsafe(READ_AHEAD_BYTES);
      let got = 0;
      while (got < length) {
        const more = await this.#pread(block, got, READ_AHEAD_BYTES - got, start + got);
        if (more === 0) break;
        got += more;
      }
      if (got < length) {
        this.#position = start + got;
        throw new StreamError('ETRUNCATED', `snapshot file truncated: expected ${length} bytes of ${what} at offset ${start}, got ${got}`);
      }
      this.#ahead = block.subarray(0, got);
      this.#aheadStart = start;
      this.#position = start + length;
      return this.#ahead.subarray(0, length);
    }
    const bytes = Buffer.allocUnsafe(length);
    let filled = 0;
    while (filled < length) {
      const got = await this.#pread(bytes, filled, length - filled, start + filled);
      if (got === 0) {
        this.#position = start + filled;
        throw new StreamError('ETRUNCATED', `snapshot file truncated: expected ${length} bytes of ${what} at offset ${start}, got ${filled}`);
      }
      filled += got;
    }
    this.#position = start + length;
    return bytes;
  }

  #pread(into: Uint8Array, offset: number, length: number, position: number): Promise<number> {
    const file = this.#file;
    if (typeof file !== 'number') return file.read(into, offset, length, position).then((result) => result.bytesRead);
    return new Promise((resolve, reject) => {
      fsRead(file, into, offset, length, position, (error, bytesRead) => (error ? reject(error) : resolve(bytesRead)));
    });
  }
}

export function fileSource(file: number | FileHandle, startOffset = 0): FileSource {
  return new FileSource(file, startOffset);
}

// ---------------------------------------------------------------------------------------------
// Writing

/**
 * Writes `chunks` in order, waiting for 'drain' whenever the socket's buffer is full, and resolves
 * once the last one has been handed to the kernel. Rejects (ETRUNCATED) if the socket errors or
 * closes first.
 */
export function writeChunks(socket: Writable, chunks: readonly Uint8Array[]): Promise<void> {
  if (typeof socket !== 'object' || socket === null || typeof socket.write !== 'function') {
    return Promise.reject(new TypeError('socket must be a net.Socket or a Writable stream'));
  }
  if (!Array.isArray(chunks) || !chunks.every((chunk) => chunk instanceof Uint8Array)) {
    return Promise.reject(new TypeError('chunks must be an array of Uint8Array'));
  }
  return new Promise((resolve, reject) => {
    if (socket.destroyed || socket.writableEnded) {
      reject(new StreamError('ETRUNCATED', 'cannot write the migration stream: the connection is closed'));
      return;
    }
    if (chunks.length === 0) {
      resolve();
      return;
    }
    let index = 0;
    let settled = false;
    const settle = (error?: StreamError): void => {
      if (settled) return;
      settled = true;
      socket.off('drain', pump);
      socket.off('error', onError);
      socket.off('close', onClose);
      if (error) reject(error);
      else resolve();
    };
    const onError = (error: Error): void => settle(new StreamError('ETRUNCATED', `writing the migration stream failed: ${error.message}`));
    const onClose = (): void => settle(new StreamError('ETRUNCATED', 'the connection closed while the migration stream was being written'));
    const onLastWritten = (error?: Error | null): void => (error ? onError(error) : settle());
    function pump(): void {
      while (index < chunks.length && !settled) {
        const last = index === chunks.length - 1;
        const accepted = socket.write(chunks[index++], last ? onLastWritten : undefined);
        if (!accepted && !last) return;
      }
    }
    socket.on('drain', pump);
    socket.on('error', onError);
    socket.on('close', onClose);
    pump();
  });
}
