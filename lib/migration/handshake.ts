// The handshake of a migration connection, by which both ends prove they hold the same token
// without sending it; and reading exactly so many bytes from a socket, against a deadline.
//
// Handshake (all integers big-endian):
//   destination -> source  greeting  MAGIC(8) version(u16) flags(u8: bit 0 = token required,
//                                    bit 1 = reads a DeviceStateAhead section, see format.ts,
//                                    bit 2 = reads live Pages sections, see pages.ts) nonceD(32)
//   source -> destination  hello     MAGIC(8) version(u16) flags(u8: bit 0 = has a token) nonceS(32) proofS(32)
//   destination -> source  verdict   0x00 proofD(32)  |  0x01 length(u8) reason(UTF-8)
//   source -> destination  ack       0x00 (the source accepts the destination)  |  0x01
// proofS = HMAC-SHA256(token, "node-kvm migration source" || nonceD || nonceS), proofD the same
// with "destination"; both are zeros where that side has no token. Both nonces are fresh random
// bytes, so a recorded proof is useless for another connection. The destination proves itself
// too: a source with a token sends guest memory only to a destination that knows the token, not
// to whatever happens to listen on the port.
import { createHmac, randomBytes, timingSafeEqual } from 'node:crypto';
import type net from 'node:net';
import { Duplex } from 'node:stream';
import { NodeKvmError } from '../kvm/errors.js';
import { MigrationError, MigrationErrorCode as Code } from './errors.js';

export const MIGRATION_PROTOCOL_VERSION = 1;
const MAGIC = Buffer.from('NKVM-MIG', 'latin1');
const NONCE_BYTES = 32;
const PROOF_BYTES = 32;
const GREETING_BYTES = MAGIC.length + 2 + 1 + NONCE_BYTES;
const HELLO_BYTES = MAGIC.length + 2 + 1 + NONCE_BYTES + PROOF_BYTES;
const FLAG_TOKEN = 0x01;
/** Greeting only: the destination reads a DeviceStateAhead section (a source that does not know the bit ignores it). */
const FLAG_DEVICE_STATE_AHEAD = 0x02;
/** Greeting only: the destination reads live Pages sections (PAGES_SECTION_LIVE). */
const FLAG_LIVE_PAGES = 0x04;
const ACCEPTED = 0x00;
const REFUSED = 0x01;
const SOURCE_LABEL = Buffer.from('node-kvm migration source', 'latin1');
const DESTINATION_LABEL = Buffer.from('node-kvm migration destination', 'latin1');

/** The connections whose destination said in its greeting that it reads a DeviceStateAhead section. */
const readsDeviceStateAhead = new WeakSet<net.Socket>();

/** Whether the destination at the other end of `socket` (a connection offerHandshake() made) reads a DeviceStateAhead section. */
export function destinationReadsDeviceStateAhead(socket: net.Socket): boolean {
  return readsDeviceStateAhead.has(socket);
}

/** The connections whose destination said in its greeting that it reads live Pages sections. */
const readsLivePages = new WeakSet<net.Socket>();

/** Whether the destination at the other end of `socket` (a connection offerHandshake() made) reads live Pages sections. */
export function destinationReadsLivePages(socket: net.Socket): boolean {
  return readsLivePages.has(socket);
}

export type AcceptOutcome = 'accepted' | { reason: string; claimed: boolean };

/**
 * The destination's half. `claim` is asked once the source has proved itself: only one
 * connection may go on to become the migration.
 */
