// Connections for live migration: the destination that waits for exactly one migration, serving
// the handshakes (handshake.ts) of all its connections at once, and the source that connects to
// it. Addresses and unix socket files: addresses.ts.
import net from 'node:net';
import { setTimeout as delay } from 'node:timers/promises';
import { argTypeError, argValueError, outOfRangeError } from '../kvm/errors.js';
import { checkAddress, formatMigrationAddress, listenOnPrivateUnixSocket, type MigrationAddress } from './addresses.js';
import { MigrationError, MigrationErrorCode as Code, abortError, throwIfAborted } from './errors.js';
import { Deadline, acceptHandshake, describeError, offerHandshake, rehearseHandshake, warmUpHandshake } from './handshake.js';

export {
  formatMigrationAddress, listenOnPrivateUnixSocket, parseMigrationAddress, type MigrationAddress,
} from './addresses.js';
export { MIGRATION_PROTOCOL_VERSION } from './handshake.js';

const DEFAULT_HANDSHAKE_TIMEOUT_MS = 10_000;
/** The source sends its hello as soon as it has read the greeting: one round trip. */
const DEFAULT_HELLO_TIMEOUT_MS = 2_000;
const DEFAULT_CONNECT_TIMEOUT_MS = 10_000;
/** How soon the source tries again when the destination's unix socket backlog is full. */
const UNIX_BACKLOG_RETRY_MS = 10;
/**
 * Connections that have not proved themselves yet, held at once. Each holds a file descriptor
 * and some 13 KiB; the cap is large so that a flood has to open this many connections within one
 * round trip of the real source to push it out (the oldest is dropped first).
 */
const DEFAULT_MAX_UNAUTHENTICATED_CONNECTIONS = 1024;
const DEFAULT_REJECTION_REPORTS_PER_SECOND = 10;
const REJECTION_REPORT_WINDOW_MS = 1000;
/**
 * Stream buffering in Node per socket. The kernel's own TCP buffers are left to Linux's
 * autotuning (tcp_rmem/tcp_wmem), which setting SO_SNDBUF/SO_RCVBUF would switch off.
 */
const SOCKET_HIGH_WATER_MARK_BYTES = 1024 * 1024;


export interface ListenForMigrationOptions {
  /** Required for tcp. For unix, optional: when given, the source must prove it knows it. */
  token?: string;
  /** Give up if no authenticated migration has arrived by then. Default: wait indefinitely. */
  timeoutMs?: number;
  /** Each connection gets this long for its whole handshake. Default 10 s. */
  handshakeTimeoutMs?: number;
  /**
   * Each connection must have sent its whole hello this long after it was accepted (a peer that
   * trickles it in a byte at a time is dropped all the same). Default 2 s; the handshake's own
   * limit applies too.
   */
  helloTimeoutMs?: number;
  /**
   * Connections held at once that have not yet proved they know the token (or, without a token,
   * sent a valid hello). When one more arrives, the oldest of them is dropped, so that peers
   * which connect and wait cannot keep a newer connection (the real source's) out. Default 1024.
   */
  maxUnauthenticatedConnections?: number;
  /** Called once listening, with the real port (for port 0) or socket path. */
  onListening?: (bound: MigrationAddress) => void;
  /**
   * A connection that failed the handshake (wrong token, not a migration source, timed out,
   * dropped for a newer one): it is closed and the destination keeps waiting for the migration
   * it was started for. Called at most `rejectionReportsPerSecond` times a second; rejections
   * beyond that are counted, and once the second is over (or listening ends) one more call
   * reports how many there were, with the last one's reason and peer: `REASON (the last of N
   * connections refused, not reported one by one: at most M reports a second)`. An exception it
   * throws is ignored.
   */
  onRejected?: (reason: string, peer: string) => void;
  /** Default 10. */
  rejectionReportsPerSecond?: number;
  signal?: AbortSignal;
}

/**
 * The destination: listens at `address` (tcp on the given host; '' means 127.0.0.1, all
 * interfaces only if the caller says 0.0.0.0 or ::), accepts exactly one connection that passes
 * the handshake, stops listening, and resolves with it. The socket is paused with no listeners:
 * attach an 'error' listener at once. Unix socket files are created with mode 0600 and removed
 * when the listener closes.
 */
