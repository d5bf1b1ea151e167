// Where a stream's bytes come from: memory, a socket, a file. Each hands out exactly the bytes a
// reader asks for, or fails with a MigrationError (ETRUNCATED when the bytes end first, ETIMEDOUT
// when a socket stalls). SectionReader (section-reader.ts) reads sections from any of them.
import { read as fsRead, readSync } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import type { Readable } from 'node:stream';
import { argTypeError, outOfRangeError } from '../kvm/errors.js';
import { MigrationError, MigrationErrorCode as Code } from './errors.js';

const MiB = 1024 * 1024;

/** Where a stream's bytes come from. */
export interface ByteSource {
  /**
   * Exactly `length` bytes, or a MigrationError (ETRUNCATED when the source ends first). `what`
   * names the thing being read, for the error message ("a Pages section").
   */
  read(length: number, what?: string): Promise<Uint8Array>;
}

function checkLength(length: number): void {
  if (!Number.isSafeInteger(length) || length < 0) throw outOfRangeError(`length must be a non-negative integer, got ${length}`);
}

/** A ByteSource over bytes in memory. */
export class BufferSource implements ByteSource {
  readonly #bytes: Uint8Array;
  #position = 0;

  constructor(bytes: Uint8Array) {
    if (!(bytes instanceof Uint8Array)) throw argTypeError('bytes must be a Uint8Array');
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
      throw new MigrationError(Code.Truncated, `migration stream truncated: expected ${length} bytes of ${what}, got ${available}`);
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
  #failure: MigrationError | undefined;
  #pending: { length: number; what: string; resolve: (bytes: Uint8Array) => void; reject: (error: MigrationError) => void } | undefined;
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
    this.#fail(new MigrationError(Code.Truncated, `migration stream truncated: peer closed the migration stream after ${this.#received} bytes`), true);
  };

