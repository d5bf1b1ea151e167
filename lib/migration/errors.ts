// The one error class of snapshots and live migration, and the codes it carries. Every failure of
// lib/migration that is not about an argument (those are TypeErrors and RangeErrors with the codes
// of lib/kvm/errors.ts) is a MigrationError whose `code` says what went wrong, `phase` how far a
// migration got, and `cause` which error it wraps.
import { ErrorCode, NodeKvmError, argTypeError } from '../kvm/errors.js';
import type { MigrationPhase } from './types.js';

/** The codes of MigrationError. A failed system call keeps its own name instead ('ENOSPC', 'EADDRINUSE'). */
export const MigrationErrorCode = {
  // A stream or snapshot file that cannot be used.
  /** Not a node-kvm stream or snapshot: the first 8 bytes are not the magic. */
  Magic: 'EMAGIC',
  /** Written by another version of the format (the message names both versions). */
  Version: 'EVERSION',
  /** A CRC-32C that does not match: a header, a section or a RAM image. */
  Checksum: 'ECHECKSUM',
  /** A malformed stream or file: an unknown section, a misplaced one, a bad value. */
  Format: 'EFORMAT',
  /** A section over its length limit, or a machine larger than this host builds. */
  TooBig: 'ETOOBIG',
  /** The stream or file ended (or the peer closed) before what was announced. */
  Truncated: 'ETRUNCATED',
  /** Valid, but for another machine: RAM size, vCPU count, parent snapshot. */
  Mismatch: 'EMISMATCH',
  // The connection of a live migration.
  /** The connection could not be made (`cause` holds the system error: ECONNREFUSED, ENOENT, ...). */
  Connect: 'ECONNECT',
  /** The peer is not a node-kvm migration peer, or broke the handshake. */
  Protocol: 'EPROTO',
  /** The destination refused the migration (wrong token, a mismatch, its own failure): the message says why. */
  Refused: 'EREFUSED',
  /** The source gave up and said why (the destination's error). */
  Canceled: 'ECANCELED',
  /** The peer closed the connection while this side waited for it. */
  Closed: 'ECLOSED',
  /** Nothing arrived (a connection, a migration, an answer, data) within the time allowed. */
  TimedOut: 'ETIMEDOUT',
  // The migration itself.
  /** Pre-copy hit its cap with `onNonConvergence: 'abort'`: the guest runs on at the source. */
  NotConverged: 'ENOTCONVERGED',
  /** The operation was aborted through its AbortSignal. */
  Aborted: ErrorCode.Aborted,
  /** The machine is not in a state that allows it (not running, no snapshot to layer a diff on). */
  MachineState: ErrorCode.MachineState,
  /** A reader, source or parser used out of turn (a second read while one waits, ...). */
  InvalidState: 'ERR_INVALID_STATE',
  /** A snapshot path taken by something that is not a regular file (a socket, a directory, a symlink). */
  NotRegularFile: 'ENOTREG',
  /** A disk image the source could not take back after a failure (another machine holds it): the guest stays paused. */
  DiskLocked: 'EDISKLOCKED',
  /**
   * Post-copy broke for good: the guest ran at the destination, so the source cannot resume it;
   * the destination holds it paused, lacking pages only the source has.
   */
  PostcopyBroken: 'EPOSTCOPY',
  /**
   * A pre-copy migration's whole stream went out, but the destination neither confirmed that the
   * guest runs there nor said that it failed (the connection broke, or its answer did not come in
   * time): it may run the guest, so the source keeps it paused rather than risk running it in two
   * places. Its owner resumes it once they know the destination does not run it.
   */
  Unconfirmed: 'EUNCONFIRMED',
  /** A failure with no code of its own (a bug): `cause` holds it. */
  Internal: 'ERR_INTERNAL',
} as const;

export type MigrationErrorCode = (typeof MigrationErrorCode)[keyof typeof MigrationErrorCode];

/** What a MigrationError carries besides its code and message. */
export interface MigrationErrorOptions {
  /** How far the migration got, for the failures of a live migration. */
  phase?: MigrationPhase;
  cause?: unknown;
}

/**
 * A snapshot, restore or migration that failed: `code` (always set) says why, from
 * MigrationErrorCode or a system error's name; `phase` says how far a live migration got.
 */
export class MigrationError extends NodeKvmError {
  declare readonly code: MigrationErrorCode | (string & {});
  readonly phase: MigrationPhase | undefined;

  /** An error of `code` (MigrationErrorCode, or a system error's code) with the phase the migration reached and the error behind it. */
  constructor(code: MigrationErrorCode | (string & {}), message: string, options: MigrationErrorOptions = {}) {
    super(code, message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'MigrationError';
    this.phase = options.phase;
  }
}

/** MigrationError(code, message), for the readers' many one-line checks. */
export const streamError = (code: MigrationErrorCode, message: string): MigrationError => new MigrationError(code, message);

/** The error an AbortSignal gives: a MigrationError with code ABORT_ERR, the signal's reason as cause. */
export function abortError(what: string, signal?: AbortSignal, phase?: MigrationPhase): MigrationError {
  const reason: unknown = signal?.reason;
  const why = reason instanceof Error && reason.name !== 'AbortError' ? `: ${reason.message}` : '';
  return new MigrationError(MigrationErrorCode.Aborted, `${what}: aborted${why}`, { phase, cause: reason });
}

/** Throws abortError(what) if `signal` has been aborted. */
export function throwIfAborted(signal: AbortSignal | undefined, what: string, phase?: MigrationPhase): void {
  if (signal?.aborted) throw abortError(what, signal, phase);
}

/**
 * Awaits `work` (a build given `signal`); if the signal aborted it, the rejection is abortError(what),
 * so that every abort of a persistence operation is a MigrationError with code ABORT_ERR.
 */
export async function abortable<T>(work: Promise<T>, signal: AbortSignal | undefined, what: string): Promise<T> {
  try {
    return await work;
  } catch (error) {
    if (signal?.aborted) throw abortError(what, signal);
    throw error;
  }
}

/** Rejects with abortError(what) when `signal` aborts; `dispose` stops listening. */
export function abortPromise(signal: AbortSignal | undefined, what: string, phase?: () => MigrationPhase): { promise: Promise<never>; dispose: () => void } {
  if (!signal) return { promise: new Promise<never>(() => {}), dispose: () => {} };
  let onAbort = (): void => {};
  const promise = new Promise<never>((_, reject) => {
    onAbort = () => reject(abortError(what, signal, phase?.()));
    if (signal.aborted) onAbort();
    else signal.addEventListener('abort', onAbort, { once: true });
  });
  promise.catch(() => {});
  return { promise, dispose: () => signal.removeEventListener('abort', onAbort) };
}

/** Checks an optional AbortSignal argument. */
export function checkSignal(signal: unknown, name = 'signal'): AbortSignal | undefined {
  if (signal === undefined) return undefined;
  if (!(signal instanceof AbortSignal)) {
    throw argTypeError(`${name} must be an AbortSignal`);
  }
  return signal;
}
