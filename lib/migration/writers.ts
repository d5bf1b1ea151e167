// Writing a stream to a socket: chunks in order, with backpressure (writeChunks, for the
// destination's few replies), or queued as fast as the socket takes them (queueChunks, for the
// source's pages, built in recycled buffers).
import type { Socket } from 'node:net';
import type { Writable } from 'node:stream';
import { argTypeError } from '../kvm/errors.js';
import { keepFromChildren } from '../kvm/host.js';
import { MigrationError, MigrationErrorCode as Code } from './errors.js';

/**
 * Writes `chunks` in order, waiting for 'drain' whenever the socket's buffer is full, and resolves
 * once the last one has been handed to the kernel. Rejects (ECLOSED) if the socket errors or
 * closes first.
 */
export function writeChunks(socket: Writable, chunks: readonly Uint8Array[]): Promise<void> {
  if (typeof socket !== 'object' || socket === null || typeof socket.write !== 'function') {
    return Promise.reject(argTypeError('socket must be a net.Socket or a Writable stream'));
  }
  if (!Array.isArray(chunks) || !chunks.every((chunk) => chunk instanceof Uint8Array)) {
    return Promise.reject(argTypeError('chunks must be an array of Uint8Array'));
  }
  return new Promise((resolve, reject) => {
    if (socket.destroyed || socket.writableEnded) {
      reject(new MigrationError(Code.Closed, 'cannot write the migration stream: the connection is closed'));
      return;
    }
    if (chunks.length === 0) {
      resolve();
      return;
    }
    let index = 0;
    let settled = false;
    const settle = (error?: MigrationError): void => {
      if (settled) return;
      settled = true;
      socket.off('drain', pump);
      socket.off('error', onError);
      socket.off('close', onClose);
      if (error) reject(error);
      else resolve();
    };
    const onError = (error: Error): void => settle(new MigrationError(Code.Closed, `writing the migration stream failed: ${error.message}`, { cause: error }));
    const onClose = (): void => settle(new MigrationError(Code.Closed, 'the connection closed while the migration stream was being written'));
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

/**
 * Page sections are built in recycled buffers: a fresh 2 MiB buffer per section costs as much in
 * page faults (and garbage collection) as copying the data into it. The idle ones are shared by
 * every migration of the process and kept a while after the last one: a migration's 8-10 MiB of
 * fresh buffers cost its source 4-5 ms of page faults and zeroing, on CPUs a destination on the
 * same host needs as much.
 */
export class SectionBufferPool {
  static readonly SLAB_BYTES = 2 * 1024 * 1024 + 64 * 1024;
  static readonly MAX_IDLE = 8;
  /** How long idle buffers outlive their last use. */
  static readonly KEEP_MS = 10_000;
  static readonly #idle: ArrayBuffer[] = [];
  static #dropTimer: NodeJS.Timeout | undefined;

  readonly allocate = (byteLength: number): Uint8Array => {
    if (byteLength > SectionBufferPool.SLAB_BYTES) return new Uint8Array(byteLength);
    const slab = SectionBufferPool.#idle.pop() ?? SectionBufferPool.#newSlab();
    return new Uint8Array(slab, 0, byteLength);
  };

  static #newSlab(): ArrayBuffer {
    const slab = new ArrayBuffer(SectionBufferPool.SLAB_BYTES);
    // Node forks for every process it spawns: each slab page written after that would be copied
    // first (4-5 ms of page faults per migration in a process that spawns one per migration).
    keepFromChildren(slab);
    return slab;
  }

  /** Once the socket has written it (its write callback). */
  release(chunk: Uint8Array): void {
    const slab = chunk.buffer;
    const idle = SectionBufferPool.#idle;
    if (slab.byteLength !== SectionBufferPool.SLAB_BYTES || !(slab instanceof ArrayBuffer) || idle.length >= SectionBufferPool.MAX_IDLE) return;
    idle.push(slab);
    if (SectionBufferPool.#dropTimer) SectionBufferPool.#dropTimer.refresh();
    else SectionBufferPool.#dropTimer = setTimeout(() => {
      idle.length = 0;
      SectionBufferPool.#dropTimer = undefined;
    }, SectionBufferPool.KEEP_MS).unref();
  }
}

/** How much may wait in the socket's user-space queue before the sender stops to let it drain. */
const QUEUE_HIGH_WATER_BYTES = 8 * 1024 * 1024;

/**
 * Queues `chunks` on the socket and returns at once unless too much is queued: the next batch is
 * then encoded while the kernel and the destination take this one (a write callback per batch
 * would leave one side idle while the other works). `handedOver` is called once the kernel has
 * taken the last of them (never if a write fails).
 */
export async function queueChunks(socket: Socket, chunks: readonly Uint8Array[], buffers: SectionBufferPool, handedOver?: () => void): Promise<void> {
  if (socket.destroyed) throw new MigrationError(Code.Closed, 'cannot write the migration stream: the connection is closed');
  // Corked: several chunks go to the kernel in one writev (each write costs 0.1 ms here).
  if (chunks.length > 1) socket.cork();
  chunks.forEach((chunk, index) => {
    const last = index === chunks.length - 1;
    socket.write(chunk, (error) => {
      buffers.release(chunk);
      if (last && !error) handedOver?.();
    });
  });
  if (chunks.length > 1) socket.uncork();
  if (socket.writableLength <= QUEUE_HIGH_WATER_BYTES) {
    // One turn of the event loop, so that libuv hands the queue to the kernel while the next
    // batch is encoded (a resolved promise alone would keep the loop from ever writing).
    await new Promise((resolve) => setImmediate(resolve));
    return;
  }
  await new Promise<void>((resolve, reject) => {
    const done = (error?: Error) => {
      socket.off('drain', onDrain);
      socket.off('close', onClose);
      if (error) reject(error);
      else resolve();
    };
    const onDrain = () => done();
    const onClose = () => done(new MigrationError(Code.Closed, 'the connection closed while the migration stream was being written'));
    socket.on('drain', onDrain);
    socket.on('close', onClose);
  });
}

/** Rejects if `write` makes no progress for `timeoutMs` (the destination stopped reading). */
export function withStallTimeout(socket: Socket, write: Promise<void>, timeoutMs: number): Promise<void> {
  let lastWritten = socket.bytesWritten;
  let lastProgress = performance.now();
  let timer: NodeJS.Timeout | undefined;
  const stalled = new Promise<never>((_, reject) => {
    timer = setInterval(() => {
      if (socket.bytesWritten !== lastWritten) {
        lastWritten = socket.bytesWritten;
        lastProgress = performance.now();
      } else if (performance.now() - lastProgress > timeoutMs) {
        reject(new MigrationError(Code.TimedOut, `the destination stopped reading for ${timeoutMs} ms`));
      }
    }, Math.min(1000, timeoutMs / 4));
  });
  return Promise.race([write, stalled]).finally(() => clearInterval(timer));
}
