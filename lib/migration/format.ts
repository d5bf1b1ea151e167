// The stream format, shared by live migration and snapshot files: a fixed header, then typed
// sections, each with its own length limit and a CRC-32C (Castagnoli, see checksum.ts). This file
// encodes and decodes the header and the section framing; pages.ts the Pages sections,
// state-sections.ts the state, section-parser.ts reads the framing back.
//
// Version 4 (STREAM_VERSION); versions 2 and 3 are read too. All integers are little-endian.
//
// Header (HEADER_BYTES = 68):
//   0  magic 'NODE-KVM'      8  version u32        12 kind u32 (StreamKindCode)
//   16 memoryBytes u64       24 vcpuCount u32      28 reserved u32 (0)
//   32 streamId [16]         48 parentId [16] (zeros unless diff snapshot)
//   64 CRC-32C of bytes 0..63
// A header for a machine this host could never build (more than MAX_MEMORY_BYTES of RAM or
// MAX_VCPUS vCPUs, lib/vmm/config.ts) is refused as it is read (ETOOBIG).
//
// Section: type u16, flags u16, payload length u32, payload, CRC-32C of all that precedes it.
//
// The sections, in order:
//   migration, source to destination: Config (the machine's shape, for the destination to build
//     it), Pages and Sync sections while pre-copy runs, then the machine's state (Config, VmState,
//     VcpuState x vcpuCount, DeviceState), End. An Error section may end it at any point. To a
//     destination whose greeting says it reads one (handshake.ts), a DeviceStateAhead section may
//     come just before the last Sync: the DeviceState section then holds only the devices whose
//     state differs from it (a stream without it is read as before: no new version). To such a
//     destination the last pages follow the state sections, DeviceState included, and precede
//     the End (a one-vCPU machine's pause writes the VM's and the vCPU's state the moment the
//     vCPU has parked: see lib/vmm/types.ts StateWriteOut; the destination applies the devices'
//     state while the pages come); every page has come by the End.
//     To a destination whose greeting says it reads them, the Pages sections (but post-copy's)
//     may be live ones (pages.ts, PAGES_SECTION_LIVE: sent from the running guest's RAM, the
//     data's CRC apart); the destination asks again for the pages of one whose data fails it.
//   migration, destination to source (its own header first): Config (the shape: accepted), an
//     empty Sync for each Sync, End as it sets the guest running (nothing left to fail), or Error
//     at any point; PageRequest (the ranges, postcopy-ranges.ts) for the pages of a live section
//     whose data failed its CRC, ahead of the answer to the Sync after it. The source sends its
//     pages without waiting for Config; the destination answers a Sync only after its Config.
//   post-copy (postcopy.ts): the source ends its state with Postcopy (the ranges the destination
//     lacks) instead of End, then sends Pages until every one has gone, then End; the
//     destination answers Postcopy once the guest runs, PageRequest for its faults, and Postcopy
//     (its figures) and End once it has every page.
//   snapshot: the state (Config, VmState, VcpuState x vcpuCount, DeviceState), RamImage, End, zero
//     padding to a 4096-byte boundary, then guest RAM as a raw image (see snapshot-file.ts).
//   diff-snapshot: the state, Pages sections (the pages written since the parent), End.
//   local-migration (a unix socket, same host): as migration, but no Pages: after the
//     destination's acceptance, one Fds section carrying guest RAM's memfd, the disk images and
//     the TAPs (SCM_RIGHTS); the destination builds the machine on them and answers Sync; then
//     the source pauses and sends the state and End; the destination answers End once the guest
//     runs there. Readers of version 2 streams without it are unaffected (a new kind, no new
//     version).
// The state sections come in the order restore applies them, VM before vCPUs, and are written by
// one encoder and read by one reader (state-sections.ts) for migrations and snapshots alike.
// Version 1 wrote a snapshot's VcpuState sections before its VmState, and another Config: its
// files and streams are refused with EVERSION, naming the versions read. Version 3 may hold a
// vCPU's state raw (KVM's structs) in its VcpuState sections; version 2 held JSON only. Version 4
// may hold the VM's state raw in its VmState section too (a build reading only up to 3 refuses it
// with EVERSION, not as a malformed section).
import { randomBytes } from 'node:crypto';
import { PAGE_SIZE } from '../kvm/constants.js';
import { argTypeError, argValueError, outOfRangeError } from '../kvm/errors.js';
import { MAX_MEMORY_BYTES, MAX_VCPUS } from '../vmm/config.js';
import { RECORD_HEADER_BYTES, RECORD_OVERHEAD_BYTES, encodeRecord, sealRecord } from '../vmm/records.js';
import { crc32c } from './checksum.js';
import { MigrationErrorCode as Code, streamError } from './errors.js';

