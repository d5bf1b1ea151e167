// Connections for live migration: addresses (tcp:HOST:PORT, unix:PATH), the destination that
// waits for exactly one migration, the source that connects to it, and the handshake by which
// both ends prove they hold the same token without sending it.
//
// Handshake (all integers big-endian):
//   destination -> source  greeting  MAGIC(8) version(u16) flags(u8: bit 0 = token required) nonceD(32)
//   source -> destination  hello     MAGIC(8) version(u16) flags(u8: bit 0 = has a token) nonceS(32) proofS(32)
//   destination -> source  verdict   0x00 proofD(32)  |  0x01 length(u8) reason(UTF-8)
//   source -> destination  ack       0x00 (the source accepts the destination)  |  0x01
// proofS = HMAC-SHA256(token, "node-kvm migration source" || nonceD || nonceS), proofD the same
// with "destination"; both are zeros where that side has no token. Both nonces are fresh random
// bytes, so a recorded proof is useless for another connection. The destination proves itself
// too: a source with a token sends guest memory only to a destination that knows the token, not
// to whatever happens to listen on the port.
import { createHmac, randomBytes, timingSafeEqual } from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import { argTypeError, argValueError, outOfRangeError } from '../kvm/errors.js';
import { MigrationError, MigrationErrorCode as Code, abortError, throwIfAborted } from './errors.js';

export type MigrationAddress = { kind: 'tcp'; host: string; port: number } | { kind: 'unix'; path: string };

export const MIGRATION_PROTOCOL_VERSION = 1;
const MAGIC = Buffer.from('NKVM-MIG', 'latin1');
const NONCE_BYTES = 32;
const PROOF_BYTES = 32;
const GREETING_BYTES = MAGIC.length + 2 + 1 + NONCE_BYTES;
const HELLO_BYTES = MAGIC.length + 2 + 1 + NONCE_BYTES + PROOF_BYTES;
const FLAG_TOKEN = 0x01;
const ACCEPTED = 0x00;
const REFUSED = 0x01;
const SOURCE_LABEL = Buffer.from('node-kvm migration source', 'latin1');
const DESTINATION_LABEL = Buffer.from('node-kvm migration destination', 'latin1');
/** sockaddr_un.sun_path holds 108 bytes including the terminating NUL. */
const MAX_UNIX_PATH_BYTES = 107;
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
    await offerHandshake(socket, token, deadline);
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

type AcceptOutcome = 'accepted' | { reason: string; claimed: boolean };

/**
 * The destination's half. `claim` is asked once the source has proved itself: only one
 * connection may go on to become the migration.
 */
