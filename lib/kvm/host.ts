// Host calls around KVM that Node does not offer: locking, duplicating and deallocating ranges of
// an image file, socket buffer sizes and duplicates, passing fds over a unix socket, CRC-32C. The typed face of the addon's non-KVM calls,
// as the KVM handles are of its ioctls (eventfd.ts and thread.ts are the others).
import { checkInteger } from './handle.js';
import { native } from './native.js';
import { argTypeError, argValueError, outOfRangeError } from './errors.js';

export type FileLockKind = 'shared' | 'exclusive';

/**
 * Locks the whole file open at `fd` with an open-file-description lock (F_OFD_SETLK), as QEMU
 * locks its disk images: 'shared' for readers, 'exclusive' for a writer. It belongs to that open
 * file, not to the process (two opens in one process conflict), and goes with its last fd.
 * Returns false, without waiting, where another open file holds a conflicting lock.
 */
export function lockFile(fd: number, kind: FileLockKind): boolean {
  checkInteger(fd, 'fd', 0, 0x7fffffff);
  if (kind !== 'shared' && kind !== 'exclusive') throw argValueError(`kind must be 'shared' or 'exclusive', got ${String(kind)}`);
  try {
    native.fileLock(fd, kind);
    return true;
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'EAGAIN') return false;
    throw error;
  }
}

/** Releases the lock lockFile() took on `fd`. */
export function unlockFile(fd: number): void {
  checkInteger(fd, 'fd', 0, 0x7fffffff);
  native.fileLock(fd, 'unlock');
}

/**
 * fallocate(2) keeping the file's size: `zero` false punches a hole (the blocks go back to the
 * file system and read as zeros); true zeroes the range in place. Throws a KvmError with code
 * EOPNOTSUPP where the file system cannot, so the caller can fall back to writing zeros.
 */
export function deallocateFileRange(fd: number, offset: number, length: number, zero: boolean): void {
  native.fileDeallocate(fd, offset, length, zero);
}

/**
 * Where the file open at `fd` holds data within [start, end) (lseek SEEK_DATA/SEEK_HOLE): byte
 * ranges rounded out to 4 KiB and clamped to the range; the rest are holes, which read as zeros.
 * It moves the fd's file position (read it with positions).
 */
export function fileDataRanges(fd: number, start: number, end: number): Array<[offset: number, length: number]> {
  checkInteger(fd, 'fd', 0, 0x7fffffff);
  const pairs = native.fileDataRanges(fd, start, end);
  const ranges: Array<[number, number]> = [];
  for (let i = 0; i < pairs.length; i += 2) ranges.push([pairs[i]!, pairs[i + 1]!]);
  return ranges;
}

/**
 * Which file `fd` is (fstat()'s device and inode, exact), its size and whether it is a regular
 * file: without the Date objects of fs.fstatSync(), which cost more than the syscall.
 */
export function fileIdentity(fd: number): { dev: bigint; ino: bigint; size: number; regular: boolean } {
  checkInteger(fd, 'fd', 0, 0x7fffffff);
  const [dev, ino, size, regular] = native.fileIdentity(fd);
  return { dev, ino, size, regular };
}

/**
 * Sets a socket's SO_SNDBUF and SO_RCVBUF (the kernel caps them at net.core.wmem_max/rmem_max);
 * returns the sizes the kernel then reports.
 */
export function setSocketBuffers(fd: number, sendBytes: number, receiveBytes: number): [sendBytes: number, receiveBytes: number] {
  checkInteger(fd, 'fd', 0, 0x7fffffff);
  checkInteger(sendBytes, 'sendBytes', 1, 0x7fffffff);
  checkInteger(receiveBytes, 'receiveBytes', 1, 0x7fffffff);
  return native.setSocketBuffers(fd, sendBytes, receiveBytes);
}

/** A close-on-exec duplicate of the stream socket `fd` (dup(2)). */
export function dupSocket(fd: number): number {
  checkInteger(fd, 'fd', 0, 0x7fffffff);
  return native.dupSocket(fd);
}

/**
 * One read from the stream socket `fd` into `buffer`, this thread spinning for `maxMs` at most
 * (0..1000) until something comes, never sleeping: the number of bytes read, 0 at the end of the
 * stream, -1 if nothing came in time. For the moments a peer is known to be about to send: a
 * thread woken from a wait takes 0.1-0.3 ms to run again on a virtualized host, and runs on cold
 * caches. A failure of the socket throws (a SystemError).
 */
export function spinRead(fd: number, buffer: Uint8Array, maxMs: number): number {
  checkInteger(fd, 'fd', 0, 0x7fffffff);
  if (!(buffer instanceof Uint8Array)) throw argTypeError('buffer must be a Uint8Array');
  if (buffer.length === 0) throw outOfRangeError('buffer must not be empty');
  if (typeof maxMs !== 'number') throw argTypeError(`maxMs must be a number, got ${typeof maxMs}`);
  if (!(maxMs >= 0 && maxMs <= 1000)) throw outOfRangeError(`maxMs must be 0..1000, got ${maxMs}`);
  return native.spinRead(fd, buffer, maxMs);
}

