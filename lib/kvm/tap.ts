// TAP network devices for virtio-net: a non-blocking fd on /dev/net/tun whose frames carry a
// 12-byte virtio_net_hdr_v1 (IFF_VNET_HDR) and no packet information, with every offload off.
import { checkInteger } from './handle.js';
import { KvmError, argTypeError, argValueError } from './errors.js';
import { native } from './native.js';

/** An open TAP: the caller owns `fd` and closes it. */
export interface Tap {
  fd: number;
  /** The interface's name (the kernel's choice when none was asked for). */
  name: string;
}

/** How openTap() opens a TAP. */
export interface OpenTapOptions {
  /**
   * A network namespace file (/run/netns/NAME, /proc/PID/ns/net): the TAP is opened there, from
   * a short-lived thread that joins it, while the VMM stays in its own namespace.
   */
  netns?: string;
}

/** Interface names are at most IFNAMSIZ - 1 bytes. */
export const MAX_TAP_NAME_BYTES = 15;

/**
 * Opens the TAP `name` (created, non-persistent, when it does not exist and the process may
 * create interfaces; '' lets the kernel pick tapN). Errors say what to do: a missing
 * /dev/net/tun, a permission problem, a TAP another process holds.
 */
export function openTap(name: string, options: OpenTapOptions = {}): Tap {
  if (typeof name !== 'string') throw argTypeError('name must be a string');
  if (Buffer.byteLength(name) > MAX_TAP_NAME_BYTES || name.includes('\0') || name.includes('/')) {
    throw argValueError(`a TAP name is at most ${MAX_TAP_NAME_BYTES} bytes without NUL or '/', got ${JSON.stringify(name)}`);
  }
  if (typeof options !== 'object' || options === null) throw argTypeError('options must be an object');
  if (options.netns !== undefined && (typeof options.netns !== 'string' || options.netns === '')) throw argTypeError('netns must be a path');
  try {
    const [fd, actual] = native.tapOpen(name, options.netns ?? null);
    return { fd, name: actual };
  } catch (error) {
    throw explainTapError(error, name, options.netns);
  }
}

/**
 * Takes over a TAP fd opened elsewhere (a privileged helper hands one over): it must be a TAP
 * opened with IFF_NO_PI and IFF_VNET_HDR. Returns a close-on-exec duplicate set up as openTap's
 * (12-byte header, no offloads, non-blocking: the flag is shared with the caller's fd); the
 * caller may close its own fd.
 */
export function adoptTap(fd: number): Tap {
  checkInteger(fd, 'fd', 0, 0x7fffffff);
  try {
    const [copy, name] = native.tapAdopt(fd);
    return { fd: copy, name };
  } catch (error) {
    const e = error as KvmError;
    if (e instanceof KvmError && (e.code === 'EBADFD' || e.code === 'EINVAL' || e.code === 'ENOTTY' || e.code === 'EBADF')) {
      throw new KvmError(e.code, e.errno, e.syscall, `fd ${fd} is not an open TAP device (${e.code})`);
    }
    throw error;
  }
}

function explainTapError(error: unknown, name: string, netns: string | undefined): unknown {
  if (!(error instanceof KvmError)) return error;
  const where = netns === undefined ? '' : ` in the network namespace ${netns}`;
  const what = `cannot open the TAP ${name === '' ? '(any name)' : JSON.stringify(name)}${where}`;
  let hint: string;
  switch (error.syscall) {
    case 'open(/dev/net/tun)':
      hint = error.code === 'ENOENT' || error.code === 'ENODEV' || error.code === 'ENXIO'
        ? '/dev/net/tun does not exist: load the tun module (modprobe tun) or create the node (mknod /dev/net/tun c 10 200)'
        : error.code === 'EACCES' || error.code === 'EPERM' ? 'permission denied opening /dev/net/tun' : error.message;
      break;
    case 'ioctl(TUNSETIFF)':
      hint = error.code === 'EBUSY'
        ? 'another process has it open (a TAP serves one queue here)'
        : error.code === 'EPERM'
          ? 'operation not permitted: creating a TAP needs CAP_NET_ADMIN; or create it beforehand for this user (ip tuntap add dev NAME mode tap user USER)'
          : error.code === 'EINVAL'
            ? 'an interface of that name exists and is not a TAP (or was made with other flags)'
            : error.message;
      break;
    case 'open(netns)':
      hint = error.code === 'ENOENT' ? 'no such network namespace' : error.message;
      break;
    case 'setns(CLONE_NEWNET)':
      hint = error.code === 'EPERM' ? 'joining a network namespace needs CAP_SYS_ADMIN' : error.code === 'EINVAL' ? 'not a network namespace file' : error.message;
      break;
    default:
      hint = error.message;
  }
  return new KvmError(error.code, error.errno, error.syscall, `${what}: ${hint}`);
}
