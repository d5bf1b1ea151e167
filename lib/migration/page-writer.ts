// Page data of an incoming stream written into the guest RAM's memfd on a thread of its own, while
// the main thread reads and checks what comes next. A destination's pwrite into fresh memfd pages
// (the kernel allocating each) took some 26 ms of the 36 its main thread spent on 64 MiB here,
// reading and checksumming the rest; one after the other on one thread, they were the limit.
//
// The socket reads into a few buffers of this module's (SharedArrayBuffers, which the thread
// sees). Each piece of page data in them becomes a request on a ring; the thread takes the
// requests in order, one at a time, so that a page sent twice ends with its later data. A buffer
// is lent for the next read only once every write from it is done; the main thread waits
// (Atomics.wait) when none is free. Whatever the main thread writes into guest RAM itself (zero
// ranges, data outside these buffers, post-copy) waits for the ring to be empty first: drain().
import { Worker } from 'node:worker_threads';
import { argTypeError, outOfRangeError } from '../kvm/errors.js';
import { MigrationError, MigrationErrorCode as Code } from './errors.js';

/** Read buffers, and the size of each: 4 of 2 MiB keep the thread busy while the socket is read. */
export const PAGE_WRITER_BUFFERS = 4;
export const PAGE_WRITER_BUFFER_BYTES = 2 * 1024 * 1024;
/** Requests the ring holds: a piece of page data per range of a section, at most. */
const RING_SLOTS = 1024;

// Control words (Int32Array over `control`).
const QUEUED = 0; // requests put on the ring so far
const DONE = 1; // requests the thread has finished
const STOP = 2; // 1: the thread returns once the ring is empty
const ERROR = 3; // 0, or the first write's errno (negative: not a system error)
const FD = 4; // the memfd, or -1 until attach()
const CONTROL_WORDS = 5;
/** How long the thread sleeps between looks at STOP when idle (a wake-up may come before its wait). */
const IDLE_WAIT_MS = 100;
// A request: [guestPhysAddr, buffer, offset, length] as float64 (addresses above 2^32).
const SLOT_WORDS = 4;

/**
 * The thread's code: a few lines of plain CommonJS, given as source (no module to resolve or
 * bundle beside the package's files). It writes each request with pwrite, in order.
 */
const THREAD_SOURCE = `
const { workerData } = require('node:worker_threads');
const { writeSync } = require('node:fs');
const { control, ring, buffers, slots } = workerData;
const words = new Int32Array(control);
const requests = new Float64Array(ring);
const views = buffers.map((buffer) => new Uint8Array(buffer));
for (;;) {
  const done = Atomics.load(words, ${DONE});
  if (Atomics.load(words, ${QUEUED}) === done) {
    if (Atomics.load(words, ${STOP}) === 1) break;
    Atomics.wait(words, ${QUEUED}, done, ${IDLE_WAIT_MS});
    continue;
  }
  if (Atomics.load(words, ${ERROR}) === 0) {
    const at = (done % slots) * ${SLOT_WORDS};
    const view = views[requests[at + 1]];
    let offset = requests[at + 2];
    let length = requests[at + 3];
    let position = requests[at];
    const fd = Atomics.load(words, ${FD});
    try {
      while (length > 0) {
        const written = writeSync(fd, view, offset, length, position);
        offset += written;
        position += written;
        length -= written;
      }
    } catch (error) {
      Atomics.store(words, ${ERROR}, typeof error.errno === 'number' && error.errno < 0 ? -error.errno : -1);
    }
  }
  Atomics.store(words, ${DONE}, done + 1);
  Atomics.notify(words, ${DONE});
}
`;

/**
 * Writes page data into a memfd (attach()) on a thread of its own, in the order given. Make it
 * before the stream comes, and let it come `online` first; close() it before the memfd is closed.
 */
export class PageWriter {
  readonly #worker: Worker;
  readonly #words: Int32Array;
  readonly #requests: Float64Array;
  readonly #buffers: Uint8Array[];
  /** Per buffer: the request count (QUEUED) after its last write, done once DONE reaches it. */
  readonly #lastRequest: number[];
  readonly #waitLimitMs: number;
  /** For a read after a failure: its bytes are refused anyway, and no wait may throw inside a read. */
  readonly #spare = new Uint8Array(64 * 1024);
  #lent = -1;
  #closed = false;
  #attached = false;
  /**
   * Resolves once the thread runs (or failed to start): a thread starting takes some 20 ms of a
   * CPU, which a migration under way would share.
   */
  readonly online: Promise<void>;

