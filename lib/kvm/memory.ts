// Guest RAM: a page-aligned mapping exposed as an ArrayBuffer with no copy. The mapping is
// reference-counted natively: it stays valid while any ArrayBuffer view (in any thread) or any VM
// memory slot uses it, so JavaScript can never touch unmapped memory.
import { closeSync, fstatSync, openSync } from 'node:fs';
import { Handle, checkAddress } from './handle.js';
import { native } from './native.js';
import { PAGE_SIZE } from './constants.js';
import { argTypeError, argValueError, outOfRangeError } from './errors.js';

// The first ArrayBuffer detached in a thread makes V8 throw away every function it has compiled to
// read or write typed arrays (they assumed no buffer would ever be detached), and compile them
// again with the check. Guest RAM's buffers are detached as machines close, which in a process
// that already ran a migration's code put 3-6 ms of recompiling into the next migration's
// first round (bench/README.md). Detaching a buffer here, before anything is compiled, pays
// that at load.
{
  const buffer = new ArrayBuffer(8);
  structuredClone(buffer, { transfer: [buffer] });
}

/** The largest ArrayBuffer every supported Node can create (buffer.constants.MAX_LENGTH on Node 20). */
export const MAX_GUEST_MEMORY_BYTES = 2 ** 32;

/**
 * What backs guest memory: a memfd that is not exposed ('anonymous'), an exposed memfd
 * ('memfd'), or a file mapped copy-on-write ('file', from GuestMemory.mapFile()).
 */
export type GuestMemoryBacking = 'anonymous' | 'memfd' | 'file';

/** How GuestMemory.create() backs the memory. */
export interface GuestMemoryOptions {
  /** 'anonymous' (default) or 'memfd' (shareable and snapshottable by fd). */
  backing?: 'anonymous' | 'memfd';
  /** madvise(MADV_HUGEPAGE); best effort. */
  hugepages?: boolean;
  /** madvise(MADV_MERGEABLE) for KSM; best effort. */
  mergeable?: boolean;
}

/** Which part of a file GuestMemory.mapFile() maps, and how. */
export interface MapFileOptions {
  /** Where the mapping starts in the file, in bytes; page-aligned. Default 0. */
  offset?: number;
  /** Bytes to map: a positive multiple of the page size, at most MAX_GUEST_MEMORY_BYTES. */
  size: number;
  /** madvise(MADV_HUGEPAGE); best effort. */
  hugepages?: boolean;
}

/** A structured-cloneable reference to guest memory, for GuestMemory.attach() in another thread. */
export interface GuestMemoryHandle {
  readonly guestMemory: number;
}

/** Guest RAM: host memory mapped in this process (anonymous, a memfd or a file), given to a VM with vm.setUserMemoryRegion(), read and written here without copies. */
export class GuestMemory extends Handle {
  /** Size in bytes, a multiple of the page size. */
  readonly size: number;
  readonly #fd: number;
  #backing: GuestMemoryBacking;
  readonly #id: number;
  /** Whether this object created the mapping (and holds it natively), or is a view (attach()). */
  readonly #owner: boolean;
  #buffer: ArrayBuffer | null;

  /**
   * `buffer` null: this object created the mapping and holds it natively until close() (or its
   * collection), and makes its ArrayBuffer when first asked (see buffer). Otherwise a view of a
   * mapping made elsewhere (attach()), which its ArrayBuffer holds.
   */
  private constructor(id: number, buffer: ArrayBuffer | null, size: number, fd: number, backing: GuestMemoryBacking) {
    super('GuestMemory', buffer === null ? () => native.memoryRelease(id) : null);
    this.#id = id;
    this.#owner = buffer === null;
    this.#buffer = buffer;
    this.size = size;
    this.#fd = fd;
    this.#backing = backing;
  }

  /**
   * The memfd behind the mapping for 'memfd' backing; -1 for 'anonymous' and 'file', and once
   * this object is closed: the mapping, and its fd, may go at any moment then, and the number
   * be given to another file, which a late write through it would reach.
   */
  get fd(): number {
    return this.closed ? -1 : this.#fd;
  }

