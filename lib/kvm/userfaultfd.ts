// Post-copy's view of guest RAM: a userfaultfd over a whole GuestMemory (see native/userfaultfd.cc).
// Any access to a page the memory's memfd lacks (a vCPU's through KVM, a device thread's, this
// thread's own) blocks until the page is placed with copy() or zero(): the thread that serves
// the faults must never touch such a page itself.
import { PAGE_SIZE } from './constants.js';
import { argTypeError } from './errors.js';
import { Handle, checkInteger } from './handle.js';
import type { GuestMemory } from './memory.js';
import { native } from './native.js';

/** Faults read at a time at most. */
const FAULT_BATCH = 256;

/** A userfaultfd with a GuestMemory registered for missing-page faults. */
export class Userfaultfd extends Handle {
  readonly #id: number;
  /** For watchFd(): readable while faults are pending. */
  readonly fd: number;
  readonly pageCount: number;
  readonly #faults = new Float64Array(FAULT_BATCH);

  private constructor(id: number, fd: number, pageCount: number) {
    super('Userfaultfd', () => native.uffdClose(id));
    this.#id = id;
    this.fd = fd;
    this.pageCount = pageCount;
  }

  /**
   * Registers all of `memory` (a memfd-backed GuestMemory) for missing-page faults. Pages its
   * memfd holds are served as usual; the holes fault until placed.
   */
  static register(memory: GuestMemory): Userfaultfd {
    if (typeof memory !== 'object' || memory === null || typeof memory.nativeId !== 'number') throw argTypeError('memory must be a GuestMemory');
    const [id, fd] = native.uffdOpen(memory.nativeId);
    return new Userfaultfd(id, fd, memory.size / PAGE_SIZE);
  }

  /** The pages (indexes into the memory) that threads wait on now; empty when none. Never blocks. */
  readFaults(): number[] {
    this.assertOpen();
    const pages: number[] = [];
    for (;;) {
      const count = native.uffdReadFaults(this.#id, this.#faults);
      for (let i = 0; i < count; i++) pages.push(this.#faults[i]!);
      if (count < FAULT_BATCH) return pages;
    }
  }

  /**
   * Places `data` (whole pages) from page `firstPage` on and wakes whoever waits there; a page
   * already placed stays as it is. Returns the pages placed now.
   */
  copy(firstPage: number, data: Uint8Array): number {
    this.assertOpen();
    if (!(data instanceof Uint8Array)) throw argTypeError('data must be a Uint8Array');
    checkInteger(firstPage, 'firstPage', 0, this.pageCount);
    return native.uffdCopy(this.#id, firstPage, data);
  }

  /** Places zero pages, as copy(). */
  zero(firstPage: number, pageCount: number): number {
    this.assertOpen();
    checkInteger(firstPage, 'firstPage', 0, this.pageCount);
    checkInteger(pageCount, 'pageCount', 1, this.pageCount);
    return native.uffdZero(this.#id, firstPage, pageCount);
  }

  /** Wakes threads waiting on faults in these pages (they retry the access). */
  wake(firstPage: number, pageCount: number): void {
    this.assertOpen();
    checkInteger(firstPage, 'firstPage', 0, this.pageCount);
    checkInteger(pageCount, 'pageCount', 1, this.pageCount);
    native.uffdWake(this.#id, firstPage, pageCount);
  }

  /** Unregisters the memory (its holes then read as zero) and closes the fd. */
  protected release(): void {
    native.uffdClose(this.#id);
  }
}
