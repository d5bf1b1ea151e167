// Waiting for an fd on the calling thread's event loop: a device thread's notify eventfd (which
// KVM signals from an ioeventfd) or a TAP, beside the Node sockets it serves on the same loop.
import { argTypeError } from './errors.js';
import { checkInteger } from './handle.js';
import { native } from './native.js';

/** A watch on an fd's readiness (watchFd()), to stop with close(). */
export interface FdWatch {
  /** Stops watching; the fd stays open. A second call does nothing. */
  close(): void;
}

/**
 * Calls `onReadable` each time `fd` is readable (level-triggered: again and again until what is
 * there has been read). The watch keeps the thread's event loop alive until closed. The fd must
 * stay open while watched.
 */
export function watchFd(fd: number, onReadable: () => void): FdWatch {
  checkInteger(fd, 'fd', 0, 0x7fffffff);
  if (typeof onReadable !== 'function') throw argTypeError('onReadable must be a function');
  const close = native.watchFd(fd, () => onReadable());
  return { close };
}
