// The VMM's errors, over the package's error vocabulary (lib/kvm/errors.ts): a machine in the
// wrong state, an aborted build, and failures that cross from a vCPU or disk thread.
import { ErrorCode, NodeKvmError } from '../kvm/errors.js';

/** An operation the machine's state does not allow: `message` says which state it is in. */
export function machineStateError(message: string): NodeKvmError {
  return new NodeKvmError(ErrorCode.MachineState, message);
}

/**
 * What an aborted operation rejects with: code ABORT_ERR and name 'AbortError', as Node's own
 * aborted operations, with the signal's reason as `cause`.
 */
export function abortError(signal: AbortSignal, message: string): NodeKvmError {
  const error = new NodeKvmError(ErrorCode.Aborted, message, { cause: signal.reason });
  error.name = 'AbortError';
  return error;
}

/**
 * What a vCPU thread reports of an error: its message and code, and the error itself (cloned
 * across threads, which keeps its message and stack but not its code).
 */
export interface ThreadFailure {
  error: string;
  code?: string;
  cause?: unknown;
}

/** A ThreadFailure from the thread's side of an error it caught. */
export function threadFailure(error: unknown): ThreadFailure {
  const code = (error as { code?: unknown } | null)?.code;
  return {
    error: error instanceof Error ? error.message : String(error),
    ...(typeof code === 'string' ? { code } : {}),
    ...(error instanceof Error ? { cause: error } : {}),
  };
}

/** An error for a thread's failure, `prefix` first: its code kept (or `fallbackCode`), the thread's error as cause. */
export function fromThreadFailure(prefix: string, failure: ThreadFailure, fallbackCode: string = ErrorCode.VcpuFailed): NodeKvmError {
  const cause = failure.cause instanceof Error && failure.code !== undefined
    ? Object.assign(failure.cause, { code: failure.code })
    : failure.cause;
  return new NodeKvmError(failure.code ?? fallbackCode, `${prefix}${failure.error}`, cause === undefined ? undefined : { cause });
}
