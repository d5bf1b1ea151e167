// Snapshot files: the stream format (format.ts) written to a file.
//
// Full snapshot ('snapshot'):
//   header, the state (Config, VmState, VcpuState x vcpuCount, DeviceState: state-sections.ts),
//   RamImage, End, zero padding to a 4096-byte boundary, then guest RAM as a raw image of
//   memoryBytes bytes.
// The image is page-aligned so that a restore can mmap it copy-on-write, and sparse: zero pages are
// never written (the file is extended over them), so an idle guest makes a small file. Its
// CRC-32C is in the RamImage section; checking it means reading the whole image, so only
// verifyRamImage() and loadSnapshotMemory({ verify: true }) do it.
//
// Diff snapshot ('diff-snapshot'):
//   header (parentId = the parent's streamId), the state (its Config names the parent's path),
//   Pages sections holding only the pages written since the parent, End.
// A diff snapshot's zero pages are recorded as zero ranges: the parent may hold data there.
//
// Written here; read by snapshot-read.ts, whose API this module passes on. Files of another
// format version are refused (EVERSION).
//
// A snapshot is written to a new file beside `<path>` with a random name, fsync'd, then renamed
// over `<path>`, so a crash never leaves a partial snapshot under the real name. That file is
// created exclusively and never through a symlink: whoever else can write the directory cannot
// redirect the write. Only a regular file (or nothing) at `<path>` is replaced. An abort (the
// signal option) or any failure removes the new file.
import { randomBytes } from 'node:crypto';
import { constants as fsConstants, type Stats } from 'node:fs';
import { lstat, open, rename, unlink, type FileHandle } from 'node:fs/promises';
import nodePath from 'node:path';
import { PAGE_SIZE } from '../kvm/constants.js';
import { argTypeError, argValueError, outOfRangeError } from '../kvm/errors.js';
import type { PageRange } from '../vmm/page-ranges.js';
import { crc32c, crc32cZeros } from './checksum.js';
import { MigrationError, MigrationErrorCode as Code, checkSignal, streamError, throwIfAborted } from './errors.js';
import { RAM_IMAGE_PAYLOAD_BYTES, SECTION_OVERHEAD_BYTES, decodeHeader, encodeEnd, encodeHeader, encodeRamImage, hexId } from './format.js';
import { encodePages, forEachPageRun } from './pages.js';
import { readSnapshotHeader, sameId, type SnapshotKind, type SnapshotParent } from './snapshot-read.js';
import { encodeStateSections } from './state-sections.js';

export {
  MAX_SNAPSHOT_CHAIN, loadSnapshotMemory, openSameSnapshotFile, openSnapshotChain, readSnapshotFile, verifyRamImage,
  type FileIdentity, type LoadSnapshotMemoryOptions, type SnapshotContents, type SnapshotKind, type SnapshotParent,
} from './snapshot-read.js';

/** What writeSnapshotFile() writes: the kind, the machine's shape and state, its memory, and for a diff the parent and pages. */
export interface WriteSnapshotOptions {
  kind: SnapshotKind;
  memoryBytes: number;
  vcpuCount: number;
  /** Required for a diff snapshot: the snapshot it is layered on. */
  parent?: SnapshotParent;
  /** Machine configuration, state-codec encodable. */
  config: unknown;
  /** One state object per vCPU, in vCPU index order. */
  vcpus: readonly unknown[];
  vm: unknown;
  devices: unknown;
  /** All of guest RAM (memoryBytes long), read while the guest is paused. */
  memory: Uint8Array;
  /** Diff snapshots: the pages to record (written since the parent). */
  pages?: readonly PageRange[];
  /**
   * Full snapshots, optional: the only [offset, byteLength] ranges of `memory` that may be
   * non-zero. Everything else is taken as zero without being read.
   */
  populated?: readonly (readonly [number, number])[];
  /** Aborting stops the write (ABORT_ERR) and removes the new file. */
  signal?: AbortSignal;
}