async function acceptHandshake(
  socket: net.Socket,
  token: string | undefined,
  helloDeadline: Deadline,
  deadline: Deadline,
  claim: () => boolean,
): Promise<AcceptOutcome> {
  let claimed = false;
  const errorSink = (_error: Error) => {};
  socket.on('error', errorSink);
  try {
    const nonceD = randomBytes(NONCE_BYTES);
    socket.write(Buffer.concat([MAGIC, u16(MIGRATION_PROTOCOL_VERSION), Buffer.of(token === undefined ? 0 : FLAG_TOKEN), nonceD]));
    // The magic alone first: a peer that is not a migration source is refused at its first bytes.
    const magic = await readExactly(socket, MAGIC.length, helloDeadline, 'the source\'s hello', { offsetBytes: 0, stepBytes: HELLO_BYTES });
    if (!magic.equals(MAGIC)) return refuse(socket, 'not a node-kvm migration source');
    const rest = await readExactly(socket, HELLO_BYTES - MAGIC.length, helloDeadline, 'the source\'s hello', { offsetBytes: MAGIC.length, stepBytes: HELLO_BYTES });
    const hello = Buffer.concat([magic, rest]);
    const version = hello.readUInt16BE(MAGIC.length);
    if (version !== MIGRATION_PROTOCOL_VERSION) return refuse(socket, `unsupported protocol version ${version} (this destination speaks ${MIGRATION_PROTOCOL_VERSION})`);
    const sourceHasToken = (hello[MAGIC.length + 2]! & FLAG_TOKEN) !== 0;
    const nonceS = hello.subarray(MAGIC.length + 3, MAGIC.length + 3 + NONCE_BYTES);
    const proofS = hello.subarray(MAGIC.length + 3 + NONCE_BYTES);
    if (token !== undefined) {
      if (!sourceHasToken) return refuse(socket, 'a token is required');
      if (!timingSafeEqual(proofS, proof(token, SOURCE_LABEL, nonceD, nonceS))) return refuse(socket, 'wrong token');
    }
    if (!claim()) return refuse(socket, 'another migration was accepted first');
    claimed = true;
    const proofD = token === undefined ? Buffer.alloc(PROOF_BYTES) : proof(token, DESTINATION_LABEL, nonceD, nonceS);
    socket.write(Buffer.concat([Buffer.of(ACCEPTED), proofD]));
    const [ack] = await readExactly(socket, 1, deadline, 'the source\'s acknowledgement');
    if (ack !== ACCEPTED) return { reason: 'the source refused this destination (it does not hold the same token)', claimed };
    return 'accepted';
  } catch (error) {
    return { reason: (error as Error).message, claimed };
  } finally {
    socket.off('error', errorSink);
  }
}

function refuse(socket: net.Socket, reason: string): AcceptOutcome {
  const text = Buffer.from(reason, 'utf8').subarray(0, 255);
  socket.end(Buffer.concat([Buffer.of(REFUSED, text.length), text]), () => socket.destroy());
  return { reason, claimed: false };
}

/** The source's half. */
async function offerHandshake(socket: net.Socket, token: string | undefined, deadline: Deadline): Promise<void> {
  const greeting = await readExactly(socket, GREETING_BYTES, deadline, 'the greeting');
  if (!greeting.subarray(0, MAGIC.length).equals(MAGIC)) {
    throw new MigrationError(Code.Protocol, `${deadline.what}: not a node-kvm migration destination`);
  }
  const version = greeting.readUInt16BE(MAGIC.length);
  if (version !== MIGRATION_PROTOCOL_VERSION) {
    throw new MigrationError(Code.Protocol, `${deadline.what}: the destination speaks protocol version ${version}, this side ${MIGRATION_PROTOCOL_VERSION}`);
  }
  const destinationWantsToken = (greeting[MAGIC.length + 2]! & FLAG_TOKEN) !== 0;
  if (token !== undefined && !destinationWantsToken) {
    throw new MigrationError(Code.Refused, 'migration refused: the destination was started without a token, so it cannot prove it is the intended one');
  }
  const nonceD = greeting.subarray(MAGIC.length + 3);
  const nonceS = randomBytes(NONCE_BYTES);
  const proofS = token === undefined ? Buffer.alloc(PROOF_BYTES) : proof(token, SOURCE_LABEL, nonceD, nonceS);
  socket.write(Buffer.concat([MAGIC, u16(MIGRATION_PROTOCOL_VERSION), Buffer.of(token === undefined ? 0 : FLAG_TOKEN), nonceS, proofS]));
  const [status] = await readExactly(socket, 1, deadline, 'the destination\'s verdict');
  if (status === REFUSED) {
    const [length] = await readExactly(socket, 1, deadline, 'the destination\'s reason');
    const reason = length === 0 ? 'no reason given' : (await readExactly(socket, length!, deadline, 'the destination\'s reason')).toString('utf8');
    throw new MigrationError(Code.Refused, `migration refused: ${reason}`);
  }
  if (status !== ACCEPTED) throw new MigrationError(Code.Protocol, `${deadline.what}: unexpected verdict byte ${status}`);
  const proofD = await readExactly(socket, PROOF_BYTES, deadline, 'the destination\'s proof');
  if (token !== undefined && !timingSafeEqual(proofD, proof(token, DESTINATION_LABEL, nonceD, nonceS))) {
    socket.end(Buffer.of(REFUSED), () => socket.destroy());
    throw new MigrationError(Code.Refused, 'migration refused: the destination does not hold the same token');
  }
  socket.write(Buffer.of(ACCEPTED));
}

