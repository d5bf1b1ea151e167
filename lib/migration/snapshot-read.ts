// Reading snapshot files (the format: snapshot-file.ts): the sections through SectionReader (the
// one parser of the framing) and the state through StateSectionReader, as an incoming migration
// reads them; the RAM image checked or copied on request; diff snapshots followed to their base.
import { closeSync, openSync, readSync } from 'node:fs';
import { open, type FileHandle } from 'node:fs/promises';
import nodePath from 'node:path';
import { PAGE_SIZE } from '../kvm/constants.js';
import { argTypeError, outOfRangeError } from '../kvm/errors.js';
import { fileIdentity } from '../kvm/host.js';
import { crc32c } from './checksum.js';
import { MigrationError, MigrationErrorCode as Code, streamError } from './errors.js';
import { HEADER_BYTES, SectionType, decodeErrorSection, decodeHeader, decodeRamImage, hexId, type RamImage, type StreamHeader } from './format.js';
import { decodePages, decodePagesInto, forEachPageRun, type DecodedPages } from './pages.js';
import { SectionReader } from './section-reader.js';
import { FileSource, type ByteSource } from './sources.js';
import { StateSectionReader } from './state-sections.js';

/** A snapshot file's kind: full, or a diff over a parent. */
export type SnapshotKind = 'snapshot' | 'diff-snapshot';

/** The snapshot a diff snapshot is layered on. */
export interface SnapshotParent {
  /** Path of the parent snapshot file (stored relative to the diff's directory). */
  path: string;
  /** The parent's streamId (header.streamId of the parent; what writeSnapshotFile() returned). */
  id: Uint8Array;
}

/** A snapshot file read (readSnapshotFile()): its header, the machine's state, its RAM image or pages, and its parent. */
export interface SnapshotContents {
  /** Absolute path of the file read. */
  path: string;
  header: StreamHeader;
  /** The config given to writeSnapshotFile(). */
  config: unknown;
  /** Diff snapshots: the parent's absolute path and its expected streamId. */
  parent?: SnapshotParent;
  vcpus: unknown[];
  vm: unknown;
  devices: unknown;
  /** Full snapshots: where guest RAM lies in the file (page-aligned, mmap-able). */
  ramImage?: RamImage;
  /**
   * The file read (device and inode): a restore maps or reads the RAM image only from that file,
   * not from one renamed over the path since.
   */
  file?: FileIdentity;
  /** Diff snapshots: the Pages section payloads, already checked against guest RAM. */
  pageSections?: Uint8Array[];
  /** Diff snapshots: pages with data and zero pages across pageSections. */
  pageCounts?: DecodedPages;
  /** Diff snapshots: writes pageSections into `memory` (all of guest RAM). */
  applyPages?(memory: Uint8Array): DecodedPages;
}

/** Which file a path named when it was read: fstat()'s device and inode. */
export interface FileIdentity {
  dev: bigint;
  ino: bigint;
}

/**
 * Opens `contents.path` for reading, only if it is still the file `contents` was read from
 * (EMISMATCH otherwise: a snapshot renamed over it since, whose RAM image belongs to another state).
 */
export function openSameSnapshotFile(contents: SnapshotContents): number {
  const fd = openSync(contents.path, 'r');
  try {
    checkSameFile(contents, fd);
    return fd;
  } catch (error) {
    closeSync(fd);
    throw error;
  }
}

/** Throws EMISMATCH unless `fd` is the file `contents` was read from (where it says which). */
function checkSameFile(contents: SnapshotContents, fd: number): void {
  const expected = contents.file;
  if (!expected) return;
  const { dev, ino } = fileIdentity(fd);
  if (dev !== expected.dev || ino !== expected.ino) {
    throw new MigrationError(Code.Mismatch, `${contents.path}: the file was replaced since its state was read (another snapshot renamed over it?)`);
  }
}

/** Longest chain of diff snapshots openSnapshotChain() follows. */
export const MAX_SNAPSHOT_CHAIN = 64;
/** What readSnapshotFile() reads at a time while it parses the sections. */
const SECTIONS_READ_AHEAD_BYTES = 16 * 1024;
/** RAM image read size for verifyRamImage() and loadSnapshotMemory(). */
const READ_CHUNK_BYTES = 4 * 1024 * 1024;
/** Full snapshot files whose decoded state is kept (the ones read last). */
const DECODED_FILES_KEPT = 8;
/** Sections longer than this (a machine of some hundred vCPUs) are decoded each time. */
const MAX_KEPT_SECTIONS_BYTES = 1024 * 1024;

