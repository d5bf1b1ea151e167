// Megabytes in flight on a migration connection. Linux gives a unix socket about 200 KiB, so a
// sender stalls whenever the receiver stops reading to copy a section into guest RAM, and the two
// processes take turns instead of working at once.
import { Socket, type OnReadOpts, type SocketConstructorOpts } from 'node:net';
import { argTypeError } from '../kvm/errors.js';
import { dupSocket, setSocketBuffers } from '../kvm/host.js';
import { MigrationError, MigrationErrorCode as Code } from './errors.js';

export const MIGRATION_SOCKET_BUFFER_BYTES = 4 * 1024 * 1024;

/** The file descriptor under a connected socket (Node keeps it in its handle), -1 if it has none. */
export function socketFd(socket: Socket): number {
  const fd = (socket as unknown as { _handle?: { fd?: unknown } })._handle?.fd;
  return typeof fd === 'number' && Number.isInteger(fd) && fd >= 0 ? fd : -1;
}

/**
 * Best effort (the kernel caps it at net.core.wmem_max/rmem_max). Only unix sockets: TCP sizes
 * its own buffers automatically, and a fixed size would switch that off.
 */
export function enlargeSocketBuffers(socket: Socket, bytes = MIGRATION_SOCKET_BUFFER_BYTES): void {
  if (socket.remoteFamily !== undefined) return; // tcp
  const fd = socketFd(socket);
  if (fd < 0) return;
  try {
    setSocketBuffers(fd, bytes, bytes);
  } catch {
    // A smaller buffer only costs speed.
  }
}

/**
 * The same connection as a new Socket whose reads land in `buffer`, as much as the kernel holds
 * up to its size, each handed to `onRead(bytes)` (valid only during the call; return false to stop
 * reading). `buffer` may be a function that gives the buffer of each read. Node's own sockets read 64 KiB at a time into a new Buffer each, with a JavaScript
 * event per read: at migration rates that, not the kernel, limits a receiver (64 MiB over
 * loopback TCP: about 45 ms that way, 15 ms with a 4 MiB buffer here).
 *
 * `socket` must be idle: not reading (paused, or nothing in flight), nothing unread in its buffer.
 * It is destroyed; the connection lives on in the socket returned, which owns a duplicate of the fd.
 */
export function reopenWithReadBuffer(socket: Socket, buffer: Uint8Array | (() => Uint8Array), onRead: (bytes: Uint8Array) => boolean | void): Socket {
  if (typeof buffer !== 'function' && (!(buffer instanceof Uint8Array) || buffer.length === 0)) throw argTypeError('buffer must be a non-empty Uint8Array or a function that returns one');
  if (typeof onRead !== 'function') throw argTypeError('onRead must be a function');
  const fd = socketFd(socket);
  if (fd < 0) throw new MigrationError(Code.Closed, 'the connection has no file descriptor (closed?)');
  socket.pause();
  if (socket.readableLength > 0) throw new MigrationError(Code.InvalidState, `the connection has ${socket.readableLength} unread bytes`);
  const copy = dupSocket(fd);
  socket.removeAllListeners('data');
  socket.on('error', () => {});
  socket.destroy();
  // net.connect()'s `onread`, which the Socket constructor takes too (Node's typings list it for
  // connect() only).
  const options: SocketConstructorOpts & { onread: OnReadOpts } = {
    fd: copy,
    readable: true,
    writable: true,
    onread: { buffer, callback: (byteCount: number, filled: Uint8Array) => onRead(filled.subarray(0, byteCount)) !== false },
  };
  return new Socket(options);
}
