// Migration addresses (tcp:HOST:PORT, unix:PATH). A destination listens on a unix path through
// listenOnPrivateUnixSocket() (lib/kvm/unix-socket.ts), as the control API and the gdb stub do.
import net from 'node:net';
import path from 'node:path';
import { argTypeError, argValueError, outOfRangeError } from '../kvm/errors.js';
import { MAX_UNIX_PATH_BYTES } from '../kvm/unix-socket.js';

export { listenOnPrivateUnixSocket } from '../kvm/unix-socket.js';

/** Where a migration goes or is received: a TCP host and port, or a unix socket path. */
export type MigrationAddress = { kind: 'tcp'; host: string; port: number } | { kind: 'unix'; path: string };

/** Parses `tcp:HOST:PORT` (IPv6 in brackets: `tcp:[::1]:4444`) or `unix:PATH`. */
export function parseMigrationAddress(text: string): MigrationAddress {
  if (typeof text !== 'string') throw argTypeError('address must be a string');
  if (text.startsWith('unix:')) {
    const socketPath = text.slice('unix:'.length);
    checkUnixPath(socketPath, text);
    return { kind: 'unix', path: socketPath };
  }
  if (text.startsWith('tcp:')) {
    const rest = text.slice('tcp:'.length);
    let host: string;
    let portText: string;
    if (rest.startsWith('[')) {
      const close = rest.indexOf(']');
      if (close < 0 || rest[close + 1] !== ':') throw argValueError(`migration address '${text}': an IPv6 host is written [ADDRESS]:PORT`);
      host = rest.slice(1, close);
      portText = rest.slice(close + 2);
      if (!net.isIPv6(host)) throw argValueError(`migration address '${text}': '${host}' is not an IPv6 address`);
    } else {
      const colon = rest.lastIndexOf(':');
      if (colon < 0) throw argValueError(`migration address '${text}' has no port (tcp:HOST:PORT)`);
      host = rest.slice(0, colon);
      portText = rest.slice(colon + 1);
      if (host === '') throw argValueError(`migration address '${text}' has an empty host (tcp:HOST:PORT)`);
      if (host.includes(':')) throw argValueError(`migration address '${text}': write an IPv6 host in brackets, as tcp:[${host}]:PORT`);
      if (!/^[A-Za-z0-9._-]+$/.test(host)) throw argValueError(`migration address '${text}': '${host}' is not a host name or address`);
    }
    if (!/^\d{1,5}$/.test(portText) || Number(portText) > 65535) {
      throw argValueError(`migration address '${text}': port '${portText}' is not a number 0..65535`);
    }
    return { kind: 'tcp', host, port: Number(portText) };
  }
  throw argValueError(`migration address '${text}' must be tcp:HOST:PORT or unix:PATH`);
}

/** The address as parseMigrationAddress() reads it: `tcp:HOST:PORT` (an IPv6 host in brackets) or `unix:PATH`. */
export function formatMigrationAddress(address: MigrationAddress): string {
  if (address.kind === 'unix') return `unix:${address.path}`;
  return address.host.includes(':') ? `tcp:[${address.host}]:${address.port}` : `tcp:${address.host}:${address.port}`;
}


export function checkAddress(address: MigrationAddress): MigrationAddress {
  if (typeof address !== 'object' || address === null) throw argTypeError('address must be a MigrationAddress object');
  if (address.kind === 'unix') {
    if (typeof address.path !== 'string') throw argTypeError('address.path must be a string');
    checkUnixPath(address.path, `unix:${address.path}`);
    return address;
  }
  if (address.kind === 'tcp') {
    if (typeof address.host !== 'string') throw argTypeError('address.host must be a string');
    if (!Number.isInteger(address.port) || address.port < 0 || address.port > 65535) throw outOfRangeError(`address.port must be an integer 0..65535, got ${address.port}`);
    return address;
  }
  throw argTypeError(`address.kind must be 'tcp' or 'unix'`);
}

function checkUnixPath(socketPath: string, text: string): void {
  if (socketPath === '') throw argValueError(`migration address '${text}' has an empty path (unix:PATH)`);
  if (socketPath.includes('\0')) throw argValueError(`migration address '${text}': the path contains a NUL byte`);
  const bytes = Buffer.byteLength(path.resolve(socketPath));
  if (bytes > MAX_UNIX_PATH_BYTES) throw argValueError(`migration address '${text}': the socket path is ${bytes} bytes, at most ${MAX_UNIX_PATH_BYTES} fit in sockaddr_un`);
}
