// Megabytes in flight on a migration connection. Linux gives a unix socket about 200 KiB, so a
// sender stalls whenever the receiver stops reading to copy a section into guest RAM, and the two
// processes take turns instead of working at once.
import type { Socket } from 'node:net';
import { native } from '../kvm/native.js';

export const MIGRATION_SOCKET_BUFFER_BYTES = 4 * 1024 * 1024;

/**
 * Best effort (the kernel caps it at net.core.wmem_max/rmem_max). Only unix sockets: TCP sizes
 * its own buffers automatically, and a fixed size would switch that off.
 */
export function enlargeSocketBuffers(socket: Socket, bytes = MIGRATION_SOCKET_BUFFER_BYTES): void {
  if (socket.remoteFamily !== undefined) return; // tcp
  const fd = (socket as unknown as { _handle?: { fd?: unknown } })._handle?.fd;
  if (typeof fd !== 'number' || fd < 0) return;
  try {
    native.setSocketBuffers(fd, bytes, bytes);
  } catch {
    // A smaller buffer only costs speed.
  }
}
