// One vsock stream between a guest port and a host unix socket: its state, and the credit
// accounting of virtio 1.2 5.10.6.3 both ways, so neither side buffers without bound.
//   guest -> host: we advertise VSOCK_BUFFER_BYTES; what the host socket has not yet taken stays in
//     Node's write buffer and counts against it (fwd_cnt only moves when the kernel took the
//     bytes), so a host peer that never reads stops the guest, not us. A guest that sends past its
//     credit is reset.
//   host -> guest: we read the socket only while nothing read earlier still waits for the guest
//     (its credit or its RX buffers): a flooding host peer is held by its socket's kernel buffer.
import type { Socket } from 'node:net';
import { VSOCK_HOST_CID, VSOCK_TYPE_STREAM, VsockHeader, VsockOp, VsockShutdown } from './virtio-vsock-packet.js';

/** The buffer we advertise for each connection (buf_alloc), as Firecracker does. */
export const VSOCK_BUFFER_BYTES = 256 * 1024;

/**
 * 'line': a host client's `CONNECT <port>\n` not read yet; 'to-guest': REQUEST sent, waiting for
 * the guest's RESPONSE; 'to-host': connecting to the host listener for a guest's REQUEST;
 * 'open': established.
 */
export type ConnectionState = 'line' | 'to-guest' | 'to-host' | 'open';

/** What a connection needs from the connection table that owns it. */
export interface ConnectionOwner {
  readonly guestCid: number;
  readonly parked: boolean;
  /** The connection has something for the guest (a control packet, or data it has credit for). */
  wantsToSend(connection: VsockConnection): void;
  /** The connection corked its socket for the TX pass under way: uncork it at the end. */
  corked(connection: VsockConnection): void;
  /** The connection is over; send the guest an RST for it when `rst`. */
  ended(connection: VsockConnection, rst: boolean): void;
  /** A host client asked for guest port `port` (CONNECT): the table starts the handshake or ends it. */
  connectRequested(connection: VsockConnection, port: number): void;
  problem(message: string): void;
}

const PENDING_REQUEST = 1;
const PENDING_RESPONSE = 2;
const PENDING_CREDIT_UPDATE = 4;
/** The longest `CONNECT <port>\n` line we wait for. */
const MAX_LINE_BYTES = 32;
/** How long an ended connection's host socket may take to accept what the guest sent before it. */
const LINGER_MS = 5000;

export class VsockConnection {
  readonly socket: Socket;
  readonly #owner: ConnectionOwner;
  state: ConnectionState;
  hostPort: number;
  guestPort: number;
  #pending = 0;
  #ended = false;
  #line = '';
  // guest -> host
  #received = 0;
  #advertisedFwd = 0;
  #guestSendClosed = false;
  #guestReceiveClosed = false;
  // host -> guest
  readonly #output: Buffer[] = [];
  #outputBytes = 0;
  #sent = 0;
  #peerBufAlloc = 0;
  #peerFwdCnt = 0;
  #hostEnded = false;
  #shutdownSent = false;
  #connectTimer: ReturnType<typeof setTimeout> | undefined;

