/**
 * A failed KVM system call, shaped like Node's own system errors: `code` ('EINVAL'), `errno`
 * (negative, as in Node), `syscall` ('ioctl(KVM_CREATE_VCPU)'). Also thrown, with `code`
 * 'EBADF', for a handle used after close().
 */
export class KvmError extends Error {
  readonly code: string;
  readonly errno: number;
  readonly syscall: string;

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
