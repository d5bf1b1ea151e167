// Where a GDB stub listens: tcp:HOST:PORT (loopback when HOST is empty, as in tcp::1234) or
// unix:PATH (a socket file of mode 0600). The stub gives whoever connects full control of the
// guest, so nothing listens beyond this host unless asked.
import net from 'node:net';
import { argTypeError, argValueError } from '../kvm/errors.js';
import { listenOnPrivateUnixSocket } from '../kvm/unix-socket.js';

/** Where a GDB stub listens: a TCP host and port, or a unix socket path. */
export type GdbAddress = { kind: 'tcp'; host: string; port: number } | { kind: 'unix'; path: string };

/** Parses `tcp:HOST:PORT` (`tcp:[::1]:1234` for IPv6, `tcp::1234` for loopback) or `unix:PATH`. */
export function parseGdbAddress(text: string): GdbAddress {
  if (typeof text !== 'string') throw argTypeError('the gdb address must be a string');
  if (text.startsWith('unix:')) {
    const path = text.slice('unix:'.length);
    if (path === '' || path.includes('\0')) throw argValueError(`gdb address '${text}': unix:PATH needs a path`);
    return { kind: 'unix', path };
  }
  const match = /^tcp:(?:\[([0-9a-fA-F:.]+)\]|([A-Za-z0-9._-]*)):(\d{1,5})$/.exec(text);
  if (!match || Number(match[3]) > 65535) throw argValueError(`gdb address '${text}' must be tcp:HOST:PORT or unix:PATH`);
  return { kind: 'tcp', host: match[1] ?? (match[2] || '127.0.0.1'), port: Number(match[3]) };
}

/** The address as parseGdbAddress() reads it: `tcp:HOST:PORT` (an IPv6 host in brackets) or `unix:PATH`. */
export function formatGdbAddress(address: GdbAddress): string {
  if (address.kind === 'unix') return `unix:${address.path}`;
  return address.host.includes(':') ? `tcp:[${address.host}]:${address.port}` : `tcp:${address.host}:${address.port}`;
}

/**
 * Listens on `address`; returns what it listens on (the port chosen for port 0) and a function
 * that removes a unix socket file again (created 0600 from the start, never replacing a live one).
 */
export async function listenAt(server: net.Server, address: GdbAddress): Promise<{ listening: GdbAddress; cleanup: () => void }> {
  if (address.kind === 'unix') return { listening: address, cleanup: await listenOnPrivateUnixSocket(server, address.path) };
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen({ host: address.host, port: address.port, exclusive: true }, () => {
      server.off('error', reject);
      resolve();
    });
  });
  const bound = server.address() as net.AddressInfo;
  return { listening: { kind: 'tcp', host: address.host, port: bound.port }, cleanup: () => {} };
}
