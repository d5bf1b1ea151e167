// Migration addresses (tcp:HOST:PORT, unix:PATH) and the private unix socket file a destination
// (or the control API) listens on.
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { argTypeError, argValueError, outOfRangeError } from '../kvm/errors.js';
import { MigrationError } from './errors.js';

export type MigrationAddress = { kind: 'tcp'; host: string; port: number } | { kind: 'unix'; path: string };

/** sockaddr_un.sun_path holds 108 bytes including the terminating NUL. */
const MAX_UNIX_PATH_BYTES = 107;

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

export function formatMigrationAddress(address: MigrationAddress): string {
  if (address.kind === 'unix') return `unix:${address.path}`;
  return address.host.includes(':') ? `tcp:[${address.host}]:${address.port}` : `tcp:${address.host}:${address.port}`;
}


/**
 * Listens on a unix socket file that only this user can open (mode 0600), then returns the
 * function that removes it. The file's mode comes from the umask at bind(), and changing it
 * afterwards leaves a moment when it is wider; process.umask() is process-wide (other threads
 * create files too) and unavailable in workers. So the socket is bound inside a fresh directory
 * of mode 0700 (mkdtemp) beside the target, made 0600 there, where nobody else can reach it,
 * and then hard-linked to its name: link() never replaces an existing file, unlike rename().
 * An existing socket nobody listens on (left by a process that died) is replaced; anything else
 * at that path is refused.
 */
export async function listenOnPrivateUnixSocket(server: net.Server, socketPath: string): Promise<() => void> {
  checkUnixPath(socketPath, `unix:${socketPath}`);
  const target = path.resolve(socketPath);
  await removeStaleSocket(target);
  const privateDir = fs.mkdtempSync(path.join(path.dirname(target), '.nkvm-'));
  const privatePath = path.join(privateDir, 's');
  try {
    if (Buffer.byteLength(privatePath) > MAX_UNIX_PATH_BYTES) {
      throw argValueError(`the socket path ${socketPath} is too long to create safely (its directory's path leaves no room)`);
    }
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen({ path: privatePath, exclusive: true }, () => {
        server.off('error', reject);
        resolve();
      });
    });
    fs.chmodSync(privatePath, 0o600);
    try {
      fs.linkSync(privatePath, target);
    } catch (error) {
      server.close();
      throw (error as NodeJS.ErrnoException).code === 'EEXIST'
        ? new MigrationError('EEXIST', `${socketPath} appeared while this socket was being created`, { cause: error })
        : error;
    }
  } finally {
    fs.rmSync(privatePath, { force: true });
    fs.rmdirSync(privateDir);
  }
  const { ino, dev } = fs.lstatSync(target);
  return () => {
    // Only our own socket: the name may have been taken over since.
    try {
      const now = fs.lstatSync(target);
      if (now.ino === ino && now.dev === dev) fs.unlinkSync(target);
    } catch {
      // already gone
    }
  };
}

async function removeStaleSocket(target: string): Promise<void> {
  let stats: fs.Stats;
  try {
    stats = fs.lstatSync(target);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') return;
    throw error;
  }
  if (!stats.isSocket()) throw new MigrationError('EEXIST', `refusing to replace ${target}: it exists and is not a socket`);
  const live = await new Promise<boolean>((resolve, reject) => {
    const probe = net.createConnection({ path: target });
    probe.once('connect', () => {
      probe.destroy();
      resolve(true);
    });
    probe.once('error', (error: NodeJS.ErrnoException) => {
      if (error.code === 'ECONNREFUSED') resolve(false);
      else reject(error);
    });
  });
  if (live) throw new MigrationError('EADDRINUSE', `${target} is in use: something is listening there`);
  fs.unlinkSync(target);
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