export async function acceptHandshake(
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
    socket.write(Buffer.concat([MAGIC, u16(MIGRATION_PROTOCOL_VERSION), Buffer.of((token === undefined ? 0 : FLAG_TOKEN) | FLAG_DEVICE_STATE_AHEAD | FLAG_LIVE_PAGES), nonceD]));
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

/**
 * The source's half. `whileVerified` runs once the hello is out, while the destination checks it
 * and answers (a round trip this side would otherwise sit idle for); what it throws fails the
 * handshake.
 */
export async function offerHandshake(socket: net.Socket, token: string | undefined, deadline: Deadline, whileVerified?: () => void): Promise<void> {
  const greeting = await readExactly(socket, GREETING_BYTES, deadline, 'the greeting');
  if (!greeting.subarray(0, MAGIC.length).equals(MAGIC)) {
    throw new MigrationError(Code.Protocol, `${deadline.what}: not a node-kvm migration destination`);
  }
  const version = greeting.readUInt16BE(MAGIC.length);
  if (version !== MIGRATION_PROTOCOL_VERSION) {
    throw new MigrationError(Code.Protocol, `${deadline.what}: the destination speaks protocol version ${version}, this side ${MIGRATION_PROTOCOL_VERSION}`);
  }
  const destinationWantsToken = (greeting[MAGIC.length + 2]! & FLAG_TOKEN) !== 0;
  if ((greeting[MAGIC.length + 2]! & FLAG_DEVICE_STATE_AHEAD) !== 0) readsDeviceStateAhead.add(socket);
  if ((greeting[MAGIC.length + 2]! & FLAG_LIVE_PAGES) !== 0) readsLivePages.add(socket);
  if (token !== undefined && !destinationWantsToken) {
    throw new MigrationError(Code.Refused, 'migration refused: the destination was started without a token, so it cannot prove it is the intended one');
  }
  const nonceD = greeting.subarray(MAGIC.length + 3);
  const nonceS = randomBytes(NONCE_BYTES);
  const proofS = token === undefined ? Buffer.alloc(PROOF_BYTES) : proof(token, SOURCE_LABEL, nonceD, nonceS);
  socket.write(Buffer.concat([MAGIC, u16(MIGRATION_PROTOCOL_VERSION), Buffer.of(token === undefined ? 0 : FLAG_TOKEN), nonceS, proofS]));
  whileVerified?.();
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

/**
 * Runs the handshake's crypto once (random bytes, an HMAC): its first use in a process costs
 * about a millisecond, better spent while waiting for a connection than inside one.
 */
export function warmUpHandshake(): void {
  proof('warm-up', SOURCE_LABEL, randomBytes(NONCE_BYTES), randomBytes(NONCE_BYTES));
}

let rehearsed: Promise<void> | null = null;

/**
 * Both halves of a handshake once per process, over a pair of streams in memory: a destination is
 * often a process that has run none of this code, and V8 compiles each function at its first call
 * (a first handshake over loopback took 5 ms here, later ones 1-2). Never rejects.
 */
export function rehearseHandshake(): Promise<void> {
  rehearsed ??= (async () => {
    const [destination, source] = streamPair();
    const token = 'rehearsal';
    try {
      await Promise.all([
        acceptHandshake(destination, token, new Deadline(1000, 'rehearsal'), new Deadline(1000, 'rehearsal'), () => true),
        offerHandshake(source, token, new Deadline(1000, 'rehearsal')),
      ]);
    } catch {
      // Only a rehearsal: a real handshake says what is wrong.
    } finally {
      destination.destroy();
      source.destroy();
    }
  })();
  return rehearsed;
}

/** Two connected in-memory streams standing in for the two ends of a connection. */
function streamPair(): [net.Socket, net.Socket] {
  const ends: Duplex[] = [];
  const end = (peer: () => Duplex) => new Duplex({
    read() {},
    write(chunk: Buffer, _encoding, callback) {
      peer().push(chunk);
      callback();
    },
    final(callback) {
      peer().push(null);
      callback();
    },
  });
  ends.push(end(() => ends[1]!), end(() => ends[0]!));
  return ends as unknown as [net.Socket, net.Socket];
}

function proof(token: string, label: Buffer, nonceD: Buffer, nonceS: Buffer): Buffer {
  return createHmac('sha256', token).update(label).update(nonceD).update(nonceS).digest();
}

/** One time limit for a sequence of steps; each step's error names the step. */
export class Deadline {
  readonly #endsAt: number;
  constructor(readonly totalMs: number, readonly what: string) {
    this.#endsAt = Date.now() + totalMs;
  }
  remainingMs(): number {
    return Math.max(0, this.#endsAt - Date.now());
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


function u16(value: number): Buffer {
  const bytes = Buffer.alloc(2);
  bytes.writeUInt16BE(value);
  return bytes;
}


export function describeError(error: unknown): string {
  const e = error as NodeJS.ErrnoException;
  return e.code && !(e instanceof NodeKvmError) ? e.code : e instanceof Error ? e.message : String(error);
}