export async function listenForMigration(address: MigrationAddress, options: ListenForMigrationOptions = {}): Promise<net.Socket> {
  const target = checkAddress(address);
  const token = checkToken(options.token);
  if (target.kind === 'tcp' && token === undefined) {
    throw argTypeError('a token is required to listen for a migration over tcp (anyone who can reach the port could send a guest)');
  }
  const timeoutMs = checkTimeout(options.timeoutMs, 'timeoutMs');
  const handshakeTimeoutMs = checkTimeout(options.handshakeTimeoutMs, 'handshakeTimeoutMs') ?? DEFAULT_HANDSHAKE_TIMEOUT_MS;
  const helloTimeoutMs = Math.min(checkTimeout(options.helloTimeoutMs, 'helloTimeoutMs') ?? DEFAULT_HELLO_TIMEOUT_MS, handshakeTimeoutMs);
  const maxUnauthenticated = checkCount(options.maxUnauthenticatedConnections, 'maxUnauthenticatedConnections') ?? DEFAULT_MAX_UNAUTHENTICATED_CONNECTIONS;
  const reportsPerSecond = checkCount(options.rejectionReportsPerSecond, 'rejectionReportsPerSecond') ?? DEFAULT_REJECTION_REPORTS_PER_SECOND;
  const label = formatMigrationAddress(target);
  throwIfAborted(options.signal, `listening for a migration on ${label}`);

  warmUpHandshake();
  await rehearseHandshake();
  const server = net.createServer({ pauseOnConnect: true, highWaterMark: SOCKET_HIGH_WATER_MARK_BYTES });
  const pending = new Set<net.Socket>();
  /** In the order they arrived: the first is the one to drop. */
  const unauthenticated = new Map<net.Socket, { droppedFor?: string }>();
  let removeSocketFile = () => {};
  let bound: MigrationAddress;
  try {
    if (target.kind === 'unix') {
      removeSocketFile = await listenOnPrivateUnixSocket(server, target.path);
      bound = { kind: 'unix', path: target.path };
    } else {
      const host = target.host === '' ? '127.0.0.1' : target.host;
      await new Promise<void>((resolve, reject) => {
        server.once('error', reject);
        server.listen({ host, port: target.port, exclusive: true }, () => {
          server.off('error', reject);
          resolve();
        });
      });
      const info = server.address() as net.AddressInfo;
      bound = { kind: 'tcp', host, port: info.port };
    }
  } catch (error) {
    server.close();
    throw new MigrationError(systemCode(error), `cannot listen for a migration on ${label}: ${describeError(error)}`, { cause: error });
  }

  return new Promise<net.Socket>((resolve, reject) => {
    let settled = false;
    let claimed = false;
    const reports = new RejectionReports(reportsPerSecond, options.onRejected);
    const finish = (error: Error | null, socket?: net.Socket) => {
      if (settled) return;
      reports.close();
      settled = true;
      if (timer) clearTimeout(timer);
      options.signal?.removeEventListener('abort', onAbort);
      server.off('connection', onConnection);
      server.close();
      removeSocketFile();
      for (const other of pending) if (other !== socket) other.destroy();
      pending.clear();
      unauthenticated.clear();
      if (error) reject(error);
      else resolve(socket!);
    };
    const onAbort = () => finish(abortError(`stopped listening for a migration on ${label}`, options.signal));
    const timer = timeoutMs === undefined ? null : setTimeout(() => {
      finish(new MigrationError(Code.TimedOut, `no migration arrived on ${formatMigrationAddress(bound)} within ${timeoutMs} ms`));
    }, timeoutMs);
    options.signal?.addEventListener('abort', onAbort, { once: true });
    // A listener that fails after it started (rare: EMFILE on accept) ends the wait.
    server.on('error', (error) => finish(new MigrationError(systemCode(error), `listening for a migration on ${label} failed: ${describeError(error)}`, { cause: error })));

    const onConnection = (socket: net.Socket) => {
      const peer = target.kind === 'unix' ? 'a local process' : `${socket.remoteAddress}:${socket.remotePort}`;
      socket.on('error', () => {}); // reported through the handshake's own reads
      if (unauthenticated.size >= maxUnauthenticated) {
        const [oldest, state] = unauthenticated.entries().next().value as [net.Socket, { droppedFor?: string }];
        unauthenticated.delete(oldest);
        state.droppedFor = `dropped for a newer connection: ${maxUnauthenticated} connections were already waiting to prove themselves`;
        oldest.destroy();
      }
      const state: { droppedFor?: string } = {};
      pending.add(socket);
      unauthenticated.set(socket, state);
      socket.setNoDelay(true);
      const helloDeadline = new Deadline(helloTimeoutMs, 'handshake');
      const handshakeDeadline = new Deadline(handshakeTimeoutMs, 'handshake');
      acceptHandshake(socket, token, helloDeadline, handshakeDeadline, () => {
        if (settled || claimed) return false;
        claimed = true;
        unauthenticated.delete(socket);
        return true;
      }).then((outcome) => {
        pending.delete(socket);
        unauthenticated.delete(socket);
        if (outcome === 'accepted') {
          socket.removeAllListeners('error');
          if (settled) socket.destroy(); // timed out or aborted in the meantime
          else finish(null, socket);
          return;
        }
        if (outcome.claimed) claimed = false;
        // A refusal ends the socket itself once its reason is flushed.
        if (!socket.writableEnded) socket.destroy();
        if (!settled) reports.report(state.droppedFor ?? outcome.reason, peer);
      }, (error: Error) => {
        // acceptHandshake reports failures as outcomes; this is a bug guard, not a path.
        pending.delete(socket);
        unauthenticated.delete(socket);
        socket.destroy();
        if (!settled) reports.report(error.message, peer);
      });
    };
    server.on('connection', onConnection);
    if (options.signal?.aborted) onAbort();
    else options.onListening?.(bound);
  });
}

