/**
 * A failed KVM system call, shaped like Node's own system errors: `code` ('EINVAL'), `errno`
 * (negative, as in Node), `syscall` ('ioctl(KVM_CREATE_VCPU)'). Also thrown, with `code`
 * 'EBADF', for a handle used after close().
 */
export class KvmError extends Error {
  readonly code: string;
  readonly errno: number;
  readonly syscall: string;

  /** An error from a system call: `code` the errno's name ('EBADF'), `errno` its negative number, `syscall` the call (or ioctl) that failed. */
  constructor(code: string, errno: number, syscall: string, message?: string) {
    super(message ?? `${syscall} failed: ${code}`);
    this.name = 'KvmError';
    this.code = code;
    this.errno = errno;
    this.syscall = syscall;
  }
}

/** Rewrites a failure to open /dev/kvm into a message that says why and what to do. */
export function explainOpenError(error: KvmError, path: string): KvmError {
  let hint: string;
  switch (error.code) {
    case 'ENOENT':
      hint =
        `${path} does not exist: KVM is not available. Load the module (modprobe kvm_intel or kvm_amd), ` +
        'enable virtualization in the firmware, or on a cloud VM enable nested virtualization.';
      break;
    case 'EACCES':
    case 'EPERM':
      hint =
        `permission denied opening ${path}: add your user to the group that owns it ` +
        `(usually 'kvm': sudo usermod -aG kvm $USER, then log in again) or run as root.`;
      break;
    case 'ENXIO':
    case 'ENODEV':
      hint = `${path} exists but no KVM module backs it: load kvm_intel or kvm_amd (or kvm_pvm).`;
      break;
    default:
      hint = error.message;
  }
  return new KvmError(error.code, error.errno, error.syscall, `cannot open ${path}: ${hint}`);
}

/**
 * The error codes node-kvm gives its own errors (system errors keep their errno name, 'ENOENT',
 * as Node's do): stable strings a caller can test instead of a message.
 */
export const ErrorCode = {
  /** An argument of the wrong type (a TypeError). */
  InvalidArgType: 'ERR_INVALID_ARG_TYPE',
  /** A number outside its range (a RangeError). */
  OutOfRange: 'ERR_OUT_OF_RANGE',
  /** An argument of the right type whose value is refused (a RangeError). */
  InvalidArgValue: 'ERR_INVALID_ARG_VALUE',
  /** An operation the machine's state does not allow now (pause a stopped machine, ...). */
  MachineState: 'ERR_MACHINE_STATE',
  /** The operation was aborted through its AbortSignal. */
  Aborted: 'ABORT_ERR',
  /** An image that cannot be booted as given (a BootImageError). */
  BootImage: 'ERR_BOOT_IMAGE',
  /** The native addon is not built, or the package around it cannot be found. */
  AddonNotFound: 'ERR_ADDON_NOT_FOUND',
  /** The native addon is another version than the TypeScript over it (it lacks an ioctl): rebuild it. */
  AddonMismatch: 'ERR_ADDON_MISMATCH',
  /** A vCPU used from a thread other than the one that created it (a KvmError). */
  KvmWrongThread: 'ERR_KVM_WRONG_THREAD',
  /** No real-time signal is free to kick vCPUs with (a KvmError). */
  KvmNoSignal: 'ERR_KVM_NO_SIGNAL',
  /** A dirty ring harvested from a vCPU created before the VM enabled KVM_CAP_DIRTY_LOG_RING (a KvmError). */
  KvmNoDirtyRing: 'ERR_KVM_NO_DIRTY_RING',
  /** A line on the control API socket that is not the API's JSON: not JSON, not a request or answer, too long. */
  ApiProtocol: 'ERR_API_PROTOCOL',
  /** The machine closed the control API connection before answering the call (it stopped, say). */
  ApiClosed: 'ERR_API_CLOSED',
  /** The machine answered an API call with an error that carries no code of its own. */
  ApiCallFailed: 'ERR_API_CALL_FAILED',
  /** A vCPU or disk thread failed to load, or ended before it had started (Node's name for a Worker that fails to start). */
  WorkerInitFailed: 'ERR_WORKER_INIT_FAILED',
  /** An object used in a state that does not allow it (a closed vCPU pool, a dirty tracker while off); Node's code. */
  InvalidState: 'ERR_INVALID_STATE',
  /** A vCPU thread failed to create its vCPU or to serve a request, for a reason that carries no code of its own. */
  VcpuFailed: 'ERR_VCPU_FAILED',
  /** The vsock device's socket answered a CONNECT with something other than `OK <port>`. */
  VsockProtocol: 'ERR_VSOCK_PROTOCOL',
} as const;

/** `error` with a `code` (and `cause`, where given): for the built-in error classes. */
export function withCode<E extends Error>(error: E, code: string, cause?: unknown): E & { readonly code: string } {
  Object.defineProperty(error, 'code', { value: code, enumerable: true, configurable: true, writable: true });
  if (cause !== undefined) Object.defineProperty(error, 'cause', { value: cause, enumerable: false, configurable: true, writable: true });
  return error as E & { readonly code: string };
}

/** A TypeError for an argument of the wrong type, with code ERR_INVALID_ARG_TYPE. */
export function argTypeError(message: string): TypeError & { readonly code: string } {
  return withCode(new TypeError(message), ErrorCode.InvalidArgType);
}

/** A RangeError for a number outside its range, with code ERR_OUT_OF_RANGE. */
export function outOfRangeError(message: string): RangeError & { readonly code: string } {
  return withCode(new RangeError(message), ErrorCode.OutOfRange);
}

/** A RangeError for an argument whose value is refused, with code ERR_INVALID_ARG_VALUE. */
export function argValueError(message: string): RangeError & { readonly code: string } {
  return withCode(new RangeError(message), ErrorCode.InvalidArgValue);
}

/**
 * node-kvm's own errors that are not about an argument nor a KVM system call: a machine in the
 * wrong state, a disk image in use, a file that cannot be read, ... `code` says which; `cause`
 * holds the error it wraps, if any.
 */
export class NodeKvmError extends Error {
  readonly code: string;
  /** An error with one of node-kvm's codes (ErrorCode) and a message; `cause`, the error behind it. */
  constructor(code: string, message: string, options?: { cause?: unknown }) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'NodeKvmError';
    this.code = code;
  }
}

/**
 * An error from a system call Node made for us (fs, net), told in our words: `message`, with the
 * system error's code ('ENOENT') kept and the error itself as `cause`.
 */
export function systemError(message: string, cause: unknown): NodeKvmError {
  const code = (cause as NodeJS.ErrnoException | undefined)?.code;
  return new NodeKvmError(typeof code === 'string' ? code : 'ERR_SYSTEM', message, { cause });
}
