// Guest RAM: a page-aligned mapping exposed as an ArrayBuffer with no copy. The mapping is
// reference-counted natively: it stays valid while any ArrayBuffer view (in any thread) or any VM
// memory slot uses it, so JavaScript can never touch unmapped memory.
import { Handle, checkAddress } from './handle.js';
import { native } from './native.js';
import { PAGE_SIZE } from './constants.js';

/** The largest ArrayBuffer every supported Node can create (buffer.constants.MAX_LENGTH on Node 20). */
export const MAX_GUEST_MEMORY_BYTES = 2 ** 32;

export interface GuestMemoryOptions {
  /** 'anonymous' (default) or 'memfd' (shareable and snapshottable by fd). */
  backing?: 'anonymous' | 'memfd';
  /** madvise(MADV_HUGEPAGE); best effort. */
  hugepages?: boolean;
  /** madvise(MADV_MERGEABLE) for KSM; best effort. */
  mergeable?: boolean;
}

/** A structured-cloneable reference to guest memory, for GuestMemory.attach() in another thread. */
export interface GuestMemoryHandle {
  readonly guestMemory: number;
}

export class GuestMemory extends Handle {
  /** The mapping as an ArrayBuffer (no copy). Zero-length after close(). */
  readonly buffer: ArrayBuffer;
  /** Size in bytes, a multiple of the page size. */
  readonly size: number;
  /** The memfd behind the mapping, or -1 for anonymous memory. */
  readonly fd: number;
  readonly #id: number;

  private constructor(id: number, buffer: ArrayBuffer, size: number, fd: number) {
    super('GuestMemory', null);
    this.#id = id;
    this.buffer = buffer;
    this.size = size;
    this.fd = fd;
  }

  static create(size: number, options: GuestMemoryOptions = {}): GuestMemory {
    if (typeof size !== 'number') throw new TypeError(`size must be a number, got ${typeof size}`);
    if (!Number.isSafeInteger(size) || size <= 0 || size % PAGE_SIZE !== 0) {
      throw new RangeError(`size must be a positive multiple of ${PAGE_SIZE}, got ${size}`);
    }
    if (size > MAX_GUEST_MEMORY_BYTES) {
      throw new RangeError(`size must be at most ${MAX_GUEST_MEMORY_BYTES} bytes (one ArrayBuffer on Node 20), got ${size}; map more RAM as more regions`);
    }
    if (typeof options !== 'object' || options === null) throw new TypeError('options must be an object');
    const backing = options.backing ?? 'anonymous';
    if (backing !== 'anonymous' && backing !== 'memfd') throw new RangeError(`backing must be 'anonymous' or 'memfd', got ${String(backing)}`);
    const [id, buffer, fd] = native.memoryCreate(size, backing === 'memfd', !!options.hugepages, !!options.mergeable);
    return new GuestMemory(id, buffer, size, fd);
  }

  /** Another view of the memory behind `handle` (from `memory.handle`), for example in a worker. */
  static attach(handle: GuestMemoryHandle): GuestMemory {
    if (typeof handle !== 'object' || handle === null || typeof handle.guestMemory !== 'number') {
      throw new TypeError('handle must be a GuestMemoryHandle (memory.handle)');
    }
    const [buffer, size, fd] = native.memoryAttach(handle.guestMemory);
    return new GuestMemory(handle.guestMemory, buffer, size, fd);
  }

  /** Pass this to another thread (postMessage / workerData) and GuestMemory.attach() it there. */
  get handle(): GuestMemoryHandle {
    this.assertOpen();
    return { guestMemory: this.#id };
  }

  /** @internal The native id, for Vm.setUserMemoryRegion. */
  get nativeId(): number {
    this.assertOpen();
    return this.#id;
  }

  /** A byte view of [offset, offset + length). */
  bytes(offset = 0, length = this.size - offset): Uint8Array {
    this.assertOpen();
    const start = Number(checkAddress(offset, 'offset'));
    const count = Number(checkAddress(length, 'length'));
    if (start > this.size || count > this.size - start) throw new RangeError(`[${start}, ${start + count}) is outside guest memory of ${this.size} bytes`);
    return new Uint8Array(this.buffer, start, count);
  }

  /** Copies `data` into guest memory at `offset`. */
  write(offset: number, data: Uint8Array): void {
    if (!(data instanceof Uint8Array)) throw new TypeError('data must be a Uint8Array');
    this.bytes(offset, data.length).set(data);
  }

  /**
   * Drops this view: its ArrayBuffer becomes zero-length at once. The mapping itself goes when
   * no other view and no VM memory slot uses it.
   */
  protected release(): void {
    native.detachBuffer(this.buffer);
  }

  /** Live guest mappings in this process (for leak checks). */
  static stats(): { mappings: number; bytes: number } {
    return native.memoryInfo();
  }
}