export const STREAM_MAGIC = 'NODE-KVM';
/** The version of the migration stream and snapshot format this package writes. */
export const STREAM_VERSION = 4;
/** The oldest version it reads: version 2 differs only in holding no raw vCPU state, 3 no raw VM state. */
export const OLDEST_STREAM_VERSION = 2;
export const HEADER_BYTES = 68;
export const STREAM_ID_BYTES = 16;
/** type + flags + length before the payload (a section is a record of lib/vmm/records.ts). */
export const SECTION_HEADER_BYTES = RECORD_HEADER_BYTES;
/** Section header plus the CRC-32C after the payload. */
export const SECTION_OVERHEAD_BYTES = RECORD_OVERHEAD_BYTES;

const MiB = 1024 * 1024;

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

// ---------------------------------------------------------------------------------------------
// Header

/**
 * What a stream is: a live migration, a full snapshot, a diff snapshot, or a live migration to
 * another process on this host that hands guest RAM over as a memfd instead of copying it.
 */
export type StreamKind = 'migration' | 'snapshot' | 'diff-snapshot' | 'local-migration';
export const StreamKindCode: Record<StreamKind, number> = { migration: 1, snapshot: 2, 'diff-snapshot': 3, 'local-migration': 4 };
const KIND_BY_CODE = new Map<number, StreamKind>(Object.entries(StreamKindCode).map(([kind, code]) => [code, kind as StreamKind]));

/** The header every migration stream and snapshot file starts with: version, kind, the machine's size and the stream's id. */
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

function checkId(id: unknown, name: string): Uint8Array {
  if (!(id instanceof Uint8Array)) throw argTypeError(`${name} must be a Uint8Array`);
  if (id.length !== STREAM_ID_BYTES) throw outOfRangeError(`${name} must be ${STREAM_ID_BYTES} bytes, got ${id.length}`);
  return id;
}

export function newStreamId(): Uint8Array {
  return new Uint8Array(randomBytes(STREAM_ID_BYTES));
}