/** What writeSnapshotFile() wrote. */
export interface WriteSnapshotResult {
  /** The snapshot's streamId: pass it as parent.id when layering a diff snapshot on it. */
  id: Uint8Array;
  /** Bytes actually written (sections and non-zero pages; holes not counted). */
  bytesWritten: number;
  /** Pages written with their data. */
  pagesWritten: number;
  /** Zero pages: holes in a full snapshot, zero ranges in a diff snapshot. */
  zeroPagesSkipped: number;
  /** The file's size (a full snapshot's includes the holes of its RAM image). */
  fileBytes: number;
}

/** Largest single write of RAM image data. */
const WRITE_CHUNK_BYTES = 16 * 1024 * 1024;

const alignUp = (value: number, alignment: number): number => Math.ceil(value / alignment) * alignment;
async function writeFully(file: FileHandle, bytes: Uint8Array, position: number): Promise<void> {
  let done = 0;
  while (done < bytes.length) {
    const { bytesWritten } = await file.write(bytes, done, bytes.length - done, position + done);
    done += bytesWritten;
  }
}

/** Sorted, merged, page-aligned [start, end) byte ranges from a `populated` hint. */
function populatedRegions(populated: readonly (readonly [number, number])[], memoryBytes: number): [number, number][] {
  if (!Array.isArray(populated)) throw argTypeError('populated must be an array of [offset, byteLength]');
  const regions = populated.map((entry, index): [number, number] => {
    if (!Array.isArray(entry) || entry.length !== 2) throw argTypeError(`populated[${index}] must be [offset, byteLength]`);
    const [offset, length] = entry;
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > memoryBytes) {
      throw outOfRangeError(`populated[${index}] = [${String(offset)}, ${String(length)}] must lie within guest RAM (${memoryBytes} bytes)`);
    }
    return [Math.floor(offset / PAGE_SIZE) * PAGE_SIZE, alignUp(offset + length, PAGE_SIZE)];
  });
  regions.sort((a, b) => a[0] - b[0]);
  const merged: [number, number][] = [];
  for (const region of regions) {
    if (region[0] === region[1]) continue;
    const last = merged.at(-1);
    if (last && region[0] <= last[1]) last[1] = Math.max(last[1], region[1]);
    else merged.push(region);
  }
  return merged;
}

function checkWriteOptions(options: WriteSnapshotOptions): void {
  if (typeof options !== 'object' || options === null) throw argTypeError('options must be an object');
  checkSignal(options.signal, 'options.signal');
  const { kind, memoryBytes, vcpuCount, memory } = options;
  if (kind !== 'snapshot' && kind !== 'diff-snapshot') throw argValueError(`kind must be 'snapshot' or 'diff-snapshot', got ${String(kind)}`);
  if (!(memory instanceof Uint8Array)) throw argTypeError('memory must be a Uint8Array holding all of guest RAM');
  if (memory.length !== memoryBytes) throw outOfRangeError(`memory must be memoryBytes (${String(memoryBytes)}) long, got ${memory.length} bytes`);
  if (!Array.isArray(options.vcpus)) throw argTypeError('vcpus must be an array of per-vCPU state objects');
  if (options.vcpus.length !== vcpuCount) throw outOfRangeError(`vcpus must hold vcpuCount (${String(vcpuCount)}) states, got ${options.vcpus.length}`);
  if (kind === 'diff-snapshot') {
    if (!options.parent || typeof options.parent.path !== 'string' || options.parent.path === '') {
      throw argTypeError('a diff snapshot needs parent: { path, id } of the snapshot it is layered on');
    }
    if (!Array.isArray(options.pages)) throw argTypeError('a diff snapshot needs pages: the page ranges written since its parent');
    if (options.populated !== undefined) throw argTypeError('populated is for full snapshots; a diff snapshot records exactly its pages');
  } else {
    if (options.parent !== undefined) throw argTypeError('parent is only for diff snapshots');
    if (options.pages !== undefined) throw argTypeError('pages is only for diff snapshots; a full snapshot records all of RAM');
  }
}

/** A file that did not exist, opened for writing, never through a symlink. */
const CREATE_NEW_FILE = fsConstants.O_WRONLY | fsConstants.O_CREAT | fsConstants.O_EXCL | fsConstants.O_NOFOLLOW;