  /** `waitLimitMs`: how long a write may take before the stream is failed as stalled. */
  constructor(waitLimitMs: number) {
    if (typeof waitLimitMs !== 'number' || !(waitLimitMs > 0)) throw outOfRangeError(`waitLimitMs must be positive, got ${String(waitLimitMs)}`);
    const control = new SharedArrayBuffer(CONTROL_WORDS * 4);
    const ring = new SharedArrayBuffer(RING_SLOTS * SLOT_WORDS * 8);
    const buffers = Array.from({ length: PAGE_WRITER_BUFFERS }, () => new SharedArrayBuffer(PAGE_WRITER_BUFFER_BYTES));
    this.#words = new Int32Array(control);
    this.#requests = new Float64Array(ring);
    this.#buffers = buffers.map((buffer) => new Uint8Array(buffer));
    this.#lastRequest = buffers.map(() => 0);
    this.#waitLimitMs = Math.min(waitLimitMs, 0x7fffffff);
    Atomics.store(this.#words, FD, -1);
    this.#worker = new Worker(THREAD_SOURCE, { eval: true, name: 'page writer', workerData: { control, ring, buffers, slots: RING_SLOTS } });
    // It never ends on its own before close(); an exit then is a bug, reported at the next call.
    this.#worker.on('error', () => Atomics.store(this.#words, ERROR, -1));
    // Holding the process up only while it starts (someone may await `online`), never after.
    this.online = new Promise<void>((resolve) => {
      this.#worker.once('online', () => {
        this.#worker.unref();
        resolve();
      });
      this.#worker.once('exit', () => resolve());
    });
  }

  /** Writes go to the memfd open at `fd` (before the first write()). */
  attach(fd: number): void {
    if (!Number.isInteger(fd) || fd < 0) throw argTypeError(`fd must be an open file descriptor, got ${String(fd)}`);
    Atomics.store(this.#words, FD, fd);
    this.#attached = true;
  }

  /**
   * The buffer the socket reads into next (onread's buffer function): one whose writes are all
   * done, waited for if need be. Pass the bytes read to the parser, whose writePages() then calls
   * write() with views of it. Never throws (it runs inside the socket's read): after a failure it
   * gives a spare buffer, and the next write() or drain() throws.
   */
  readonly nextBuffer = (): Uint8Array => {
    const next = (this.#lent + 1) % this.#buffers.length;
    try {
      this.#check();
      this.#waitDone(this.#lastRequest[next]!);
    } catch {
      return this.#spare;
    }
    this.#lent = next;
    return this.#buffers[next]!;
  };

  /**
   * Queues `data` for `guestPhysAddr` when it lies in one of this writer's buffers (true); false
   * otherwise (or once closed), and the caller writes it itself, after drain(). Throws what a
   * write failed with.
   */
  write(guestPhysAddr: number, data: Uint8Array): boolean {
    if (this.#closed) return false;
    this.#check();
    const index = this.#buffers.findIndex((buffer) => buffer.buffer === data.buffer);
    if (index < 0) return false;
    if (!this.#attached) throw new MigrationError(Code.InvalidState, 'the page writer has no memfd to write to');
    const words = this.#words;
    const queued = Atomics.load(words, QUEUED);
    // The ring is full: wait for the oldest request to end.
    this.#waitDone(queued - RING_SLOTS + 1);
    const at = (queued % RING_SLOTS) * SLOT_WORDS;
    this.#requests[at] = guestPhysAddr;
    this.#requests[at + 1] = index;
    this.#requests[at + 2] = data.byteOffset;
    this.#requests[at + 3] = data.length;
    this.#lastRequest[index] = queued + 1;
    Atomics.store(words, QUEUED, queued + 1);
    Atomics.notify(words, QUEUED);
    return true;
  }

  /** Waits until every queued write is done; throws what one failed with. Closed, there are none. */
  drain(): void {
    if (this.#closed) return;
    this.#check();
    this.#waitDone(Atomics.load(this.#words, QUEUED));
    this.#check();
  }

  /**
   * Drops the writes still queued, waits for the one under way, and lets the thread end. Call it
   * before the memfd is closed: no write reaches it once this returns.
   */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    const words = this.#words;
    // Queued writes are dropped: mark them done without writing (the thread skips on ERROR).
    if (Atomics.load(words, ERROR) === 0) Atomics.store(words, ERROR, -2);
    Atomics.store(words, STOP, 1);
    Atomics.notify(words, QUEUED);
    // The thread may be inside one pwrite: wait for it, so that nothing is written after this.
    try {
      this.#waitDone(Atomics.load(words, QUEUED));
    } catch {
      // A thread that died is already gone.
    }
  }

  #waitDone(target: number): void {
    const words = this.#words;
    const deadline = performance.now() + this.#waitLimitMs;
    for (;;) {
      const done = Atomics.load(words, DONE);
      if (done >= target) return;
      const left = deadline - performance.now();
      if (left <= 0 || Atomics.load(words, ERROR) === -1) {
        throw new MigrationError(Code.TimedOut, `writing guest RAM stalled: a write took over ${this.#waitLimitMs} ms`);
      }
      Atomics.wait(words, DONE, done, left);
    }
  }

  #check(): void {
    if (this.#closed) throw new MigrationError(Code.InvalidState, 'the page writer is closed');
    const error = Atomics.load(this.#words, ERROR);
    if (error > 0) throw new MigrationError(Code.Internal, `writing guest RAM failed: errno ${error}`);
    if (error < 0) throw new MigrationError(Code.Internal, 'writing guest RAM failed: the writer thread ended');
  }
}