export interface ConnectForMigrationOptions {
  /** Required for tcp; for unix, required when the destination has one. */
  token?: string;
  /** For connecting plus the whole handshake. Default 10 s. */
  timeoutMs?: number;
  signal?: AbortSignal;
  /**
   * Called once, synchronously, as soon as the connection is asked for: work the caller must do
   * before it sends anything (its dirty tracking, say) then overlaps the connection and the
   * destination's greeting, which take a millisecond or more of waiting. What it throws fails the
   * connection (the socket is destroyed) and rejects with that error.
   */
  whileConnecting?: () => void;
  /**
   * Called once, synchronously, when the hello has gone out and the destination is checking it:
   * work the caller must do before it sends anything (finding what to send first, say) then overlaps that
   * round trip. Nothing has been sent to the destination yet beyond the handshake. What it throws
   * fails the connection (the socket is destroyed) and rejects with that error.
   */
  whileVerified?: () => void;
}

/**
 * The source: connects to a destination and runs the handshake. Resolves with the socket, paused
 * with no listeners: attach an 'error' listener at once.
 */
export async function connectForMigration(address: MigrationAddress, options: ConnectForMigrationOptions = {}): Promise<net.Socket> {
  const target = checkAddress(address);
  const token = checkToken(options.token);
  if (target.kind === 'tcp' && token === undefined) throw argTypeError('a token is required to migrate over tcp');
  if (target.kind === 'tcp' && target.port === 0) throw argValueError(`cannot connect to port 0 (${formatMigrationAddress(target)})`);
  const timeoutMs = checkTimeout(options.timeoutMs, 'timeoutMs') ?? DEFAULT_CONNECT_TIMEOUT_MS;
  if (options.whileConnecting !== undefined && typeof options.whileConnecting !== 'function') throw argTypeError('whileConnecting must be a function');
  if (options.whileVerified !== undefined && typeof options.whileVerified !== 'function') throw argTypeError('whileVerified must be a function');
  const label = formatMigrationAddress(target);
  throwIfAborted(options.signal, `migration to ${label}`);
  const deadline = new Deadline(timeoutMs, `migration connect to ${label}`);

  // highWaterMark reaches the stream (net.Socket passes its options to Duplex); @types/node lacks it.
  const connectOptions: net.NetConnectOpts & { highWaterMark: number } = target.kind === 'unix'
    ? { path: target.path, highWaterMark: SOCKET_HIGH_WATER_MARK_BYTES }
    : { host: target.host === '' ? '127.0.0.1' : target.host, port: target.port, highWaterMark: SOCKET_HIGH_WATER_MARK_BYTES };
  // Failures surface through the step that is waiting; this keeps one between steps from
  // becoming an uncaught 'error'.
  const errorSink = (_error: Error) => {};
  const open = () => net.createConnection(connectOptions).on('error', errorSink);
  let socket = open();
  const aborted = () => abortError(`migration to ${label}`, options.signal);
  const onAbort = () => socket.destroy(aborted());
  options.signal?.addEventListener('abort', onAbort, { once: true });
  try {
    // While the connection is made and the destination greets; after the connect itself, which
    // net issues on the next tick.
    await new Promise<void>((resolve) => process.nextTick(resolve));
    if (token !== undefined) warmUpHandshake();
    options.whileConnecting?.();
    for (;;) {
      const failure = await connected(socket, deadline);
      if (failure === null) break;
      // A unix socket's backlog is full: the destination is behind on accepting a burst of
      // connections (a flood, perhaps), and connect() fails at once where TCP would retry.
      const backlogFull = target.kind === 'unix' && (failure as NodeJS.ErrnoException).code === 'EAGAIN';
      if (!backlogFull || deadline.remainingMs() === 0) {
        throw failure instanceof MigrationError
          ? failure
          : new MigrationError(Code.Connect, `cannot connect to ${label}: ${describeError(failure)}${connectHint(failure)}`, { cause: failure });
      }
      socket.destroy();
      try {
        await delay(Math.min(UNIX_BACKLOG_RETRY_MS, deadline.remainingMs()), undefined, { signal: options.signal });
      } catch {
        throw aborted();
      }
      socket = open();
    }
    socket.setNoDelay(true);
    await offerHandshake(socket, token, deadline, options.whileVerified);
    return socket;
  } catch (error) {
    // A refusal already ended the socket (its last byte still to be flushed).
    if (!socket.writableEnded) socket.destroy();
    throw error;
  } finally {
    options.signal?.removeEventListener('abort', onAbort);
    socket.off('error', errorSink);
  }
}

