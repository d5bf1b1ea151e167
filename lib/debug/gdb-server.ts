// A GDB stub over a Machine: listens on tcp:HOST:PORT (loopback unless told otherwise) or
// unix:PATH and serves one debugger at a time (another is turned away while one is attached).
// Whoever connects has full control of the guest: its registers, its memory, its life.
import net from 'node:net';
import { argTypeError } from '../kvm/errors.js';
import { machineStateError } from '../vmm/errors.js';
import { Machine } from '../vmm/machine.js';
import { formatGdbAddress, listenAt, parseGdbAddress, type GdbAddress } from './address.js';
import { hostDebugSupport, type HostDebugSupport } from './host-debug-support.js';
import { GdbSession } from './session.js';
import { DebugTarget } from './target.js';

/** The stub of each machine that has one: one at a time. */
const stubs = new WeakMap<Machine, GdbServer>();

/** Options of GdbServer.listen(). */
export interface GdbServerOptions {
  /** Where messages go (a debugger refused, a command that failed); none by default. */
  log?: (message: string) => void;
  /** What the host serves; probed once per process (hostDebugSupport()) when not given. */
  support?: HostDebugSupport;
}

/** A GDB remote stub serving one machine to one debugger at a time, over TCP or a unix socket (GdbServer.listen()). */
export class GdbServer {
  readonly machine: Machine;
  /** Where it listens, as tcp:HOST:PORT (with the port bound) or unix:PATH. */
  readonly address: string;
  readonly #server: net.Server;
  readonly #cleanup: () => void;
  readonly #log: (message: string) => void;
  readonly #support: HostDebugSupport;
  #session: GdbSession | null = null;
  #closing: Promise<void> | null = null;

  private constructor(machine: Machine, server: net.Server, address: GdbAddress, cleanup: () => void, log: (message: string) => void, support: HostDebugSupport) {
    this.machine = machine;
    this.#support = support;
    this.#server = server;
    this.address = formatGdbAddress(address);
    this.#cleanup = cleanup;
    this.#log = log;
    server.on('connection', (socket) => this.#accept(socket));
    // The machine's end ends the stub (its debugger got W or X).
    machine.once('exit', () => setImmediate(() => void this.close()));
  }

  /**
   * Starts a stub for `machine` at `address` ('tcp:127.0.0.1:1234', 'unix:/tmp/gdb.sock'; port 0
   * picks a free one, see `address`). A debugger that attaches stops the guest; the machine may
   * be created (not yet started: the debugger's first continue starts it), paused or running.
   */
  static async listen(machine: Machine, address: string | GdbAddress, options: GdbServerOptions = {}): Promise<GdbServer> {
    if (!(machine instanceof Machine)) throw argTypeError('machine must be a Machine');
    const existing = stubs.get(machine);
    if (existing) throw machineStateError(`a gdb stub already listens for this machine on ${existing.address}`);
    if (machine.state === 'stopping' || machine.state === 'stopped') throw machineStateError(`machine is ${machine.state}: there is nothing to debug`);
    const parsed = typeof address === 'string' ? parseGdbAddress(address) : address;
    // The probe (once per process) runs a machine of its own for a moment: look again after it.
    const support = options.support ?? await hostDebugSupport();
    if (stubs.has(machine)) throw machineStateError(`a gdb stub already listens for this machine on ${stubs.get(machine)!.address}`);
    const state: string = machine.state;
    if (state === 'stopping' || state === 'stopped') throw machineStateError(`machine is ${state}: there is nothing to debug`);
    const server = net.createServer();
    const { listening, cleanup } = await listenAt(server, parsed);
    server.unref();
    const stub = new GdbServer(machine, server, listening, cleanup, options.log ?? (() => {}), support);
    stubs.set(machine, stub);
    return stub;
  }

  /** Whether a debugger is attached. */
  get attached(): boolean {
    return this.#session !== null;
  }

  /** Stops listening; an attached debugger is disconnected (the guest runs on, no breakpoint left). */
  close(): Promise<void> {
    this.#closing ??= (async () => {
      this.#session?.close();
      const session = this.#session;
      await new Promise<void>((resolve) => this.#server.close(() => resolve()));
      this.#cleanup();
      if (stubs.get(this.machine) === this) stubs.delete(this.machine);
      await session?.closed;
    })();
    return this.#closing;
  }

  #accept(socket: net.Socket): void {
    if (this.#session || this.#closing || this.machine.state === 'stopped' || this.machine.state === 'stopping') {
      this.#log('gdb: a debugger is already attached; another connection was refused');
      socket.destroy();
      return;
    }
    const session = new GdbSession(socket, new DebugTarget(this.machine, { registersAtStop: true, support: this.#support }), this.#log);
    this.#session = session;
    void session.closed.then(() => {
      if (this.#session === session) this.#session = null;
    });
  }
}
