// Host calls around KVM that Node does not offer: locking and deallocating ranges of an image
// file, socket buffer sizes and duplicates, CRC-32C. The typed face of the addon's non-KVM calls,
// as the KVM handles are of its ioctls (eventfd.ts and thread.ts are the others).
import { checkInteger } from './handle.js';
import { native } from './native.js';
import { argValueError } from './errors.js';

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
 * CRC-32C (Castagnoli) of `data`, continuing from `seed`, with the SSE4.2 crc32 instruction where
 * the CPU has it (tables otherwise; `portable` forces them).
 */
export function crc32c(data: ArrayBufferView, seed = 0, portable = false): number {
  // The addon checks the arguments (a view, a 32-bit seed): this is the checksum's hot path.
  return native.crc32c(data, seed, portable);
}