/**
 * The full snapshots read last, by absolute path: the exact bytes their sections were decoded from,
 * and what they decoded to. A file whose sections read back byte for byte the same decodes the same,
 * so reading it again (a machine cloned from one snapshot over and over) skips the decoding and its
 * checks: a fifth of a warm restore's time. Bytes compared, not the file's times: a file rewritten in
 * place within one tick of the kernel's coarse clock keeps its times.
 */
const decodedFiles = new Map<string, { sections: Buffer; contents: SnapshotContents }>();

async function readFully(file: FileHandle, into: Uint8Array, position: number, path: string): Promise<void> {
  let done = 0;
  while (done < into.length) {
    const { bytesRead } = await file.read(into, done, into.length - done, position + done);
    if (bytesRead === 0) {
      throw streamError(Code.Truncated, `${path}: snapshot file truncated: expected ${into.length} bytes of the RAM image at offset ${position}, got ${done}`);
    }
    done += bytesRead;
  }
}

/** A ByteSource that keeps what it hands out: the exact bytes a snapshot's state was decoded from. */
class RecordedSource implements ByteSource {
  readonly chunks: Uint8Array[] = [];
  readonly #source: ByteSource;

  constructor(source: ByteSource) {
    this.#source = source;
  }

  async read(length: number, what?: string): Promise<Uint8Array> {
    const bytes = await this.#source.read(length, what);
    this.chunks.push(bytes);
    return bytes;
  }
}

/**
 * A deep copy of a decoded state: plain objects, arrays, Uint8Arrays and scalars, the values a
 * state decodes to (with structuredClone() the whole read of a small snapshot took 0.05 ms, not 0.03).
 */
function copyState<T>(value: T): T {
  if (value === null || typeof value !== 'object') return value;
  if (value instanceof Uint8Array) return new Uint8Array(value) as T;
  if (Array.isArray(value)) return value.map(copyState) as T;
  const copy: Record<string, unknown> = {};
  for (const key of Object.keys(value)) copy[key] = copyState((value as Record<string, unknown>)[key]);
  return copy as T;
}

function ramImageEnd(contents: SnapshotContents): number {
  return contents.ramImage!.fileOffset + contents.ramImage!.sizeBytes;
}

/** Reads and checks just the header of a snapshot file. */
export async function readSnapshotHeader(path: string): Promise<StreamHeader> {
  const file = await open(path, 'r');
  try {
    return decodeHeader(await new FileSource(file, 0).read(HEADER_BYTES, 'the stream header'));
  } catch (error) {
    throw withPath(error, path);
  } finally {
    await file.close();
  }
}

function withPath(error: unknown, path: string): unknown {
  if (!(error instanceof MigrationError) || error.message.startsWith(path)) return error;
  return new MigrationError(error.code, `${path}: ${error.message}`, { cause: error.cause });
}

export function sameId(a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && a.every((byte, index) => byte === b[index]);
}

/**
 * Reads a snapshot file and checks everything but the RAM image contents: magic, version, every
 * section's CRC and length, the section layout, diff pages against guest RAM, and that the file
 * is long enough to hold the RAM image. Errors are MigrationErrors whose message starts with the
 * path.
 */
