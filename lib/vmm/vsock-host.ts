// The host end of a machine's vsock device for a program that embeds node-kvm: the same hybrid
// protocol a separate host program speaks over the device's unix socket (CONNECT <port> / OK),
// wrapped as Node streams and servers.
import net from 'node:net';
import type { Duplex } from 'node:stream';
import { ErrorCode, NodeKvmError, argValueError } from '../kvm/errors.js';
import { listenOnPrivateUnixSocket } from '../kvm/unix-socket.js';

/** The longest answer line the device sends ("OK 4294967295\n"). */
const MAX_REPLY_BYTES = 32;

/**
 * The host end of a vsock device (machine.vsock), over the device's unix socket: streams to the
 * guest's listeners, servers for its connections to the host.
 */
export class VsockHost {
  /** The device's unix socket (the machine's vsock.uds). */
  readonly uds: string;

  /** Speaks to the vsock device listening on the unix socket `uds`. */
  constructor(uds: string) {
    this.uds = uds;
  }

  /**
   * A stream to the guest's listener on `port`: connects to the device's socket, sends
   * `CONNECT <port>`, and resolves once the guest accepted (with the host port the device gave
   * the connection). Rejects with code ECONNRESET when the guest refused or is not there.
   */
  connect(port: number, options: { signal?: AbortSignal } = {}): Promise<Duplex & { readonly hostPort: number }> {
    checkPort(port);
    return new Promise((resolve, reject) => {
      const socket = net.createConnection({ path: this.uds, allowHalfOpen: true });
      let reply = Buffer.alloc(0);
      const fail = (error: Error) => {
        socket.destroy();
        options.signal?.removeEventListener('abort', onAbort);
        reject(error);
      };
      const onAbort = () => fail(new NodeKvmError(ErrorCode.Aborted, `vsock connect to port ${port} aborted`));
      if (options.signal?.aborted) return onAbort();
      options.signal?.addEventListener('abort', onAbort, { once: true });
      // Paused mode ('readable'), so the stream is handed over neither flowing nor paused.
      const onReadable = () => {
        for (let chunk: Buffer | null; (chunk = socket.read() as Buffer | null) !== null;) {
          reply = Buffer.concat([reply, chunk]);
          const newline = reply.indexOf(0x0a);
          if (newline < 0) {
            if (reply.length > MAX_REPLY_BYTES) return fail(new NodeKvmError(ErrorCode.VsockProtocol, 'the vsock device answered CONNECT with a line too long'));
            continue;
          }
          const line = reply.subarray(0, newline).toString('latin1');
          const match = /^OK (\d+)$/.exec(line);
          if (!match) return fail(new NodeKvmError(ErrorCode.VsockProtocol, `the vsock device answered CONNECT with ${JSON.stringify(line)}`));
          socket.off('readable', onReadable);
          socket.off('end', onClose);
          socket.off('close', onClose);
          socket.off('error', onError);
          options.signal?.removeEventListener('abort', onAbort);
          // Bytes the guest sent right after accepting belong to the stream.
          if (newline + 1 < reply.length) socket.unshift(reply.subarray(newline + 1));
          return resolve(Object.assign(socket, { hostPort: Number(match[1]) }));
        }
      };
      const onClose = () => fail(new NodeKvmError('ECONNRESET', `the guest did not accept a vsock connection on port ${port}`));
      const onError = (error: Error) => fail(new NodeKvmError((error as NodeJS.ErrnoException).code ?? 'ERR_SYSTEM', `cannot reach the vsock device at ${this.uds}: ${error.message}`, { cause: error }));
      socket.on('readable', onReadable);
      // Half-open sockets (the stream may be half-closed later) see a refusal as an end, not a close.
      socket.once('end', onClose);
      socket.once('close', onClose);
      socket.once('error', onError);
      socket.once('connect', () => socket.write(`CONNECT ${port}\n`));
    });
  }

  /**
   * A server for the guest's connections to host port `port` (the unix socket `${uds}_${port}`,
   * mode 0600), listening when it resolves; close() it to stop (its socket file goes with it).
   */
  async listen(port: number, onConnection?: (socket: net.Socket) => void): Promise<net.Server> {
    checkPort(port);
    const server = net.createServer({ allowHalfOpen: true });
    if (onConnection) server.on('connection', onConnection);
    const remove = await listenOnPrivateUnixSocket(server, `${this.uds}_${port}`);
    server.once('close', remove);
    return server;
  }
}

function checkPort(port: number): void {
  if (!Number.isInteger(port) || port < 0 || port > 0xffffffff) throw argValueError(`a vsock port is an integer from 0 to 4294967295, got ${String(port)}`);
}
