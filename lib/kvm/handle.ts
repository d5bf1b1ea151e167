// What every handle class shares: idempotent close(), Symbol.dispose, a clear error after close,
// and closing by the garbage collector when a handle is dropped unclosed.
import { KvmError, argTypeError, outOfRangeError } from './errors.js';

const finalizer = new FinalizationRegistry<() => void>((release) => {
  try {
    release();
  } catch {
    // Best effort: a finalizer has nobody to report to.
  }
});

export function closedError(kind: string): KvmError {
  return new KvmError('EBADF', -9, '', `${kind} handle is closed`);
}

/** What every handle class (Kvm, Vm, Vcpu, GuestMemory, EventFd) shares: idempotent close(), `using` disposal, and closing by the garbage collector when dropped unclosed. */
export abstract class Handle {
  #closed = false;
  readonly #kind: string;
  readonly #token = {};

  protected constructor(kind: string, release: (() => void) | null) {
    this.#kind = kind;
    if (release) finalizer.register(this, release, this.#token);
  }

  /** Whether close() has been called. */
  get closed(): boolean {
    return this.#closed;
  }

  /** Throws a KvmError (EBADF) once the handle is closed. */
  protected assertOpen(): void {
    if (this.#closed) throw closedError(this.#kind);
  }

  /** Releases the handle; calling it again does nothing. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    finalizer.unregister(this.#token);
    this.release();
  }

  protected abstract release(): void;

  /** Closed here without release(): what the handle held now belongs to someone else. */
  protected forget(): void {
    this.#closed = true;
    finalizer.unregister(this.#token);
  }

  /** Closes the handle: what `using` calls at the end of its scope. */
  [Symbol.dispose](): void {
    this.close();
  }
}

export function checkInteger(value: unknown, name: string, min: number, max: number): number {
  if (typeof value !== 'number') throw argTypeError(`${name} must be a number, got ${typeof value}`);
  if (!Number.isInteger(value) || value < min || value > max) {
    throw outOfRangeError(`${name} must be an integer ${min}..${max}, got ${value}`);
  }
  return value;
}

/** A guest address or size: a non-negative safe integer or a bigint below 2^64. */
export function checkAddress(value: unknown, name: string): bigint {
  if (typeof value === 'number') {
    if (!Number.isSafeInteger(value) || value < 0) throw outOfRangeError(`${name} must be a non-negative integer, got ${value}`);
    return BigInt(value);
  }
  if (typeof value === 'bigint') {
    if (value < 0n || value >= 1n << 64n) throw outOfRangeError(`${name} must be in 0..2^64-1`);
    return value;
  }
  throw argTypeError(`${name} must be a number or bigint, got ${typeof value}`);
}