export async function readSnapshotFile(path: string): Promise<SnapshotContents> {
  if (typeof path !== 'string' || path === '') throw argTypeError('path must be a non-empty string');
  const absolute = nodePath.resolve(path);
  // Synchronous reads: the state is a few pages (one read-ahead), and each trip through the
  // thread pool would cost more than the read itself in a restore's time.
  const file = openSync(absolute, 'r');
  try {
    const { size: fileBytes, dev, ino } = fileIdentity(file);
    // Its sections come before the RAM image, a few KiB for a small machine: a bigger read-ahead
    // would read (and allocate) RAM image pages for nothing. A file decoded before: its sections.
    const known = decodedFiles.get(absolute);
    const start = Buffer.allocUnsafe(Math.max(SECTIONS_READ_AHEAD_BYTES, known?.sections.length ?? 0));
    const startBytes = readSync(file, start, 0, start.length, 0);
    if (known) {
      const { sections, contents } = known;
      if (startBytes >= sections.length && start.subarray(0, sections.length).equals(sections) && fileBytes >= ramImageEnd(contents)) {
        // Most recently used last.
        decodedFiles.delete(absolute);
        decodedFiles.set(absolute, known);
        // A copy: a caller's changes to the state must not reach the next reader.
        return { ...copyState(contents), file: { dev, ino } };
      }
      decodedFiles.delete(absolute);
    }
    const source = new FileSource(file, 0, { sync: true, readAheadBytes: SECTIONS_READ_AHEAD_BYTES, ahead: start.subarray(0, startBytes) });
    const decoded = new RecordedSource(source);
    const reader = new SectionReader(decoded);
    const header = await reader.readHeader();
    if (header.kind === 'migration') throw streamError(Code.Format, 'this is a migration stream, not a snapshot file');
    const kind = header.kind;
    const diff = kind === 'diff-snapshot';
    const where = `a ${kind} file`;
    const state = new StateSectionReader(where, header.vcpuCount);
    let ramImage: RamImage | undefined;
    const pageSections: Uint8Array[] = [];
    const pageCounts: DecodedPages = { pages: 0, zeroPages: 0 };
    const misplaced = (name: string): MigrationError => streamError(Code.Format, `${where}: misplaced ${name} section`);

    while (!reader.ended) {
      const section = await reader.next();
      if (section.type === SectionType.Error) throw streamError(Code.Format, `the file holds an Error section: ${decodeErrorSection(section.payload)}`);
      if (state.take(section)) {
        if (section.type === SectionType.Config && diff !== (state.config!.parent !== undefined)) {
          throw streamError(Code.Format, diff ? 'the Config section of a diff snapshot does not name its parent' : 'the Config section of a full snapshot names a parent');
        }
        continue;
      }
      if (section.type === SectionType.End) break; // state.finish() says what is missing
      state.expectComplete(section);
      switch (section.type) {
        case SectionType.RamImage:
          if (diff || ramImage) throw misplaced(section.name);
          ramImage = decodeRamImage(section.payload);
          break;
        case SectionType.Pages: {
          if (!diff) throw misplaced(section.name);
          const counts = decodePages(section.payload, header.memoryBytes, () => {});
          pageCounts.pages += counts.pages;
          pageCounts.zeroPages += counts.zeroPages;
          pageSections.push(section.payload);
          break;
        }
        default:
          throw misplaced(section.name);
      }
    }
    const parts = state.finish();

    const contents: SnapshotContents = {
      path: absolute,
      file: { dev, ino },
      header,
      config: parts.machine,
      vcpus: [...parts.vcpus],
      vm: parts.vm,
      devices: parts.devices,
    };
    if (diff) {
      contents.parent = { path: nodePath.resolve(nodePath.dirname(absolute), parts.parent!.path), id: header.parentId };
      contents.pageSections = pageSections;
      contents.pageCounts = pageCounts;
      contents.applyPages = (memory: Uint8Array): DecodedPages => {
        if (!(memory instanceof Uint8Array) || memory.length !== header.memoryBytes) {
          throw outOfRangeError(`memory must be a Uint8Array of the snapshot's RAM size (${header.memoryBytes} bytes)`);
        }
        const applied: DecodedPages = { pages: 0, zeroPages: 0 };
        for (const payload of pageSections) {
          const counts = decodePagesInto(payload, memory);
          applied.pages += counts.pages;
          applied.zeroPages += counts.zeroPages;
        }
        return applied;
      };
    } else {
      if (!ramImage) throw streamError(Code.Format, 'a full snapshot without a RamImage section');
      if (ramImage.sizeBytes !== header.memoryBytes) {
        throw streamError(Code.Format, `the RAM image holds ${ramImage.sizeBytes} bytes but the header gives ${header.memoryBytes} bytes of RAM`);
      }
      if (ramImage.fileOffset < source.position) {
        throw streamError(Code.Format, `the RAM image at offset ${ramImage.fileOffset} overlaps the sections, which end at ${source.position}`);
      }
      const end = ramImage.fileOffset + ramImage.sizeBytes;
      if (fileBytes < end) {
        throw streamError(Code.Truncated, `snapshot file truncated: the RAM image ends at byte ${end} but the file has ${fileBytes} bytes`);
      }
      contents.ramImage = ramImage;
      if (source.position <= MAX_KEPT_SECTIONS_BYTES) {
        decodedFiles.set(absolute, { sections: Buffer.concat(decoded.chunks, source.position), contents: copyState(contents) });
        if (decodedFiles.size > DECODED_FILES_KEPT) decodedFiles.delete(decodedFiles.keys().next().value!);
      }
    }
    return contents;
  } catch (error) {
    throw withPath(error, absolute);
  } finally {
    closeSync(file);
  }
}

/**
 * Reads the whole RAM image of a full snapshot and checks it against its CRC-32C (ECHECKSUM). At
 * the path `contents` was read from, only that file (EMISMATCH if another was renamed over it).
 */