  /** What backs the memory (mapFileOver() turns 'anonymous' into 'file'). */
  get backing(): GuestMemoryBacking {
    return this.#backing;
  }

  /**
   * The mapping as an ArrayBuffer (no copy); zero-length after close(). Made on first use: V8
   * collects garbage as soon as a large external ArrayBuffer appears, which a machine that
   * never reads its RAM from JavaScript (a restore, say) need not pay for.
   */
  get buffer(): ArrayBuffer {
    if (this.#buffer === null) {
      if (this.closed) return new ArrayBuffer(0);
      [this.#buffer] = native.memoryAttach(this.#id);
    }
    return this.#buffer;
  }

  /** Zero-filled memory of `size` bytes. */
  static create(size: number, options: GuestMemoryOptions = {}): GuestMemory {
    checkMemorySize(size);
    if (typeof options !== 'object' || options === null) throw argTypeError('options must be an object');
    const backing = options.backing ?? 'anonymous';
    if (backing !== 'anonymous' && backing !== 'memfd') throw argValueError(`backing must be 'anonymous' or 'memfd', got ${String(backing)}`);
    const [id, fd] = native.memoryCreate(size, backing === 'memfd', !!options.hugepages, !!options.mergeable);
    return new GuestMemory(id, null, size, fd, backing);
  }

  /**
   * Maps `options.size` bytes of a regular file, from `options.offset`, copy-on-write
   * (MAP_PRIVATE): the memory starts as the file's bytes, and writes by the guest or the VMM stay
   * in this process, never reaching the file. For example a snapshot's RAM, restored without
   * reading it. `file` is a path or an open fd (readable; it may be closed afterwards).
   *
   * The file must hold offset + size bytes, and must not be truncated or written while it is
   * mapped: a page past its new end would fault (SIGBUS) when touched, and pages the guest has
   * not written show the file's current bytes.
   */
  static mapFile(file: string | number, options: MapFileOptions): GuestMemory {
    let name: string;
    if (typeof file === 'string') {
      name = `'${file}'`;
    } else if (typeof file === 'number') {
      if (!Number.isInteger(file) || file < 0 || file > 0x7fffffff) throw outOfRangeError(`file must be a path or an fd 0..2^31-1, got ${file}`);
      name = `fd ${file}`;
    } else {
      throw argTypeError(`file must be a path (string) or an open fd (number), got ${file === null ? 'null' : typeof file}`);
    }
    if (typeof options !== 'object' || options === null) throw argTypeError('options must be an object with a size');
    const { size, offset = 0 } = options;
    checkMemorySize(size);
    if (typeof offset !== 'number') throw argTypeError(`offset must be a number, got ${typeof offset}`);
    if (!Number.isSafeInteger(offset) || offset < 0 || offset % PAGE_SIZE !== 0) {
      throw argValueError(`offset must be a non-negative multiple of ${PAGE_SIZE}, got ${offset}`);
    }
    // Node's own open error names the path (ENOENT: no such file or directory, open '...').
    const fd = typeof file === 'string' ? openSync(file, 'r') : file;
    try {
      const stats = fstatSync(fd);
      if (!stats.isFile()) throw argTypeError(`file must be a regular file; ${name} is not`);
      if (offset + size > stats.size) {
        throw outOfRangeError(`offset + size (${offset + size}) is beyond the end of ${name} (${stats.size} bytes)`);
      }
      const id = native.memoryMapFile(fd, offset, size, !!options.hugepages);
      return new GuestMemory(id, null, size, -1, 'file');
    } finally {
      if (fd !== file) closeSync(fd);
    }
  }

  /**
   * Maps the memfd open as `fd` (received from another process, say: a migration on this host)
   * as guest RAM of `size` bytes, shared: both see the same pages, nothing is copied. It must be a
   * memfd of exactly `size` bytes, open for reading and writing, sealed against shrinking and
   * growing (GuestMemory.create() seals its own so), not against writing; anything else is
   * refused (ERR_INVALID_ARG_VALUE) without mapping it. `backing` 'memfd' exposes an fd of it
   * (memory.fd). The caller keeps `fd` and may close it afterwards.
   */
  static fromFd(fd: number, options: { size: number; backing?: 'anonymous' | 'memfd' }): GuestMemory {
    if (typeof fd !== 'number' || !Number.isInteger(fd) || fd < 0 || fd > 0x7fffffff) throw outOfRangeError(`fd must be an open fd 0..2^31-1, got ${String(fd)}`);
    if (typeof options !== 'object' || options === null) throw argTypeError('options must be an object with a size');
    checkMemorySize(options.size);
    const backing = options.backing ?? 'anonymous';
    if (backing !== 'anonymous' && backing !== 'memfd') throw argValueError(`backing must be 'anonymous' or 'memfd', got ${String(backing)}`);
    const [id, exposed] = native.memoryFromFd(fd, options.size, backing === 'memfd');
    return new GuestMemory(id, null, options.size, exposed, backing);
  }

  /**
   * A new fd of the memfd behind this memory (close-on-exec; the caller closes it), for another
   * process to map the same pages with GuestMemory.fromFd(). 'file' memory has none (its written
   * pages are private copies) and throws ERR_INVALID_ARG_VALUE.
   */
  shareFd(): number {
    this.assertOpen();
    if (this.backing === 'file') throw argValueError('this memory is a copy-on-write mapping of a file: its written pages are private to this process and cannot be shared');
    return native.memoryShareFd(this.#id);
  }

  /**
   * From now on this memory's pages are `other`'s (the same memfd, shared), in place: every view
   * of this memory, in any thread, and every VM memory slot over it see them, and this memory's
   * own pages are dropped. For a machine built before its RAM arrived (a migration on this host
   * hands it over as a memfd). Both must be memfd-backed ('anonymous' or 'memfd') and of one size;
   * `other` stays open (close it when done). Nothing may read or write this memory meanwhile, and
   * KVM must not have run a guest on it.
   */
  replaceWith(other: GuestMemory): void {
    this.assertOpen();
    if (!(other instanceof GuestMemory)) throw argTypeError('other must be a GuestMemory');
    if (other.size !== this.size) throw argValueError(`other is ${other.size} bytes, this memory ${this.size}`);
    native.memoryReplace(this.#id, other.nativeId);
  }

  /**
   * From now on this memory is `size` bytes of the regular file `file` (a path or an open fd),
   * from `offset`, mapped copy-on-write over the same addresses, as GuestMemory.mapFile() maps
   * one: every view of it and every VM memory slot over it see the file's bytes, and its own
   * pages are dropped; its backing becomes 'file'. For a VM whose memory slot was made before the
   * file was known (a spare VM taking a snapshot's RAM). 'anonymous' memory only (an exposed
   * memfd would name pages the memory no longer has). Nothing may read or write this memory
   * meanwhile, and KVM must not have run a guest on it. The same rules as mapFile() hold for the
   * file afterwards.
   */
  mapFileOver(file: string | number, offset = 0): void {
    this.assertOpen();
    if (this.#backing !== 'anonymous') throw argValueError(`only 'anonymous' memory can become a file mapping; this memory is '${this.#backing}'`);
    if (typeof offset !== 'number' || !Number.isSafeInteger(offset) || offset < 0 || offset % PAGE_SIZE !== 0) {
      throw argValueError(`offset must be a non-negative multiple of ${PAGE_SIZE}, got ${String(offset)}`);
    }
    if (typeof file === 'number') {
      if (!Number.isInteger(file) || file < 0 || file > 0x7fffffff) throw outOfRangeError(`file must be a path or an fd 0..2^31-1, got ${file}`);
    } else if (typeof file !== 'string') {
      throw argTypeError(`file must be a path (string) or an open fd (number), got ${file === null ? 'null' : typeof file}`);
    }
    const fd = typeof file === 'string' ? openSync(file, 'r') : file;
    try {
      native.memoryMapFileOver(this.#id, fd, offset);
    } finally {
      if (fd !== file) closeSync(fd);
    }
    this.#backing = 'file';
  }

  /** Another view of the memory behind `handle` (from `memory.handle`), for example in a worker. */
  static attach(handle: GuestMemoryHandle): GuestMemory {
    if (typeof handle !== 'object' || handle === null || typeof handle.guestMemory !== 'number') {
      throw argTypeError('handle must be a GuestMemoryHandle (memory.handle)');
    }
    const [buffer, size, fd, backing] = native.memoryAttach(handle.guestMemory);
    return new GuestMemory(handle.guestMemory, buffer, size, fd, backing);
  }

  /**
   * Keeps the mapping (not this view) until the function returned is called, even once every view
   * has closed: for native work still under way on guest RAM, such as a socket's queued writes of
   * it. Makes no ArrayBuffer (attach() does, and V8 collects garbage for a large new one). Calling
   * the function again does nothing.
   */
  retainMapping(): () => void {
    this.assertOpen();
    const retained = native.memoryRetain(this.#id);
    let released = false;
    return () => {
      if (released) return;
      released = true;
      native.memoryRelease(retained);
    };
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

  /** A byte view of [offset, offset + length), to the end by default. */
  bytes(offset = 0, length?: number): Uint8Array {
    this.assertOpen();
    // The default length comes from a checked offset (a bigint offset would not subtract from a number).
    const count = length ?? Math.max(this.size - Number(checkAddress(offset, 'offset')), 0);
    return new Uint8Array(this.buffer, this.#checkRange(offset, count), Number(count));
  }

  /** Copies `data` into guest memory at `offset` (without making `buffer` if there is none yet). */
  write(offset: number, data: Uint8Array): void {
    if (!(data instanceof Uint8Array)) throw argTypeError('data must be a Uint8Array');
    native.memoryWrite(this.#id, this.#checkRange(offset, data.length), data);
  }

  /** Sets `length` bytes from `offset` to `byte` (0 unless given), without making `buffer`. */
  fill(offset: number, length: number, byte = 0): void {
    const start = this.#checkRange(offset, length);
    if (typeof byte !== 'number' || !Number.isInteger(byte) || byte < 0 || byte > 255) throw outOfRangeError(`byte must be an integer 0..255, got ${String(byte)}`);
    native.memoryFill(this.#id, start, Number(length), byte);
  }

  /** The start of [offset, offset + length), checked to lie inside this memory. */
  #checkRange(offset: number, length: number): number {
    this.assertOpen();
    const start = Number(checkAddress(offset, 'offset'));
    const count = Number(checkAddress(length, 'length'));
    if (start > this.size || count > this.size - start) throw outOfRangeError(`[${start}, ${start + count}) is outside guest memory of ${this.size} bytes`);
    return start;
  }

  /**
   * Byte ranges of this memory outside of which every byte reads as zero: page-aligned, sorted,
   * coalesced [offsetBytes, lengthBytes] pairs. A superset of the pages that hold data, found
   * without reading (and so without allocating) the memory: for 'anonymous' and 'memfd' the
   * memfd's data ranges (lseek SEEK_DATA: pages never touched are holes); for 'file' the file's
   * data ranges inside the mapped window plus the pages written since mapping (copy-on-write
   * copies, from /proc/self/pagemap). Pages that are swapped out count as data.
   */
  populatedRanges(): Array<[offsetBytes: number, lengthBytes: number]> {
    this.assertOpen();
    const flat = native.memoryPopulatedRanges(this.#id);
    const ranges: Array<[number, number]> = new Array(flat.length / 2);
    for (let i = 0; i < ranges.length; i++) ranges[i] = [flat[2 * i]!, flat[2 * i + 1]!];
    return ranges;
  }

  /**
   * Gives the pages of [offset, offset + length) back to the kernel (page-aligned). 'anonymous'
   * and 'memfd' memory reads as zero there afterwards (fallocate PUNCH_HOLE); 'file' memory reads
   * the file's bytes again (madvise MADV_DONTNEED drops the copies). KVM's dirty log does not see
   * this change.
   */
  dontneed(offset: number, length: number): void {
    this.assertOpen();
    this.#checkPageRange(offset, length);
    native.memoryDontneed(this.#id, offset, length);
  }

  /**
   * dontneed() on a thread of libuv's pool: freeing a populated GiB takes the kernel about 70 ms,
   * which would otherwise hold up the event loop. Bad arguments throw at once; the range reads as
   * dontneed() leaves it once the promise resolves (not before: nothing may write it meanwhile).
   * The mapping stays until it is done, even if this object is closed.
   */
  dontneedAsync(offset: number, length: number): Promise<void> {
    this.assertOpen();
    this.#checkPageRange(offset, length);
    return native.memoryDontneedAsync(this.#id, offset, length);
  }

  /**
   * Allocates and maps the pages of [offset, offset + length) for writing in one call
   * (MADV_POPULATE_WRITE) rather than a page fault per page as they are first written. Returns
   * false where the kernel lacks it (then nothing is done). Contents are unchanged.
   */
  populate(offset: number, length: number): boolean {
    this.assertOpen();
    this.#checkPageRange(offset, length);
    return native.memoryPopulate(this.#id, offset, length);
  }

  #checkPageRange(offset: number, length: number): void {
    for (const [value, name] of [[offset, 'offset'], [length, 'length']] as const) {
      if (typeof value !== 'number') throw argTypeError(`${name} must be a number, got ${typeof value}`);
      if (!Number.isSafeInteger(value) || value < 0 || value % PAGE_SIZE !== 0) {
        throw argValueError(`${name} must be a non-negative multiple of ${PAGE_SIZE}, got ${value}`);
      }
    }
    if (offset + length > this.size) throw outOfRangeError(`[${offset}, ${offset + length}) is outside guest memory of ${this.size} bytes`);
  }

  /**
   * Drops this view: its ArrayBuffer becomes zero-length at once. The mapping itself goes when
   * no other view and no VM memory slot uses it.
   */
  protected release(): void {
    if (this.#buffer !== null) native.detachBuffer(this.#buffer);
    if (this.#owner) native.memoryRelease(this.#id);
  }

  /**
   * Live guest mappings in this process (for leak checks). A mapping no longer counts once its
   * last view, slot or vCPU lets go of it; one of 16 MiB or more is unmapped a moment later on a
   * thread of its own (see unmapsSettled()).
   */
  static stats(): { mappings: number; bytes: number } {
    return native.memoryInfo();
  }

  /**
   * Resolves once every mapping released before the call has left the address space. Mappings
   * of 16 MiB or more are unmapped on a background thread: freeing a populated GiB takes the
   * kernel 50-60 ms, which would otherwise stall the thread whose close() (or finalizer) let go
   * of it last, the event loop's as a rule. Their fds are closed at once all the same.
   */
  static unmapsSettled(): Promise<void> {
    return native.memoryUnmapsSettled();
  }
}

function checkMemorySize(size: unknown): asserts size is number {
  if (typeof size !== 'number') throw argTypeError(`size must be a number, got ${typeof size}`);
  if (!Number.isSafeInteger(size) || size <= 0 || size % PAGE_SIZE !== 0) {
    throw argValueError(`size must be a positive multiple of ${PAGE_SIZE}, got ${size}`);
  }
  if (size > MAX_GUEST_MEMORY_BYTES) {
    throw outOfRangeError(`size must be at most ${MAX_GUEST_MEMORY_BYTES} bytes (one ArrayBuffer on Node 20), got ${size}; map more RAM as more regions`);
  }
}