  readonly #onError = (error: Error): void => {
    this.#fail(new MigrationError(Code.Truncated, `migration stream failed after ${this.#received} bytes: ${error.message}`, { cause: error }), false);
  };

  constructor(socket: Readable, timeoutMs: number) {
    if (typeof socket !== 'object' || socket === null || typeof socket.on !== 'function' || typeof socket.pause !== 'function') {
      throw argTypeError('socket must be a net.Socket or a Readable stream');
    }
    if (typeof timeoutMs !== 'number' || !(timeoutMs > 0) || (Number.isFinite(timeoutMs) && timeoutMs > 0x7fffffff)) {
      throw outOfRangeError(`timeoutMs must be a positive number of ms up to ${0x7fffffff} (or Infinity), got ${String(timeoutMs)}`);
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
    if (this.#closed) return Promise.reject(new MigrationError(Code.InvalidState, 'the SocketSource is closed'));
    if (this.#pending) return Promise.reject(new MigrationError(Code.InvalidState, 'a read is already waiting: read one thing at a time'));
    if (this.#buffered >= length) return Promise.resolve(this.#take(length));
    if (this.#failure) return Promise.reject(this.#describe(this.#failure, length, what));
    return new Promise((resolve, reject) => {
      this.#pending = { length, what, resolve, reject };
      this.#startTimer();
      if (this.#socket.isPaused()) this.#socket.resume();
    });
  }

  /**
   * Closes this source and returns the bytes it had received but not handed out, in order, then
   * those the socket holds unread (the socket is left paused, nothing unread): for a caller that
   * reads the rest of the stream another way, and takes the socket over before the event loop
   * turns again (taking its unread bytes may restart its reading).
   */
  detach(): Uint8Array[] {
    if (this.#pending) throw new MigrationError(Code.InvalidState, 'a read is waiting: detach() only between reads');
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
    // A socket paused while this source held too much (see #onData) goes on reading until its own
    // buffer is full (its high-water mark): those bytes come after the ones above.
    const socket = this.#socket;
    socket.pause();
    while (socket.readableLength > 0) {
      const chunk = socket.read() as Buffer | string | null;
      if (chunk === null) break;
      rest.push(typeof chunk === 'string' ? Buffer.from(chunk) : chunk);
    }
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
    pending?.reject(new MigrationError(Code.Truncated, `migration stream closed locally while waiting for ${pending.length} bytes of ${pending.what}`));
  }

  #describe(failure: MigrationError, length: number, what: string): MigrationError {
    return new MigrationError(failure.code, `${failure.message} (expected ${length} bytes of ${what}, got ${this.#buffered})`, { cause: failure.cause });
  }

  #fail(failure: MigrationError, ended: boolean): void {
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
      this.#fail(new MigrationError(Code.TimedOut, `migration stream stalled: no data for ${this.#timeoutMs} ms after ${this.#received} bytes`), false);
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

/** What a FileSource reads at a time for small reads. */
const READ_AHEAD_BYTES = 256 * 1024;

/** A ByteSource over a file (an fd or a FileHandle), reading with pread from `startOffset` on. */
export class FileSource implements ByteSource {
  readonly #file: number | FileHandle;
  #position: number;
  /** Bytes read ahead, from file offset #aheadStart. */
  #ahead: Uint8Array | undefined;
  #aheadStart = 0;

  readonly #sync: boolean;
  readonly #readAheadBytes: number;

  /**
   * `sync`: read a file descriptor with readSync (small files read at once, no thread-pool trips).
   * `readAheadBytes`: what a small read fetches at once (default 256 KiB).
   * `ahead`: the file's bytes from `startOffset` on, read already (served before the file is read again).
   */
  constructor(file: number | FileHandle, startOffset = 0, options: { sync?: boolean; readAheadBytes?: number; ahead?: Uint8Array } = {}) {
    if (typeof file === 'number') {
      if (!Number.isInteger(file) || file < 0) throw outOfRangeError(`file must be a file descriptor, got ${file}`);
    } else if (typeof file !== 'object' || file === null || typeof file.read !== 'function') {
      throw argTypeError('file must be a file descriptor or a FileHandle');
    }
    checkLength(startOffset);
    this.#file = file;
    this.#position = startOffset;
    this.#sync = options.sync === true && typeof file === 'number';
    this.#readAheadBytes = options.readAheadBytes ?? READ_AHEAD_BYTES;
    checkLength(this.#readAheadBytes);
    if (options.ahead !== undefined) {
      if (!(options.ahead instanceof Uint8Array)) throw argTypeError('ahead must be a Uint8Array');
      this.#ahead = options.ahead;
      this.#aheadStart = startOffset;
    }
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
    const aheadBytes = this.#readAheadBytes;
    if (length < aheadBytes) {
      // Small reads (a snapshot's sections before its RAM image) come from one bigger read: one
      // trip to the thread pool instead of one per section header and payload.
      const block = Buffer.allocUnsafe(aheadBytes);
      let got = 0;
      while (got < length) {
        const more = await this.#pread(block, got, aheadBytes - got, start + got);
        if (more === 0) break;
        got += more;
      }
      if (got < length) {
        this.#position = start + got;
        throw new MigrationError(Code.Truncated, `snapshot file truncated: expected ${length} bytes of ${what} at offset ${start}, got ${got}`);
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
        throw new MigrationError(Code.Truncated, `snapshot file truncated: expected ${length} bytes of ${what} at offset ${start}, got ${filled}`);
      }
      filled += got;
    }
    this.#position = start + length;
    return bytes;
  }

  #pread(into: Uint8Array, offset: number, length: number, position: number): Promise<number> {
    const file = this.#file;
    if (typeof file !== 'number') return file.read(into, offset, length, position).then((result) => result.bytesRead);
    if (this.#sync) {
      try {
        return Promise.resolve(readSync(file, into, offset, length, position));
      } catch (error) {
        return Promise.reject(error);
      }
    }
    return new Promise((resolve, reject) => {
      fsRead(file, into, offset, length, position, (error, bytesRead) => (error ? reject(error) : resolve(bytesRead)));
    });
  }
}

export function fileSource(file: number | FileHandle, startOffset = 0): FileSource {
  return new FileSource(file, startOffset);
}