export function encodeHeader(init: StreamHeaderInit): Uint8Array {
  if (typeof init !== 'object' || init === null) throw argTypeError('header must be an object');
  if (typeof init.kind !== 'string' || !Object.hasOwn(StreamKindCode, init.kind)) {
    throw argValueError(`kind must be 'migration', 'snapshot', 'diff-snapshot' or 'local-migration', got ${String(init.kind)}`);
  }
  const kindCode = StreamKindCode[init.kind];
  const { memoryBytes, vcpuCount } = init;
  if (typeof memoryBytes !== 'number' || !Number.isSafeInteger(memoryBytes) || memoryBytes <= 0 || memoryBytes % PAGE_SIZE !== 0 || memoryBytes > MAX_MEMORY_BYTES) {
    throw outOfRangeError(`memoryBytes must be a positive multiple of ${PAGE_SIZE} up to ${MAX_MEMORY_BYTES}, got ${String(memoryBytes)}`);
  }
  if (typeof vcpuCount !== 'number' || !Number.isInteger(vcpuCount) || vcpuCount < 1 || vcpuCount > MAX_VCPUS) {
    throw outOfRangeError(`vcpuCount must be an integer 1..${MAX_VCPUS}, got ${String(vcpuCount)}`);
  }
  const streamId = init.streamId === undefined ? newStreamId() : checkId(init.streamId, 'streamId');
  const parentId = init.parentId === undefined ? new Uint8Array(STREAM_ID_BYTES) : checkId(init.parentId, 'parentId');
  if (init.kind === 'diff-snapshot' && isZeroId(parentId)) throw argValueError('a diff-snapshot header needs the parentId of its parent snapshot');
  if (init.kind !== 'diff-snapshot' && !isZeroId(parentId)) throw argValueError(`parentId is only for diff-snapshot headers, not ${init.kind}`);

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

const MIB_TEXT = (bytes: number): string => `${bytes / MiB} MiB`;

/** Parses and validates a header (exactly HEADER_BYTES bytes). Throws MigrationError. */
export function decodeHeader(bytes: Uint8Array): StreamHeader {
  if (bytes.length < HEADER_BYTES) {
    throw streamError(Code.Truncated, `migration stream truncated: expected ${HEADER_BYTES} bytes of the stream header, got ${bytes.length}`);
  }
  const magic = Buffer.from(bytes.buffer, bytes.byteOffset, 8);
  if (!magic.equals(Buffer.from(STREAM_MAGIC, 'latin1'))) {
    throw streamError(Code.Magic, `not a node-kvm migration stream or snapshot: the first 8 bytes are ${magic.toString('hex')}, expected '${STREAM_MAGIC}'`);
  }
  const view = viewOf(bytes);
  // The version comes before the checksum: another version may lay out its header differently.
  const version = view.getUint32(8, true);
  if (version < OLDEST_STREAM_VERSION || version > STREAM_VERSION) {
    throw streamError(Code.Version, `stream version ${version} is not supported (this build reads versions ${OLDEST_STREAM_VERSION} to ${STREAM_VERSION})`);
  }
  if (crc32c(bytes.subarray(0, 64)) !== view.getUint32(64, true)) throw streamError(Code.Checksum, 'checksum mismatch in the stream header');
  const kindCode = view.getUint32(12, true);
  const kind = KIND_BY_CODE.get(kindCode);
  if (!kind) throw streamError(Code.Format, `unknown stream kind ${kindCode} in the stream header`);
  const memoryBytes = getU64(view, 16);
  if (memoryBytes <= 0 || memoryBytes % PAGE_SIZE !== 0) {
    throw streamError(Code.Format, `the stream header gives a guest RAM size of ${memoryBytes < 0 ? 'more than 2^53' : memoryBytes} bytes, not a positive multiple of ${PAGE_SIZE}`);
  }
  if (memoryBytes > MAX_MEMORY_BYTES) {
    throw streamError(Code.TooBig, `the stream is for a machine with ${MIB_TEXT(memoryBytes)} of RAM; this host builds machines of at most ${MIB_TEXT(MAX_MEMORY_BYTES)}`);
  }
  const vcpuCount = view.getUint32(24, true);
  if (vcpuCount < 1) throw streamError(Code.Format, 'the stream header gives 0 vCPUs');
  if (vcpuCount > MAX_VCPUS) {
    throw streamError(Code.TooBig, `the stream is for a machine with ${vcpuCount} vCPUs; this host builds machines of at most ${MAX_VCPUS}`);
  }
  const reserved = view.getUint32(28, true);
  if (reserved !== 0) throw streamError(Code.Format, `the stream header has reserved field ${reserved}; expected 0`);
  // Copies of their own (a Buffer's slice() is a view, which would keep the whole read alive).
  const streamId = new Uint8Array(bytes.subarray(32, 48));
  const parentId = new Uint8Array(bytes.subarray(48, 64));
  if (kind === 'diff-snapshot' && isZeroId(parentId)) throw streamError(Code.Format, 'a diff-snapshot header has no parent id');
  if (kind !== 'diff-snapshot' && !isZeroId(parentId)) throw streamError(Code.Format, `a ${kind} header has a parent id; only diff snapshots have one`);
  return { version, kind, memoryBytes, vcpuCount, streamId, parentId };
}

/** Throws EMISMATCH when the stream is not for the machine described by `expected`. */
export function checkHeader(header: StreamHeader, expected: { kind?: StreamKind; memoryBytes?: number; vcpuCount?: number }): void {
  if (expected.kind !== undefined && header.kind !== expected.kind) {
    throw streamError(Code.Mismatch, `expected a ${expected.kind} stream, got a ${header.kind} stream`);
  }
  if (expected.memoryBytes !== undefined && header.memoryBytes !== expected.memoryBytes) {
    throw streamError(Code.Mismatch, `the stream carries ${header.memoryBytes} bytes of guest RAM; this machine has ${expected.memoryBytes}`);
  }
  if (expected.vcpuCount !== undefined && header.vcpuCount !== expected.vcpuCount) {
    throw streamError(Code.Mismatch, `the stream carries ${header.vcpuCount} vCPUs; this machine has ${expected.vcpuCount}`);
  }
}

// ---------------------------------------------------------------------------------------------
// Sections

export const SectionType = {
  /** Machine configuration (state-codec JSON, see state-sections.ts). */
  Config: 1,
  /** Guest pages: see pages.ts. */
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
  /**
   * Post-copy (postcopy.ts). From the source, after the state in place of End: the page ranges
   * the destination lacks (it runs the guest and fetches them), or empty, to resume a broken
   * post-copy on a new connection. From the destination: empty once the guest runs there; the
   * ranges it still lacks, answering a resume; its figures (JSON) just before its End.
   */
  Postcopy: 10,
  /** Post-copy, from the destination: page ranges a fault waits on, to send ahead of the rest. */
  PageRequest: 11,
  /**
   * local-migration only: what the file descriptors that come with it (SCM_RIGHTS, on its first
   * byte) are, in order (state-codec JSON, see local.ts).
   */
  Fds: 12,
  /**
   * Migration only, from the source to a destination that said it reads it (handshake.ts): the
   * devices' state but the virtio devices', taken while the guest still runs, sent with the last
   * Sync (state-codec JSON, a record of some of DeviceState's keys). The destination puts it on
   * its machine before it answers the Sync; the DeviceState section at the end then holds only
   * the devices whose state differs from it, so the devices that did not change cost nothing
   * inside the downtime.
   */
  DeviceStateAhead: 13,
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
  Postcopy: 16 * MiB,
  PageRequest: 1 * MiB,
  Fds: 4096,
  DeviceStateAhead: 16 * MiB,
};

const NAME_BY_TYPE = new Map<number, SectionName>(Object.entries(SectionType).map(([name, type]) => [type, name as SectionName]));

/** The name of a section type, or undefined for a number that is not one. */
export function sectionTypeName(type: number): SectionName | undefined {
  return NAME_BY_TYPE.get(type);
}

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
  if (!name) throw argValueError(`type must be a SectionType, got ${String(type)}`);
  if (!(payload instanceof Uint8Array)) throw argTypeError('payload must be a Uint8Array');
  if (!Number.isInteger(flags) || flags < 0 || flags > 0xffff) throw outOfRangeError(`flags must be an integer 0..65535, got ${flags}`);
  const max = MAX_SECTION_PAYLOAD_BYTES[name];
  if (payload.length > max) throw outOfRangeError(`a ${name} section holds at most ${max} bytes, got ${payload.length}`);
  return encodeRecord(type, payload, flags);
}