/**
 * Writes all of `data` on the unix stream socket `socketFd` with the file descriptors `fds`
 * attached (SCM_RIGHTS): the process at the other end receives duplicates of them, the same open
 * files. The socket may be one Node owns, as long as none of Node's own writes is still queued.
 * A full socket buffer is waited out for a few seconds at most (ETIMEDOUT).
 */
export function sendWithFds(socketFd: number, data: Uint8Array, fds: readonly number[]): void {
  checkInteger(socketFd, 'socketFd', 0, 0x7fffffff);
  if (!(data instanceof Uint8Array)) throw argTypeError('data must be a Uint8Array');
  if (!Array.isArray(fds)) throw argTypeError('fds must be an array of file descriptors');
  native.sendWithFds(socketFd, data, [...fds]);
}

/** What receiveWithFds() read: bytes (empty: the peer closed), the fds with them, whether some were dropped. */
export interface ReceivedWithFds {
  bytes: Uint8Array;
  /** Open, close-on-exec: the caller must close every one, whatever it makes of them. */
  fds: number[];
  /** More came than `maxFds` (closed), or the kernel dropped some. */
  fdsDropped: boolean;
}

/**
 * One read of at most `maxBytes` from the unix stream socket `socketFd` with the file
 * descriptors that came with those bytes; null if nothing has arrived (a non-blocking socket). The
 * socket must be one that nothing else reads: a read without room for them (Node's own) would
 * lose the descriptors.
 */
export function receiveWithFds(socketFd: number, maxBytes: number, maxFds: number): ReceivedWithFds | null {
  checkInteger(socketFd, 'socketFd', 0, 0x7fffffff);
  const received = native.receiveWithFds(socketFd, maxBytes, maxFds);
  if (received === null) return null;
  const [bytes, fds, fdsDropped] = received;
  return { bytes, fds, fdsDropped };
}

/**
 * A close-on-exec duplicate of `fd`, which must be a regular file or block device open for
 * reading (and for writing if `writable`): the same open file, with its offset and OFD locks.
 */
export function dupFile(fd: number, writable: boolean): number {
  checkInteger(fd, 'fd', 0, 0x7fffffff);
  return native.fileDup(fd, writable === true);
}

/**
 * CRC-32C (Castagnoli) of `data`, continuing from `seed`, with the SSE4.2 crc32 instruction where
 * the CPU has it (tables otherwise; `portable` forces them).
 */
export function crc32c(data: ArrayBufferView, seed = 0, portable = false): number {
  // The addon checks the arguments (a view, a 32-bit seed): this is the checksum's hot path.
  return native.crc32c(data, seed, portable);
}

/**
 * The pages of `rangeCount` (firstPage, pageCount) pairs of `ram` as one migration-stream Pages
 * section in `out` (the layout of lib/migration/pages.ts): maximal runs of data and of zero pages
 * (zero pages left out with `destinationZeroed`), the data copied and checksummed in one pass.
 * Returns the section's length (0: nothing to send), the data pages and the zero pages.
 */
export function encodePagesSection(
  ram: Uint8Array, ranges: Float64Array, rangeCount: number, destinationZeroed: boolean, out: Uint8Array, sectionType: number,
): [sectionBytes: number, pagesSent: number, zeroPages: number] {
  // The addon checks the arguments: this is the source's hot path.
  return native.encodePagesSection(ram, ranges, rangeCount, destinationZeroed, out, sectionType);
}

/**
 * encodePagesSection() as a live section (lib/migration/pages.ts), the data left in guest RAM:
 * `out` gets the section's header and range table (headBytes), then the 8 bytes that go after the
 * data (the data's CRC, then the section's CRC, which leaves the data out); `dataRuns` gets the
 * [byteOffset, byteLength] in `ram` of each run of data, to be sent in order between the two.
 * Returns headBytes (0: nothing to send), the data pages, the zero pages and the data runs.
 */
export function encodeLivePagesSection(
  ram: Uint8Array, ranges: Float64Array, rangeCount: number, destinationZeroed: boolean, out: Uint8Array, sectionType: number, dataRuns: Float64Array,
): [headBytes: number, pagesSent: number, zeroPages: number, dataRunCount: number] {
  return native.encodeLivePagesSection(ram, ranges, rangeCount, destinationZeroed, out, sectionType, dataRuns);
}

/**
 * Leaves the whole pages of `buffer` out of the processes this one forks (every child process Node
 * spawns): the parent then writes them again without a copy-on-write fault per page. For buffers
 * only this process uses, written over and over (a migration source's section buffers). Best
 * effort: false if the kernel refused.
 */
export function keepFromChildren(buffer: ArrayBuffer): boolean {
  if (!(buffer instanceof ArrayBuffer)) throw argTypeError('buffer must be an ArrayBuffer');
  return native.keepFromChildren(buffer);
}
