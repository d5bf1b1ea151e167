// The host side of a hybrid vsock device, on unix sockets as Firecracker's: a host program
// connects to the socket `uds` and writes `CONNECT <port>\n`; once the guest's listener on that
// port answers, it reads `OK <host-port>\n` and the stream follows. A guest that connects to host
// port P reaches whoever listens on `${uds}_${P}`. Routes the guest's packets to connections by
// (host port, guest port) and collects what the connections have for the guest.
import { chmodSync, linkSync, lstatSync, mkdtempSync, rmdirSync, rmSync, unlinkSync } from 'node:fs';
import { createConnection, createServer, type Server, type Socket } from 'node:net';
import { dirname, join, resolve } from 'node:path';
import { NodeKvmError } from '../kvm/errors.js';
import { connectionKey, VsockConnection, type ConnectionOwner } from './virtio-vsock-connection.js';
import { VSOCK_HOST_CID, VSOCK_TYPE_STREAM, VsockHeader, VsockOp } from './virtio-vsock-packet.js';

/** Connections at once; a guest's REQUEST beyond them is refused (RST), a host client closed. */
export const VSOCK_MAX_CONNECTIONS = 256;
/** Host ports the device assigns to host-initiated connections count up from here. */
export const VSOCK_FIRST_HOST_PORT = 1 << 30;
/** How long a host client may take to send its CONNECT line, and then wait for the guest's RESPONSE. */
export const VSOCK_CONNECT_TIMEOUT_MS = 2000;
/** RSTs waiting for an RX buffer, for packets that matched no connection; more are dropped. */
const MAX_PENDING_RSTS = 256;

export interface VsockMuxerOptions {
  guestCid: number;
  uds: string;
  /** Whether the guest's driver is up (a CONNECT before that is refused). */
  guestReady(): boolean;
  /** Something waits for the guest: fill RX buffers. */
  wake(): void;
  problem(message: string): void;
}

export class VsockMuxer implements ConnectionOwner {
  readonly guestCid: number;
  readonly #uds: string;
  readonly #options: VsockMuxerOptions;
  readonly #connections = new Map<string, VsockConnection>();
  /** Host clients that have not finished their CONNECT line. */
  readonly #lines = new Set<VsockConnection>();
  readonly #sending = new Set<VsockConnection>();
  readonly #corked = new Set<VsockConnection>();
  readonly #rsts: { hostPort: number; guestPort: number }[] = [];
  #server: Server | null = null;
  #removeSocketFile: (() => void) | null = null;
  #nextHostPort = VSOCK_FIRST_HOST_PORT;
  #parked = false;

  constructor(options: VsockMuxerOptions) {
    this.guestCid = options.guestCid;
    this.#uds = options.uds;
    this.#options = options;
  }

  get parked(): boolean {
    return this.#parked;
  }

  get connectionCount(): number {
    return this.#connections.size;
  }