function fileType(stats: Stats): string {
  if (stats.isDirectory()) return 'a directory';
  if (stats.isSymbolicLink()) return 'a symbolic link';
  if (stats.isSocket()) return 'a socket';
  if (stats.isFIFO()) return 'a FIFO';
  if (stats.isCharacterDevice()) return 'a character device';
  if (stats.isBlockDevice()) return 'a block device';
  return 'of an unknown type';
}

/**
 * An fs error from writing the snapshot `target`, saying which file and what failed; it keeps the
 * system error's code ('ENOSPC', ...). Node's own message names only the syscall.
 */
function snapshotWriteError(error: unknown, target: string, doing: string): unknown {
  const system = error as NodeJS.ErrnoException;
  if (!(error instanceof Error) || typeof system.code !== 'string') return error;
  // 'ENOSPC: no space left on device, write': the syscall and the temporary file's path say little.
  const reason = system.syscall === undefined ? system.message : system.message.split(`, ${system.syscall}`)[0];
  return new MigrationError(system.code, `cannot write the snapshot ${target}: ${doing}: ${reason}`, { cause: error });
}

/** Refuses to replace anything at `target` but a regular file: an API socket, a device, a directory, a symlink. */
async function checkSnapshotTarget(target: string): Promise<void> {
  let stats: Stats;
  try {
    stats = await lstat(target);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') return;
    throw snapshotWriteError(error, target, 'checking what is at that path');
  }
  if (!stats.isFile()) throw new MigrationError(Code.NotRegularFile, `refusing to write a snapshot over ${target}: it is ${fileType(stats)}, not a regular file`);
}

/**
 * Writes a full or diff snapshot to `path` (through a new file beside it, fsync, rename). State
 * values are encoded with encodeState(). For a diff, the parent file's header is checked against
 * parent.id. Anything but a regular file at `path` is refused, and a failure leaves nothing behind.
 */