  constructor(owner: ConnectionOwner, socket: Socket, state: ConnectionState, hostPort: number, guestPort: number) {
    this.#owner = owner;
    this.socket = socket;
    this.state = state;
    this.hostPort = hostPort;
    this.guestPort = guestPort;
    socket.on('data', (chunk: Buffer) => this.#fromHost(chunk));
    socket.on('end', () => this.#hostEnd());
    socket.on('error', () => {}); // 'close' follows
    socket.on('close', () => this.#hostClosed());
    if (state === 'to-host') socket.on('connect', () => this.#hostConnected());
  }

  get key(): string {
    return connectionKey(this.hostPort, this.guestPort);
  }

  /** Starts the handshake towards the guest (a host client's CONNECT), bounded by `timeoutMs`. */
  requestGuest(timeoutMs: number): void {
    this.state = 'to-guest';
    this.#want(PENDING_REQUEST);
    this.#connectTimer = setTimeout(() => this.end(true), timeoutMs);
    this.#connectTimer.unref?.();
  }

  /** Whether anything waits for the guest that can go now. */
  get hasOutput(): boolean {
    return this.#pending !== 0 || (this.state === 'open' && this.#outputBytes > 0 && this.#credit() > 0) ||
      (this.#hostEnded && !this.#shutdownSent && this.#outputBytes === 0 && this.state === 'open');
  }

  /**
   * The next packet for the guest into `header` (ports and CIDs included); returns its payload
   * (at most `room` bytes) or null. Call only when hasOutput.
   */
  takeOutput(header: VsockHeader, room: number): Uint8Array | null {
    header.srcCid = VSOCK_HOST_CID;
    header.dstCid = this.#owner.guestCid;
    header.srcPort = this.hostPort;
    header.dstPort = this.guestPort;
    header.type = VSOCK_TYPE_STREAM;
    header.len = 0;
    header.flags = 0;
    header.bufAlloc = VSOCK_BUFFER_BYTES;
    header.fwdCnt = this.#forwarded();
    this.#advertisedFwd = header.fwdCnt;
    let payload: Uint8Array | null = null;
    if (this.#pending & PENDING_REQUEST) {
      this.#pending &= ~PENDING_REQUEST;
      header.op = VsockOp.Request;
    } else if (this.#pending & PENDING_RESPONSE) {
      this.#pending &= ~PENDING_RESPONSE;
      header.op = VsockOp.Response;
    } else if (this.state === 'open' && this.#outputBytes > 0 && this.#credit() > 0 && room > 0) {
      payload = this.#takeBytes(Math.min(room, this.#credit(), this.#outputBytes));
      header.op = VsockOp.Rw;
      header.len = payload.length;
      this.#sent = (this.#sent + payload.length) >>> 0;
    } else if (this.state === 'open' && this.#hostEnded && !this.#shutdownSent && this.#outputBytes === 0) {
      this.#shutdownSent = true;
      header.op = VsockOp.Shutdown;
      header.flags = VsockShutdown.Send;
    } else {
      // A credit update (asked for, or the only thing left when the buffer has no room for data).
      this.#pending &= ~PENDING_CREDIT_UPDATE;
      header.op = VsockOp.CreditUpdate;
    }
    if (header.op !== VsockOp.CreditUpdate) this.#pending &= ~PENDING_CREDIT_UPDATE; // this header carries the credit
    if (this.#outputBytes === 0) this.#updateReading();
    if (this.#shutdownSent && this.#guestSendClosed) this.end(true);
    return payload;
  }

  /** The guest's buffer and what it has consumed, which every packet of its carries. */
  noteCredit(header: VsockHeader): void {
    this.#peerBufAlloc = header.bufAlloc;
    this.#peerFwdCnt = header.fwdCnt;
  }

  /** A packet from the guest for this connection. */
  fromGuest(header: VsockHeader, payload: Uint8Array | null): void {
    this.noteCredit(header);
    switch (header.op) {
      case VsockOp.Response:
        if (this.state !== 'to-guest') return this.end(true);
        clearTimeout(this.#connectTimer);
        this.state = 'open';
        this.socket.write(`OK ${this.hostPort}\n`);
        this.#updateReading();
        break;
      case VsockOp.Rw:
        if (this.state !== 'open' || this.#guestSendClosed) return this.end(true);
        if (payload === null || payload.length === 0) break;
        if (((this.#received + payload.length - this.#forwarded()) >>> 0) > VSOCK_BUFFER_BYTES) {
          this.#owner.problem(`guest port ${this.guestPort} sent past the credit it was given: connection reset`);
          return this.end(true);
        }
        this.#received = (this.#received + payload.length) >>> 0;
        // Corked until the end of the TX pass: the packets of one burst leave in one writev.
        if (!this.socket.writableCorked) {
          this.socket.cork();
          this.#owner.corked(this);
        }
        this.socket.write(payload, () => this.#consider());
        break;
      case VsockOp.Shutdown:
        if (header.flags & VsockShutdown.Send && !this.#guestSendClosed) {
          this.#guestSendClosed = true;
          this.socket.end();
        }
        if (header.flags & VsockShutdown.Rcv) this.#guestReceiveClosed = true;
        if (this.#guestReceiveClosed) this.#dropOutput();
        // Closed both ways (Linux's close() sends both flags): the peer waits for our RST.
        if (this.#guestSendClosed && (this.#guestReceiveClosed || this.#shutdownSent)) return this.end(true);
        break;
      case VsockOp.Rst:
        return this.end(false);
      case VsockOp.CreditRequest:
        this.#want(PENDING_CREDIT_UPDATE);
        break;
      case VsockOp.CreditUpdate:
        break;
      default:
        // REQUEST on an existing connection, or an unknown op.
        return this.end(true);
    }
    if (this.hasOutput) this.#owner.wantsToSend(this);
  }

  /** Stops reading the host socket (the device parks) or reads on as flow control allows. */
  updateReading(): void {
    this.#updateReading();
  }

  /** Ends the connection: closes the host socket and, when `rst`, tells the guest. */
  end(rst: boolean): void {
    if (this.#ended) return;
    this.#ended = true;
    clearTimeout(this.#connectTimer);
    this.#pending = 0;
    this.#dropOutput();
    // What the guest sent is still delivered to the host; a socket never read is closed anyway.
    if (this.socket.writableLength === 0) {
      this.socket.destroy();
    } else {
      this.socket.end(() => this.socket.destroy());
      this.socket.setTimeout(LINGER_MS, () => this.socket.destroy());
    }
    this.#owner.ended(this, rst && this.state !== 'line');
  }

  /** Drops the connection without a word to the guest (a reset transport, a machine's end). */
  destroy(): void {
    if (this.#ended) return;
    this.#ended = true;
    clearTimeout(this.#connectTimer);
    this.socket.destroy();
  }

  get isEnded(): boolean {
    return this.#ended;
  }

  #want(bits: number): void {
    this.#pending |= bits;
    this.#owner.wantsToSend(this);
  }

  /** Bytes of the guest's the host socket has taken (fwd_cnt). */
  #forwarded(): number {
    return (this.#received - this.socket.writableLength) >>> 0;
  }

  /** How much the guest can take now (virtio 1.2 5.10.6.3.1). */
  #credit(): number {
    const credit = this.#peerBufAlloc - ((this.#sent - this.#peerFwdCnt) >>> 0);
    return credit > 0 ? credit : 0;
  }

  /** After the host socket took bytes: tell the guest once it is down to half its credit. */
  #consider(): void {
    if (this.#ended) return;
    const fwd = this.#forwarded();
    const inFlight = (this.#received - this.#advertisedFwd) >>> 0;
    if (fwd !== this.#advertisedFwd && inFlight >= VSOCK_BUFFER_BYTES / 2) this.#want(PENDING_CREDIT_UPDATE);
  }

  #fromHost(chunk: Buffer): void {
    if (this.#ended) return;
    if (this.state === 'line') return this.#lineBytes(chunk);
    if (this.#guestReceiveClosed) return;
    this.#output.push(chunk);
    this.#outputBytes += chunk.length;
    this.#updateReading();
    if (this.hasOutput) this.#owner.wantsToSend(this);
  }

  #lineBytes(chunk: Buffer): void {
    const newline = chunk.indexOf(0x0a);
    this.#line += chunk.subarray(0, newline < 0 ? chunk.length : newline).toString('latin1');
    if (newline < 0) {
      if (this.#line.length > MAX_LINE_BYTES) this.end(false);
      return;
    }
    const match = /^CONNECT (\d{1,10})$/.exec(this.#line);
    const port = match ? Number(match[1]) : -1;
    if (port < 0 || port > 0xffffffff) return this.end(false);
    // Bytes after the line are the stream's first: they wait for the handshake.
    if (newline + 1 < chunk.length) {
      this.#output.push(chunk.subarray(newline + 1));
      this.#outputBytes += chunk.length - newline - 1;
    }
    this.guestPort = port;
    this.#owner.connectRequested(this, port);
    this.#updateReading();
  }

  #hostConnected(): void {
    if (this.#ended) return;
    this.state = 'open';
    this.#want(PENDING_RESPONSE);
    this.#updateReading();
  }

  #hostEnd(): void {
    if (this.#ended) return;
    if (this.state !== 'open') return this.end(true);
    this.#hostEnded = true;
    if (this.hasOutput) this.#owner.wantsToSend(this);
  }

  #hostClosed(): void {
    if (this.#ended) return;
    this.end(true);
  }

  #takeBytes(count: number): Uint8Array {
    const first = this.#output[0]!;
    let bytes: Uint8Array;
    if (first.length >= count) {
      bytes = first.subarray(0, count);
      if (first.length === count) this.#output.shift();
      else this.#output[0] = first.subarray(count);
    } else {
      const joined = Buffer.allocUnsafe(count);
      let filled = 0;
      while (filled < count) {
        const head = this.#output[0]!;
        const n = Math.min(head.length, count - filled);
        joined.set(head.subarray(0, n), filled);
        filled += n;
        if (n === head.length) this.#output.shift();
        else this.#output[0] = head.subarray(n);
      }
      bytes = joined;
    }
    this.#outputBytes -= count;
    return bytes;
  }

  #dropOutput(): void {
    this.#output.length = 0;
    this.#outputBytes = 0;
  }

  #updateReading(): void {
    if (this.#ended) return;
    const read = !this.#owner.parked && !this.#hostEnded &&
      (this.state === 'line' || (this.state === 'open' && this.#outputBytes === 0));
    if (read) this.socket.resume();
    else this.socket.pause();
  }
}

export function connectionKey(hostPort: number, guestPort: number): string {
  return `${hostPort}:${guestPort}`;
}
