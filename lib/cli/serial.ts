// `node-kvm run --serial`: where the guest's COM1 goes. Every form is built on what the library
// offers (MachineConfig.serial and machine.console): no device code here.
//   stdio      output on stdout (fd 1, written by the vCPU threads), input from stdin whatever it
//              is; a terminal is put in raw mode, with Ctrl-A x to quit
//   unix:PATH  the console served on a unix socket, one client at a time (serveConsole)
//   file:PATH  output written to a file, no input
//   none       output discarded, no input
import { EventEmitter, once } from 'node:events';
import { closeSync, constants as fsConstants, openSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import type { Duplex } from 'node:stream';
import { listenOnPrivateUnixSocket } from '../kvm/unix-socket.js';
import type { Machine, MachineRuntimeConfig } from '../vmm/machine.js';
import { argValueError, outOfRangeError, systemError } from '../kvm/errors.js';

export type SerialOption = { kind: 'stdio' } | { kind: 'none' } | { kind: 'unix'; path: string } | { kind: 'file'; path: string };

export const SERIAL_FORMS = 'stdio, none, unix:PATH or file:PATH';

/** Parses a --serial value (absent: stdio). */
export function parseSerialOption(value: string | undefined): SerialOption {
  if (value === undefined || value === 'stdio') return { kind: 'stdio' };
  if (value === 'none') return { kind: 'none' };
  const match = /^(unix|file):(.+)$/.exec(value);
  if (!match) throw argValueError(`--serial must be ${SERIAL_FORMS}, got '${value}'`);
  return { kind: match[1] as 'unix' | 'file', path: match[2]! };
}

/** One --serial form, set up before the machine is built and connected to it once it is. */
export interface SerialBackend {
  /** MachineConfig.serial for the machine. */
  readonly config: NonNullable<MachineRuntimeConfig['serial']>;
  /** Connects the built machine (before it starts). */
  attach(machine: Machine): void;
  /** Lets go of everything once the machine has ended (or was never built). */
  close(): Promise<void>;
}

/**
 * Sets up `option`: a unix socket listens from now on (so that a path in the way fails before
 * any guest runs), a file is opened.
 */
export async function openSerialBackend(option: SerialOption, log: (message: string) => void): Promise<SerialBackend> {
  switch (option.kind) {
    case 'stdio':
      return stdioBackend();
    case 'none':
      return { config: { output: null }, attach() {}, close: async () => {} };
    case 'file': {
      let fd: number;
      try {
        // As QEMU's -serial file: the file starts empty; one this creates is its owner's only.
        fd = openSync(option.path, fsConstants.O_WRONLY | fsConstants.O_CREAT | fsConstants.O_TRUNC, 0o600);
      } catch (error) {
        throw systemError(`--serial file:${option.path}: ${(error as NodeJS.ErrnoException).code ?? (error as Error).message}`, error);
      }
      // Written by the vCPU threads directly, as stdout is.
      return { config: { output: fd }, attach() {}, close: async () => closeSync(fd) };
    }
    case 'unix': {
      let server: ConsoleServer;
      try {
        server = await serveConsole(path.resolve(option.path));
      } catch (error) {
        throw systemError(`--serial unix:${option.path}: ${(error as Error).message}`, error);
      }
      log(`serial console on unix:${option.path}`);
      // The machine's console (no output of its own): the server reads it from the start.
      return { config: {}, attach: (machine) => server.attach(machine.console), close: () => server.close() };
    }
  }
}

/**
 * COM1 on this process's stdio. Output goes to fd 1 from the vCPU threads (a file, a pipe or a
 * terminal alike). Input: a terminal in raw mode, Ctrl-A x stopping the machine (as in QEMU);
 * anything else (a pipe, a file) as it comes, its end being no more than that: the guest runs on.
 * Input goes through machine.console, which waits while the guest's input buffer is full.
 */
function stdioBackend(): SerialBackend {
  const stdin = process.stdin;
  const interactive = stdin.isTTY === true;
  let machine: Machine | null = null;
  let onData: ((chunk: Buffer) => void) | null = null;
  return {
    config: { output: 1 },
    attach(attached) {
      machine = attached;
      const console = attached.console;
      // Input after the machine ended fails and destroys the console: nothing to report.
      console.on('error', () => {});
      if (!interactive) {
        stdin.pipe(console, { end: false });
        return;
      }
      stdin.setRawMode(true);
      let escape = false;
      onData = (chunk) => {
        const forward: number[] = [];
        for (const byte of chunk) {
          if (escape) {
            escape = false;
            if (byte === 0x78 /* x */) {
              void attached.stop();
              return;
            }
            if (byte !== 0x01) forward.push(0x01);
          } else if (byte === 0x01) {
            escape = true;
            continue;
          }
          forward.push(byte);
        }
        if (forward.length > 0 && console.writable) console.write(Uint8Array.from(forward));
      };
      stdin.on('data', onData);
      stdin.resume();
    },
    async close() {
      if (!machine) return;
      if (interactive) {
        stdin.off('data', onData!);
        stdin.setRawMode(false);
      } else {
        stdin.unpipe(machine.console);
      }
      // Not destroyed: stdin is the process's, and may be read again (main() in tests).
      stdin.pause();
    },
  };
}

/** Output kept for the next client while none is attached (the oldest dropped beyond). */
export const CONSOLE_REPLAY_BYTES = 64 * 1024;
/** Output queued for a client that does not read, beyond which new output is dropped for it. */
export const CONSOLE_CLIENT_QUEUE_BYTES = 64 * 1024;
/** How long the last client gets to take the final output once the machine has ended. */
const CLOSE_GRACE_MS = 1000;
export const CONSOLE_BUSY_MESSAGE = 'node-kvm: the console is in use by another client\n';

export interface ConsoleServerOptions {
  /** Default CONSOLE_REPLAY_BYTES. */
  replayBytes?: number;
  /** Default CONSOLE_CLIENT_QUEUE_BYTES. */
  clientQueueBytes?: number;
}

export interface ConsoleServerStats {
  clientAttached: boolean;
  /** Output kept for the next client. */
  replayBytes: number;
  /** Output dropped: the oldest while no client was attached, the newest for a client that did not read. */
  droppedBytes: number;
  /** Output written to the client and not yet taken by the kernel. */
  clientQueuedBytes: number;
  /** Whether the client's input is not being read, while the guest's input buffer is full. */
  inputPaused: boolean;
  /** Clients turned away because another was attached. */
  refusedClients: number;
}

export declare interface ConsoleServer {
  /** A client is attached (after the output kept for it was written to it). */
  on(event: 'attached', listener: () => void): this;
  /** The attached client has gone. */
  on(event: 'detached', listener: () => void): this;
  /** A client was turned away (another was attached). */
  on(event: 'refused', listener: () => void): this;
  once(event: 'attached' | 'detached' | 'refused', listener: () => void): this;
}

/**
 * A console (a Duplex: read for the guest's output, write to type) served on a unix socket of
 * mode 0600. One client at a time: another is sent CONSOLE_BUSY_MESSAGE and closed. Nothing a
 * client does holds the guest up or grows memory without bound:
 * - output produced while no client is attached is kept, up to `replayBytes` (the oldest dropped),
 *   and written to the next client first;
 * - a client's input is read only while the console takes it (its writable side waits while the
 *   guest's input buffer is full), so a client that floods it fills its own socket instead;
 * - output for a client that does not read is queued up to `clientQueueBytes`, and dropped beyond;
 * - a client that goes away mid-stream leaves the guest running; its input already read still
 *   reaches the guest.
 */
export class ConsoleServer extends EventEmitter {
  readonly path: string;
  readonly #server: net.Server;
  readonly #removeSocketFile: () => void;
  readonly #replayLimit: number;
  readonly #clientQueueLimit: number;
  #console: Duplex | null = null;
  #client: net.Socket | null = null;
  readonly #replay: Buffer[] = [];
  #replayBytes = 0;
  #droppedBytes = 0;
  #refusedClients = 0;
  #inputPaused = false;
  #closing: Promise<void> | null = null;

  /** Use serveConsole(). */
  constructor(socketPath: string, server: net.Server, removeSocketFile: () => void, limits: Required<ConsoleServerOptions>) {
    super();
    this.path = socketPath;
    this.#server = server;
    this.#removeSocketFile = removeSocketFile;
    this.#replayLimit = limits.replayBytes;
    this.#clientQueueLimit = limits.clientQueueBytes;
    server.on('connection', (socket) => this.#accept(socket));
  }

  stats(): ConsoleServerStats {
    return {
      clientAttached: this.#client !== null,
      replayBytes: this.#replayBytes,
      droppedBytes: this.#droppedBytes,
      clientQueuedBytes: this.#client?.writableLength ?? 0,
      inputPaused: this.#inputPaused,
      refusedClients: this.#refusedClients,
    };
  }

  /** Serves `console` from now on (a client that came before waits for it unread). */
  attach(console: Duplex): void {
    this.#console = console;
    console.on('error', () => {}); // typing after the machine ended: nothing to report
    console.on('data', (chunk: Buffer) => this.#output(chunk));
    console.on('drain', () => {
      this.#inputPaused = false;
      this.#client?.resume();
    });
    this.#client?.resume();
  }

  /** Stops listening and removes the socket; the client gets the console's last output first. */
  close(): Promise<void> {
    this.#closing ??= (async () => {
      this.#server.close();
      this.#removeSocketFile();
      const console = this.#console;
      if (console && !console.readableEnded && !console.destroyed) {
        await Promise.race([once(console, 'end').catch(() => {}), new Promise((resolve) => setTimeout(resolve, CLOSE_GRACE_MS).unref())]);
      }
      const client = this.#client;
      if (client) {
        client.end();
        // A client that does not read does not keep the process.
        setTimeout(() => client.destroy(), CLOSE_GRACE_MS).unref();
      }
    })();
    return this.#closing;
  }

  #accept(socket: net.Socket): void {
    socket.on('error', () => {});
    if (this.#client || this.#closing) {
      this.#refusedClients++;
      socket.end(CONSOLE_BUSY_MESSAGE);
      setTimeout(() => socket.destroy(), CLOSE_GRACE_MS).unref();
      this.emit('refused');
      return;
    }
    this.#client = socket;
    socket.on('close', () => {
      if (this.#client !== socket) return;
      this.#client = null;
      this.#inputPaused = false;
      this.emit('detached');
    });
    socket.on('data', (chunk: Buffer) => this.#input(socket, chunk));
    // Read only once there is a console to type into, and while it takes more.
    if (!this.#console || this.#console.writableNeedDrain) {
      socket.pause();
      this.#inputPaused = this.#console !== null;
    }
    const replay = Buffer.concat(this.#replay);
    this.#replay.length = 0;
    this.#replayBytes = 0;
    if (replay.length > 0) socket.write(replay);
    this.emit('attached');
  }

  #input(socket: net.Socket, chunk: Buffer): void {
    const console = this.#console;
    if (!console || !console.writable) return;
    if (!console.write(chunk)) {
      this.#inputPaused = true;
      socket.pause();
    }
  }

  #output(chunk: Buffer): void {
    const client = this.#client;
    if (client && client.writable) {
      const room = this.#clientQueueLimit - client.writableLength;
      if (room < chunk.length) this.#droppedBytes += chunk.length - Math.max(room, 0);
      if (room > 0) client.write(room < chunk.length ? chunk.subarray(0, room) : chunk);
      return;
    }
    // Kept for the next client: the latest bytes only.
    this.#replay.push(chunk);
    this.#replayBytes += chunk.length;
    let excess = this.#replayBytes - this.#replayLimit;
    while (excess > 0) {
      const oldest = this.#replay[0]!;
      const dropped = Math.min(oldest.length, excess);
      if (dropped === oldest.length) this.#replay.shift();
      else this.#replay[0] = oldest.subarray(dropped);
      this.#replayBytes -= dropped;
      this.#droppedBytes += dropped;
      excess -= dropped;
    }
  }
}

/**
 * Listens on a new unix socket at `socketPath` (mode 0600; an existing socket nobody listens on
 * is replaced, anything else there is refused) for a console that attach() hands over.
 */
export async function serveConsole(socketPath: string, options: ConsoleServerOptions = {}): Promise<ConsoleServer> {
  const limits = { replayBytes: CONSOLE_REPLAY_BYTES, clientQueueBytes: CONSOLE_CLIENT_QUEUE_BYTES };
  for (const key of Object.keys(limits) as (keyof ConsoleServerOptions)[]) {
    const value = options[key];
    if (value === undefined) continue;
    if (!Number.isSafeInteger(value) || value < 1) throw outOfRangeError(`serveConsole: ${key} must be a positive integer`);
    limits[key] = value;
  }
  const server = net.createServer();
  const removeSocketFile = await listenOnPrivateUnixSocket(server, socketPath);
  return new ConsoleServer(socketPath, server, removeSocketFile, limits);
}
