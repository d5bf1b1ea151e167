// eventfd(2), for irqfd (the host signals a guest interrupt) and ioeventfd (a guest write
// signals the host without a VM exit reaching userspace).
import { closeSync, readSync, writeSync } from 'node:fs';
import { Handle, checkAddress, checkInteger } from './handle.js';
import { KvmError, argTypeError, outOfRangeError } from './errors.js';
import { native } from './native.js';

/** Flags and initial count of EventFd.create(). */
export interface EventFdOptions {
  initialValue?: number;
  /** EFD_SEMAPHORE: each read() takes 1 instead of the whole count. */
  semaphore?: boolean;
  /** EFD_NONBLOCK: read() returns 0n instead of blocking when the count is zero. */
  nonBlocking?: boolean;
}

/** An eventfd(2): a counter in the kernel that irqfds and ioeventfds signal through (EventFd.create()). */
export class EventFd extends Handle {
  readonly fd: number;
  readonly #nonBlocking: boolean;
  readonly #word = Buffer.alloc(8);

  private constructor(fd: number, nonBlocking: boolean) {
    super('EventFd', () => closeSync(fd));
    this.fd = fd;
    this.#nonBlocking = nonBlocking;
  }

  /** Creates an eventfd (non-blocking and close-on-exec unless options say otherwise). */
  static create(options: EventFdOptions = {}): EventFd {
    if (typeof options !== 'object' || options === null) throw argTypeError('options must be an object');
    const initial = checkInteger(options.initialValue ?? 0, 'initialValue', 0, 0xffffffff);
    const nonBlocking = options.nonBlocking ?? true;
    return new EventFd(native.createEventFd(initial, !!options.semaphore, nonBlocking), nonBlocking);
  }

  /** Adds `value` to the counter. */
  write(value: number | bigint = 1n): void {
    this.assertOpen();
    const count = checkAddress(value, 'value');
    // eventfd(2): the counter holds at most 2^64-2.
    if (count > 0xfffffffffffffffen) throw outOfRangeError('value must be at most 2^64-2');
    this.#word.writeBigUInt64LE(count);
    try {
      writeSync(this.fd, this.#word, 0, 8);
    } catch (error) {
      const e = error as NodeJS.ErrnoException;
      throw new KvmError(e.code ?? 'EIO', e.errno ?? -5, 'write(eventfd)', e.message);
    }
  }

  /** Reads and resets the counter (or takes 1 in semaphore mode); 0n when non-blocking and zero. */
  read(): bigint {
    this.assertOpen();
    try {
      readSync(this.fd, this.#word, 0, 8, null);
    } catch (error) {
      if (this.#nonBlocking && (error as NodeJS.ErrnoException).code === 'EAGAIN') return 0n;
      const e = error as NodeJS.ErrnoException;
      throw new KvmError(e.code ?? 'EIO', e.errno ?? -5, 'read(eventfd)', e.message);
    }
    return this.#word.readBigUInt64LE();
  }

  protected release(): void {
    closeSync(this.fd);
  }
}