export async function verifyRamImage(path: string, contents: SnapshotContents): Promise<void> {
  const image = contents.ramImage;
  if (!image) throw argTypeError('verifyRamImage needs the contents of a full snapshot (with ramImage)');
  const absolute = nodePath.resolve(path);
  const file = await open(absolute, 'r');
  try {
    if (absolute === contents.path) checkSameFile(contents, file.fd);
    const chunk = Buffer.allocUnsafe(Math.min(READ_CHUNK_BYTES, image.sizeBytes));
    let crc = 0;
    for (let done = 0; done < image.sizeBytes; done += chunk.length) {
      const view = chunk.subarray(0, Math.min(chunk.length, image.sizeBytes - done));
      await readFully(file, view, image.fileOffset + done, absolute);
      crc = crc32c(view, crc);
    }
    if (crc !== image.crc32c) throw streamError(Code.Checksum, `${absolute}: checksum mismatch in the RAM image`);
  } finally {
    await file.close();
  }
}

/**
 * The snapshot at `path` and the parents it is layered on, base (full) snapshot first. Each
 * parent's streamId, RAM size and vCPU count must match what its child expects (EMISMATCH).
 */
export async function openSnapshotChain(path: string): Promise<SnapshotContents[]> {
  const chain = [await readSnapshotFile(path)];
  while (chain[0].parent) {
    const child = chain[0];
    const parentPath = child.parent!.path;
    if (chain.length === MAX_SNAPSHOT_CHAIN) {
      throw streamError(Code.Format, `${chain.at(-1)!.path}: more than ${MAX_SNAPSHOT_CHAIN} diff snapshots layered on each other`);
    }
    const parent = await readSnapshotFile(parentPath);
    if (!sameId(parent.header.streamId, child.header.parentId)) {
      throw streamError(Code.Mismatch, `${child.path} is layered on snapshot ${hexId(child.header.parentId)}, but ${parentPath} is snapshot ${hexId(parent.header.streamId)}`);
    }
    if (parent.header.memoryBytes !== child.header.memoryBytes || parent.header.vcpuCount !== child.header.vcpuCount) {
      throw streamError(Code.Mismatch, `${child.path} and its parent ${parentPath} are snapshots of different machines (RAM size or vCPU count)`);
    }
    chain.unshift(parent);
  }
  return chain;
}

/** How loadSnapshotMemory() fills guest memory from a snapshot chain. */
export interface LoadSnapshotMemoryOptions {
  /**
   * `memory` is known to be all zeros (fresh anonymous memory): zero pages of the image are then
   * not written, so they are never faulted in. Default false (every page is written).
   */
  memoryIsZeroed?: boolean;
  /** Check the RAM image against its CRC-32C while reading it (ECHECKSUM; memory is then unusable). */
  verify?: boolean;
}

/**
 * Copies a chain from openSnapshotChain() into `memory` (all of guest RAM): the base snapshot's
 * RAM image, then each diff's pages in order. For a copy-on-write restore, mmap the base image
 * (chain[0].ramImage) instead and call applyPages() of each diff.
 */
export async function loadSnapshotMemory(chain: readonly SnapshotContents[], memory: Uint8Array, options: LoadSnapshotMemoryOptions = {}): Promise<void> {
  if (!Array.isArray(chain) || chain.length === 0) throw argTypeError('chain must be the non-empty array from openSnapshotChain()');
  const [base, ...diffs] = chain;
  const image = base.ramImage;
  if (!image) throw argTypeError('chain[0] must be a full snapshot (with ramImage)');
  if (!(memory instanceof Uint8Array) || memory.length !== image.sizeBytes) {
    throw outOfRangeError(`memory must be a Uint8Array of the snapshot's RAM size (${image.sizeBytes} bytes)`);
  }
  diffs.forEach((diff, index) => {
    if (!diff.applyPages) throw argTypeError(`chain[${index + 1}] must be a diff snapshot`);
  });
  const file = await open(base.path, 'r');
  try {
    const scratch = options.memoryIsZeroed ? Buffer.allocUnsafe(Math.min(READ_CHUNK_BYTES, image.sizeBytes)) : undefined;
    let crc = 0;
    for (let done = 0; done < image.sizeBytes; done += READ_CHUNK_BYTES) {
      const length = Math.min(READ_CHUNK_BYTES, image.sizeBytes - done);
      const target = memory.subarray(done, done + length);
      const bytes = scratch ? scratch.subarray(0, length) : target;
      await readFully(file, bytes, image.fileOffset + done, base.path);
      if (options.verify) crc = crc32c(bytes, crc);
      if (scratch) {
        forEachPageRun(bytes, (firstPageIndex, pageCount, zero) => {
          if (!zero) target.set(bytes.subarray(firstPageIndex * PAGE_SIZE, (firstPageIndex + pageCount) * PAGE_SIZE), firstPageIndex * PAGE_SIZE);
        });
      }
    }
    if (options.verify && crc !== image.crc32c) throw streamError(Code.Checksum, `${base.path}: checksum mismatch in the RAM image`);
  } finally {
    await file.close();
  }
  for (const diff of diffs) diff.applyPages!(memory);
}