/** Resolves with null once connected, or with what failed: an error, or the deadline passing. */
function connected(socket: net.Socket, deadline: Deadline): Promise<Error | null> {
  return new Promise((resolve) => {
    const timer = setTimeout(() => {
      socket.off('connect', onConnect);
      socket.off('error', onError);
      resolve(new MigrationError(Code.TimedOut, `${deadline.what} timed out after ${deadline.totalMs} ms while connecting`));
    }, deadline.remainingMs());
    const onConnect = () => {
      clearTimeout(timer);
      socket.off('error', onError);
      resolve(null);
    };
    const onError = (error: Error) => {
      clearTimeout(timer);
      socket.off('connect', onConnect);
      resolve(error);
    };
    socket.once('connect', onConnect);
    socket.once('error', onError);
  });
}


/**
 * Passes rejections on to the caller at most `perSecond` a second, so that a flood of connections
 * cannot become a flood of log lines; the rest are counted and reported in one call when the
 * second is over or `close()` is called.
 */
class RejectionReports {
  #reportedInWindow = 0;
  #unreported = 0;
  #lastUnreported = { reason: '', peer: '' };
  #windowTimer: NodeJS.Timeout | null = null;
  constructor(readonly perSecond: number, readonly onRejected: ((reason: string, peer: string) => void) | undefined) {}

  report(reason: string, peer: string): void {
    if (!this.onRejected) return;
    if (this.#windowTimer === null) {
      this.#windowTimer = setTimeout(() => this.#endWindow(), REJECTION_REPORT_WINDOW_MS);
      this.#windowTimer.unref();
    }
    if (this.#reportedInWindow < this.perSecond) {
      this.#reportedInWindow++;
      this.#call(reason, peer);
    } else {
      this.#unreported++;
      this.#lastUnreported = { reason, peer };
    }
  }

  close(): void {
    if (this.#windowTimer) clearTimeout(this.#windowTimer);
    this.#endWindow();
  }

  #endWindow(): void {
    this.#windowTimer = null;
    this.#reportedInWindow = 0;
    if (this.#unreported === 0) return;
    const count = this.#unreported;
    this.#unreported = 0;
    const { reason, peer } = this.#lastUnreported;
    this.#call(`${reason} (the last of ${count} ${count === 1 ? 'connection' : 'connections'} refused, not reported one by one: at most ${this.perSecond} reports a second)`, peer);
  }

  #call(reason: string, peer: string): void {
    try {
      this.onRejected?.(reason, peer);
    } catch {
      // The caller's logging must not end the wait for the migration (nor the process).
    }
  }
}


function checkToken(token: string | undefined): string | undefined {
  if (token === undefined) return undefined;
  if (typeof token !== 'string') throw argTypeError('token must be a string');
  if (token === '') throw argValueError('token must not be empty');
  return token;
}

function checkTimeout(value: number | undefined, name: string): number | undefined {
  if (value === undefined) return undefined;
  if (typeof value !== 'number' || !Number.isFinite(value) || value <= 0 || value > 2 ** 31 - 1) {
    throw outOfRangeError(`${name} must be a positive number of milliseconds, got ${value}`);
  }
  return value;
}

function checkCount(value: number | undefined, name: string): number | undefined {
  if (value === undefined) return undefined;
  if (!Number.isSafeInteger(value) || value < 1) throw outOfRangeError(`${name} must be a positive integer, got ${value}`);
  return value;
}


function connectHint(error: unknown): string {
  const code = (error as NodeJS.ErrnoException).code;
  if (code === 'ECONNREFUSED' || code === 'ENOENT') return ' (is the destination listening?)';
  if (code === 'EAGAIN') return ' (its backlog stayed full until the deadline)';
  return '';
}


/** A system error's code ('EADDRINUSE'), or ECONNECT for anything else that failed on the socket. */
function systemCode(error: unknown): string {
  const code = (error as NodeJS.ErrnoException | undefined)?.code;
  return typeof code === 'string' ? code : Code.Connect;
}
