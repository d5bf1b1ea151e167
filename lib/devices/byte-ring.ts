// A byte ring in shared memory: one thread writes, another reads, with Atomics for ordering and
// waiting. Serial input (main thread -> vCPU threads) and serial output to a JavaScript stream
// (vCPU threads -> main thread) go through one.
import { argValueError } from '../kvm/errors.js';

const HEAD = 0; // next byte to read (consumer-owned)
const TAIL = 1; // next byte to write (producer-owned)
const HEADER_INTS = 2;

export interface ByteRingShared {
  readonly header: SharedArrayBuffer;
  readonly data: SharedArrayBuffer;
}

export class ByteRing {
  readonly #header: Int32Array;
  readonly #data: Uint8Array;
  readonly #capacity: number;

  constructor(shared: ByteRingShared) {
    this.#header = new Int32Array(shared.header);
    this.#data = new Uint8Array(shared.data);
    this.#capacity = this.#data.length;
  }

  static create(capacity: number): ByteRing {
    if ((capacity & (capacity - 1)) !== 0) throw argValueError('capacity must be a power of two');
    return new ByteRing({ header: new SharedArrayBuffer(HEADER_INTS * 4), data: new SharedArrayBuffer(capacity) });
  }

  get shared(): ByteRingShared {
    return { header: this.#header.buffer as SharedArrayBuffer, data: this.#data.buffer as SharedArrayBuffer };
  }

  get length(): number {
    return (Atomics.load(this.#header, TAIL) - Atomics.load(this.#header, HEAD)) | 0;
  }

  /** Appends one byte; false if the ring is full. */
  push(byte: number): boolean {
    const tail = Atomics.load(this.#header, TAIL);
    if (((tail - Atomics.load(this.#header, HEAD)) | 0) >= this.#capacity) return false;
    this.#data[tail & (this.#capacity - 1)] = byte;
    Atomics.store(this.#header, TAIL, (tail + 1) | 0);
    Atomics.notify(this.#header, TAIL);
    return true;
  }

  /** Appends one byte, blocking the calling (worker) thread while the ring is full. */
  pushBlocking(byte: number): void {
    while (!this.push(byte)) {
      const head = Atomics.load(this.#header, HEAD);
      if (((Atomics.load(this.#header, TAIL) - head) | 0) >= this.#capacity) Atomics.wait(this.#header, HEAD, head, 100);
    }
  }

  /** Removes and returns one byte, or -1 if empty. */
  shift(): number {
    const head = Atomics.load(this.#header, HEAD);
    if (head === Atomics.load(this.#header, TAIL)) return -1;
    const byte = this.#data[head & (this.#capacity - 1)]!;
    Atomics.store(this.#header, HEAD, (head + 1) | 0);
    Atomics.notify(this.#header, HEAD);
    return byte;
  }

  /** Removes everything buffered. */
  drain(): Uint8Array {
    const head = Atomics.load(this.#header, HEAD);
    const count = (Atomics.load(this.#header, TAIL) - head) | 0;
    const out = new Uint8Array(count);
    for (let i = 0; i < count; i++) out[i] = this.#data[(head + i) & (this.#capacity - 1)]!;
    Atomics.store(this.#header, HEAD, (head + count) | 0);
    Atomics.notify(this.#header, HEAD);
    return out;
  }

  /** Resolves when bytes may be available (for the consuming main thread), or after timeoutMs. */
  async waitForData(timeoutMs: number): Promise<void> {
    const tail = Atomics.load(this.#header, TAIL);
    if (tail !== Atomics.load(this.#header, HEAD)) return;
    const result = Atomics.waitAsync(this.#header, TAIL, tail, timeoutMs);
    if (result.async) await result.value;
  }

  /** Wakes a consumer blocked in waitForData (on shutdown). */
  wake(): void {
    Atomics.notify(this.#header, TAIL);
  }
}