/** Fills in the header and CRC of a section whose payload is already in place. */
export function sealSection(section: Uint8Array, type: number, flags: number): void {
  sealRecord(section, type, flags);
}

export const encodeEnd = (): Uint8Array => encodeSection(SectionType.End, new Uint8Array(0));

export const encodeSync = (): Uint8Array => encodeSection(SectionType.Sync, new Uint8Array(0));

export function encodeErrorSection(message: string): Uint8Array {
  // A message over the limit is cut short (its last character may then decode as U+FFFD).
  const bytes = Buffer.from(String(message), 'utf8');
  return encodeSection(SectionType.Error, bytes.subarray(0, MAX_SECTION_PAYLOAD_BYTES.Error));
}

export function decodeErrorSection(payload: Uint8Array): string {
  return Buffer.from(payload.buffer, payload.byteOffset, payload.byteLength).toString('utf8');
}

// ---------------------------------------------------------------------------------------------
// RamImage sections (snapshot files): u64 fileOffset, u64 sizeBytes, u32 CRC-32C, u32 reserved (0)

/** Where a snapshot file holds its raw RAM image, and its checksum. */
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
    throw outOfRangeError(`fileOffset must be a non-negative multiple of ${PAGE_SIZE}, got ${fileOffset}`);
  }
  if (!Number.isSafeInteger(sizeBytes) || sizeBytes <= 0 || sizeBytes % PAGE_SIZE !== 0) {
    throw outOfRangeError(`sizeBytes must be a positive multiple of ${PAGE_SIZE}, got ${sizeBytes}`);
  }
  if (!Number.isInteger(image.crc32c) || image.crc32c < 0 || image.crc32c > 0xffffffff) throw outOfRangeError(`crc32c must be a u32, got ${image.crc32c}`);
  const payload = new Uint8Array(RAM_IMAGE_PAYLOAD_BYTES);
  const view = viewOf(payload);
  setU64(view, 0, fileOffset);
  setU64(view, 8, sizeBytes);
  view.setUint32(16, image.crc32c, true);
  return encodeSection(SectionType.RamImage, payload);
}

export function decodeRamImage(payload: Uint8Array): RamImage {
  if (payload.length !== RAM_IMAGE_PAYLOAD_BYTES) {
    throw streamError(Code.Format, `a RamImage section holds ${RAM_IMAGE_PAYLOAD_BYTES} bytes, got ${payload.length}`);
  }
  const view = viewOf(payload);
  const fileOffset = getU64(view, 0);
  const sizeBytes = getU64(view, 8);
  if (fileOffset < 0 || fileOffset % PAGE_SIZE !== 0) {
    throw streamError(Code.Format, `the RAM image offset ${fileOffset < 0 ? 'beyond 2^53' : fileOffset} is not a multiple of ${PAGE_SIZE}`);
  }
  if (sizeBytes <= 0 || sizeBytes % PAGE_SIZE !== 0) {
    throw streamError(Code.Format, `the RAM image size ${sizeBytes < 0 ? 'beyond 2^53' : sizeBytes} is not a positive multiple of ${PAGE_SIZE}`);
  }
  if (view.getUint32(20, true) !== 0) throw streamError(Code.Format, 'the RamImage section has a non-zero reserved field');
  return { fileOffset, sizeBytes, crc32c: view.getUint32(16, true) };
}