export async function writeSnapshotFile(path: string, options: WriteSnapshotOptions): Promise<WriteSnapshotResult> {
  if (typeof path !== 'string' || path === '') throw argTypeError('path must be a non-empty string');
  checkWriteOptions(options);
  const { kind, memoryBytes, vcpuCount, memory, signal } = options;
  const target = nodePath.resolve(path);
  const diff = kind === 'diff-snapshot';
  const what = `writing the snapshot ${target}`;
  throwIfAborted(signal, what);
  await checkSnapshotTarget(target);
  // Each step checks the signal first: an abort stops the write at the next step.
  const step = <T>(doing: string, operation: () => Promise<T>): Promise<T> => {
    throwIfAborted(signal, what);
    return operation().catch((error: unknown) => {
      throw snapshotWriteError(error, target, doing);
    });
  };

  let parentRecord: { path: string } | undefined;
  let parentId: Uint8Array | undefined;
  if (diff) {
    const parent = options.parent!;
    const parentPath = nodePath.resolve(parent.path);
    const parentHeader = await readSnapshotHeader(parentPath);
    if (!(parent.id instanceof Uint8Array) || !sameId(parentHeader.streamId, parent.id)) {
      throw streamError(Code.Mismatch, `${parentPath} is snapshot ${hexId(parentHeader.streamId)}, not the parent expected (${parent.id instanceof Uint8Array ? hexId(parent.id) : 'no id'})`);
    }
    if (parentHeader.kind === 'migration') throw streamError(Code.Format, `${parentPath} is a migration stream, not a snapshot`);
    if (parentHeader.memoryBytes !== memoryBytes || parentHeader.vcpuCount !== vcpuCount) {
      throw streamError(Code.Mismatch, `${parentPath} is a snapshot of a machine with ${parentHeader.memoryBytes} bytes of RAM and ${parentHeader.vcpuCount} vCPUs, not ${memoryBytes} and ${vcpuCount}`);
    }
    parentRecord = { path: nodePath.relative(nodePath.dirname(target), parentPath) };
    parentId = parentHeader.streamId;
  }

  // Everything but the RAM image, encoded before the file is touched (bad state fails early).
  const header = encodeHeader({ kind, memoryBytes, vcpuCount, parentId });
  const id = decodeHeader(header).streamId;
  const sections: Uint8Array[] = [
    header,
    ...encodeStateSections({ machine: options.config, parent: parentRecord, vm: options.vm, vcpus: options.vcpus, devices: options.devices }),
  ];

  let pagesWritten = 0;
  let zeroPagesSkipped = 0;
  if (diff) {
    const pages = encodePages(options.pages!, (guestPhysAddr, byteLength) => memory.subarray(guestPhysAddr, guestPhysAddr + byteLength), { memoryBytes });
    sections.push(...pages.sections);
    pagesWritten = pages.pagesSent;
    zeroPagesSkipped = pages.zeroPages;
  }
  const regions = !diff && options.populated !== undefined ? populatedRegions(options.populated, memoryBytes) : [[0, memoryBytes] as [number, number]];

  // Unpredictable, so that nobody can plant anything at it beforehand (O_EXCL refuses it anyway).
  const temporary = `${target}.${randomBytes(8).toString('hex')}.tmp`;
  throwIfAborted(signal, what);
  const file = await step('creating a new file beside it', () => open(temporary, CREATE_NEW_FILE, 0o600));
  let bytesWritten = 0;
  let fileBytes: number;
  try {
    let position = 0;
    const sectionsBytes = sections.reduce((sum, section) => sum + section.length, 0);
    if (diff) {
      sections.push(encodeEnd());
      fileBytes = sectionsBytes + SECTION_OVERHEAD_BYTES;
    } else {
      const ramOffset = alignUp(sectionsBytes + SECTION_OVERHEAD_BYTES + RAM_IMAGE_PAYLOAD_BYTES + SECTION_OVERHEAD_BYTES, PAGE_SIZE);
      let crc = 0;
      let crcEnd = 0; // RAM bytes the CRC covers so far
      for (const [start, end] of regions) {
        crc = crc32cZeros(crc, start - crcEnd);
        const runs: [number, number][] = [];
        forEachPageRun(memory.subarray(start, end), (firstPageIndex, pageCount, zero) => {
          if (!zero) runs.push([start + firstPageIndex * PAGE_SIZE, pageCount * PAGE_SIZE]);
        });
        crcEnd = start;
        for (const [runStart, runBytes] of runs) {
          crc = crc32cZeros(crc, runStart - crcEnd);
          for (let done = 0; done < runBytes; done += WRITE_CHUNK_BYTES) {
            const chunk = memory.subarray(runStart + done, runStart + Math.min(runBytes, done + WRITE_CHUNK_BYTES));
            crc = crc32c(chunk, crc);
            await step('writing the RAM image', () => writeFully(file, chunk, ramOffset + runStart + done));
          }
          crcEnd = runStart + runBytes;
          pagesWritten += runBytes / PAGE_SIZE;
          bytesWritten += runBytes;
        }
        crc = crc32cZeros(crc, end - crcEnd);
        crcEnd = end;
      }
      crc = crc32cZeros(crc, memoryBytes - crcEnd);
      zeroPagesSkipped = memoryBytes / PAGE_SIZE - pagesWritten;
      sections.push(encodeRamImage({ fileOffset: ramOffset, sizeBytes: memoryBytes, crc32c: crc }), encodeEnd());
      fileBytes = ramOffset + memoryBytes;
    }
    for (const section of sections) {
      await step('writing its sections', () => writeFully(file, section, position));
      position += section.length;
      bytesWritten += section.length;
    }
    // Extends the file over trailing zero pages without allocating them.
    await step('extending it over the zero pages', () => file.truncate(fileBytes));
    await step('flushing it to disk', () => file.sync());
    await step('closing it', () => file.close());
    // Something may have been put there while the snapshot was written.
    await checkSnapshotTarget(target);
    throwIfAborted(signal, what);
    await step('renaming it into place', () => rename(temporary, target));
  } catch (error) {
    await file.close().catch(() => {});
    await unlink(temporary).catch(() => {});
    throw error;
  }
  await syncDirectory(nodePath.dirname(target));
  return { id, bytesWritten, pagesWritten, zeroPagesSkipped, fileBytes };
}

/** Makes the rename durable; some filesystems refuse fsync on a directory, which costs nothing here. */
async function syncDirectory(directory: string): Promise<void> {
  try {
    const handle = await open(directory, 'r');
    try {
      await handle.sync();
    } finally {
      await handle.close();
    }
  } catch {
    // Durability of the rename is best effort; the snapshot itself is already on disk.
  }
}
