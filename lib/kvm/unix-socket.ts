// A unix socket file only this user can open, for whatever the VMM serves on one: a migration
// destination, the control API, the serial console, the gdb stub.
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { NodeKvmError, argValueError } from './errors.js';

/** sockaddr_un.sun_path holds 108 bytes including the terminating NUL. */
export const MAX_UNIX_PATH_BYTES = 107;

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
  if (typeof socketPath !== 'string' || socketPath === '' || socketPath.includes('\0')) {
    throw argValueError(`a unix socket needs a path without NUL bytes, got ${JSON.stringify(socketPath)}`);
  }
  const bytes = Buffer.byteLength(path.resolve(socketPath));
  if (bytes > MAX_UNIX_PATH_BYTES) throw argValueError(`the socket path ${socketPath} is ${bytes} bytes, at most ${MAX_UNIX_PATH_BYTES} fit in sockaddr_un`);
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
        ? new NodeKvmError('EEXIST', `${socketPath} appeared while this socket was being created`, { cause: error })
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

/** Removes a socket file nobody listens on at `target`; refuses a live one (EADDRINUSE) or a file that is not a socket (EEXIST). */
export async function removeStaleSocket(target: string): Promise<void> {
  let stats: fs.Stats;
  try {
    stats = fs.lstatSync(target);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') return;
    throw error;
  }
  if (!stats.isSocket()) throw new NodeKvmError('EEXIST', `refusing to replace ${target}: it exists and is not a socket`);
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
  if (live) throw new NodeKvmError('EADDRINUSE', `${target} is in use: something is listening there`);
  fs.unlinkSync(target);
}