  /**
   * Listens on the socket path, mode 0600, before returning (so host programs can connect while
   * the device thread is still parked): bound in a private directory beside it, made 0600 there,
   * then hard-linked to its name, which never replaces a file. The machine removed a stale socket
   * left at the path beforehand; whatever is there now makes this throw.
   */
  listen(): void {
    const target = resolve(this.#uds);
    const privateDir = mkdtempSync(join(dirname(target), '.nkvm-vsock-'));
    const privatePath = join(privateDir, 's');
    const server = createServer({ allowHalfOpen: true, pauseOnConnect: true }, (socket) => this.#accepted(socket));
    server.on('error', (error) => this.problem(`${this.#uds}: ${error.message}`));
    try {
      // A unix socket binds and listens synchronously; a failure leaves it not listening.
      server.listen(privatePath);
      if (!server.listening) throw new NodeKvmError('ERR_SYSTEM', `cannot listen on ${this.#uds}`);
      chmodSync(privatePath, 0o600);
      linkSync(privatePath, target);
    } catch (error) {
      server.close();
      const code = (error as NodeJS.ErrnoException).code;
      throw code === 'EEXIST' ? new NodeKvmError('EADDRINUSE', `${this.#uds} exists: another socket or file is in the way`, { cause: error }) : error;
    } finally {
      rmSync(privatePath, { force: true });
      rmdirSync(privateDir);
    }
    const { ino, dev } = lstatSync(target);
    this.#server = server;
    this.#removeSocketFile = () => {
      // Only our own socket: the name may have been taken over since.
      try {
        const now = lstatSync(target);
        if (now.ino === ino && now.dev === dev) unlinkSync(target);
      } catch {
        // Already gone.
      }
    };
  }

  problem(message: string): void {
    this.#options.problem(message);
  }

  // ConnectionOwner

  wantsToSend(connection: VsockConnection): void {
    this.#sending.add(connection);
    this.#options.wake();
  }

  corked(connection: VsockConnection): void {
    this.#corked.add(connection);
  }

  /** Sends what the guest's last TX packets wrote to host sockets. */
  flushWrites(): void {
    for (const connection of this.#corked) {
      if (!connection.socket.destroyed) connection.socket.uncork();
    }
    this.#corked.clear();
  }

  ended(connection: VsockConnection, rst: boolean): void {
    this.#lines.delete(connection);
    this.#sending.delete(connection);
    if (this.#connections.get(connection.key) === connection) this.#connections.delete(connection.key);
    if (rst) this.#queueRst(connection.hostPort, connection.guestPort);
  }

  connectRequested(connection: VsockConnection, port: number): void {
    this.#lines.delete(connection);
    if (!this.#options.guestReady() || this.#connections.size >= VSOCK_MAX_CONNECTIONS) return connection.end(false);
    while (this.#connections.has(connectionKey(this.#nextHostPort, port))) this.#nextHostPort = this.#advance(this.#nextHostPort);
    connection.hostPort = this.#nextHostPort;
    this.#nextHostPort = this.#advance(this.#nextHostPort);
    connection.guestPort = port;
    this.#connections.set(connection.key, connection);
    connection.requestGuest(VSOCK_CONNECT_TIMEOUT_MS);
  }

  // The guest side

  /** A packet the guest sent (its header checked for length by the device). */
  fromGuest(header: VsockHeader, payload: Uint8Array | null): void {
    if (header.srcCid !== this.guestCid) {
      this.problem(`a packet from CID ${header.srcCid}, not the guest's ${this.guestCid}: dropped`);
      return;
    }
    const hostPort = header.dstPort;
    const guestPort = header.srcPort;
    if (header.dstCid !== VSOCK_HOST_CID || header.type !== VSOCK_TYPE_STREAM) {
      if (header.op !== VsockOp.Rst) this.#queueRst(hostPort, guestPort, header.dstCid, header.type);
      return;
    }
    const connection = this.#connections.get(connectionKey(hostPort, guestPort));
    if (connection !== undefined) {
      connection.fromGuest(header, payload);
      return;
    }
    if (header.op === VsockOp.Request) {
      this.#guestConnects(hostPort, guestPort, header);
      return;
    }
    if (header.op !== VsockOp.Rst) this.#queueRst(hostPort, guestPort);
  }

  get hasOutput(): boolean {
    if (this.#rsts.length > 0) return true;
    for (const connection of this.#sending) {
      if (connection.hasOutput) return true;
      this.#sending.delete(connection);
    }
    return false;
  }

  /**
   * The next packet for the guest into `header`; its payload (at most `room` bytes), null for
   * none, or undefined when nothing waits after all (check hasOutput first).
   */
  takeOutput(header: VsockHeader, room: number): Uint8Array | null | undefined {
    const rst = this.#rsts.shift();
    if (rst !== undefined) {
      header.srcCid = VSOCK_HOST_CID;
      header.dstCid = this.guestCid;
      header.srcPort = rst.hostPort;
      header.dstPort = rst.guestPort;
      header.len = 0;
      header.type = VSOCK_TYPE_STREAM;
      header.op = VsockOp.Rst;
      header.flags = 0;
      header.bufAlloc = 0;
      header.fwdCnt = 0;
      return null;
    }
    for (const connection of this.#sending) {
      this.#sending.delete(connection);
      if (!connection.hasOutput) continue;
      const payload = connection.takeOutput(header, room);
      // Round robin: a connection with more goes to the back.
      if (!connection.isEnded && connection.hasOutput) this.#sending.add(connection);
      return payload;
    }
    return undefined;
  }

  /** Stops reading host sockets (the device parks) or starts again. */
  setParked(parked: boolean): void {
    this.#parked = parked;
    for (const connection of [...this.#connections.values(), ...this.#lines]) connection.updateReading();
  }

  /** Drops every connection without a word to the guest (its transport was reset or is gone). Listeners stay. */
  reset(): void {
    for (const connection of [...this.#connections.values(), ...this.#lines]) connection.destroy();
    this.#connections.clear();
    this.#lines.clear();
    this.#sending.clear();
    this.#rsts.length = 0;
  }

  close(): void {
    this.reset();
    const server = this.#server;
    this.#server = null;
    if (server === null) return;
    server.close();
    this.#removeSocketFile?.();
    this.#removeSocketFile = null;
  }

  #accepted(socket: Socket): void {
    if (this.#connections.size + this.#lines.size >= VSOCK_MAX_CONNECTIONS) {
      socket.destroy();
      return;
    }
    const connection = new VsockConnection(this, socket, 'line', 0, 0);
    this.#lines.add(connection);
    connection.updateReading();
    // A client that never finishes its CONNECT line does not keep a connection's place.
    setTimeout(() => {
      if (connection.state === 'line') connection.end(false);
    }, VSOCK_CONNECT_TIMEOUT_MS).unref();
  }

  #guestConnects(hostPort: number, guestPort: number, header: VsockHeader): void {
    if (this.#connections.size >= VSOCK_MAX_CONNECTIONS) {
      this.problem(`more than ${VSOCK_MAX_CONNECTIONS} connections: the guest's connection to port ${hostPort} refused`);
      this.#queueRst(hostPort, guestPort);
      return;
    }
    const socket = createConnection({ path: `${this.#uds}_${hostPort}`, allowHalfOpen: true });
    const connection = new VsockConnection(this, socket, 'to-host', hostPort, guestPort);
    this.#connections.set(connection.key, connection);
    connection.noteCredit(header);
  }

  #queueRst(hostPort: number, guestPort: number, dstCid = VSOCK_HOST_CID, type = VSOCK_TYPE_STREAM): void {
    if (dstCid !== VSOCK_HOST_CID) this.problem(`a packet for CID ${dstCid}, which is not the host's (${VSOCK_HOST_CID}): reset`);
    if (type !== VSOCK_TYPE_STREAM) this.problem(`a packet of socket type ${type} (only STREAM, 1, is served): reset`);
    if (this.#rsts.length >= MAX_PENDING_RSTS) return;
    this.#rsts.push({ hostPort, guestPort });
    this.#options.wake();
  }

  #advance(port: number): number {
    return port >= 0xfffffffe ? VSOCK_FIRST_HOST_PORT : port + 1;
  }
}