function proof(token: string, label: Buffer, nonceD: Buffer, nonceS: Buffer): Buffer {
  return createHmac('sha256', token).update(label).update(nonceD).update(nonceS).digest();
}

/** One time limit for a sequence of steps; each step's error names the step. */
class Deadline {
  readonly #endsAt: number;
  constructor(readonly totalMs: number, readonly what: string) {
    this.#endsAt = Date.now() + totalMs;
  }
  remainingMs(): number {
    return Math.max(0, this.#endsAt - Date.now());
  }
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

/**
 * Reads exactly `byteCount` bytes, leaving anything after them in the socket's buffer for
 * whoever reads next (read(n) takes no more than n). `part` places this read inside a step read
 * in parts, for the count of bytes a timeout reports.
 */
function readExactly(
  socket: net.Socket,
  byteCount: number,
  deadline: Deadline,
  step: string,
  part: { offsetBytes: number; stepBytes: number } = { offsetBytes: 0, stepBytes: byteCount },
): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const cleanup = () => {
      clearTimeout(timer);
      socket.off('readable', tryRead);
      socket.off('end', onEnd);
      socket.off('close', onEnd);
      socket.off('error', onError);
    };
    const fail = (error: Error) => {
      cleanup();
      reject(error);
    };
    const tryRead = () => {
      const chunk = socket.read(byteCount) as Buffer | null;
      if (chunk === null) {
        if (socket.readableEnded || socket.destroyed) onEnd();
        return;
      }
      if (chunk.length < byteCount) {
        onEnd();
        return;
      }
      cleanup();
      resolve(chunk);
    };
    const onEnd = () => fail(new MigrationError(Code.Closed, `${deadline.what}: the peer closed the connection while this side waited for ${step}`));
    const onError = (error: Error) => fail(error instanceof MigrationError
      ? error
      : new MigrationError(Code.Closed, `${deadline.what}: ${describeError(error)} while waiting for ${step}`));
    const timer = setTimeout(() => {
      const arrivedBytes = part.offsetBytes + socket.readableLength;
      const partly = arrivedBytes > 0 ? ` (${arrivedBytes} of ${part.stepBytes} bytes arrived)` : '';
      fail(new MigrationError(Code.TimedOut, `${deadline.what} timed out after ${deadline.totalMs} ms waiting for ${step}${partly}`));
    }, deadline.remainingMs());
    socket.on('readable', tryRead);
    socket.on('end', onEnd);
    socket.on('close', onEnd);
    socket.on('error', onError);
    tryRead();
  });
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

function checkAddress(address: MigrationAddress): MigrationAddress {
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

function u16(value: number): Buffer {
  const bytes = Buffer.alloc(2);
  bytes.writeUInt16BE(value);
  return bytes;
}

function connectHint(error: unknown): string {
  const code = (error as NodeJS.ErrnoException).code;
  if (code === 'ECONNREFUSED' || code === 'ENOENT') return ' (is the destination listening?)';
  if (code === 'EAGAIN') return ' (its backlog stayed full until the deadline)';
  return '';
}

function describeError(error: unknown): string {
  const e = error as NodeJS.ErrnoException;
  return e.code && !(e instanceof MigrationError) ? e.code : e instanceof Error ? e.message : String(error);
}

/** A system error's code ('EADDRINUSE'), or ECONNECT for anything else that failed on the socket. */
function systemCode(error: unknown): string {
  const code = (error as NodeJS.ErrnoException | undefined)?.code;
  return typeof code === 'string' ? code : Code.Connect;
}
