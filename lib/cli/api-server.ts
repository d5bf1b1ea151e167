// The control API of a running machine: newline-delimited JSON over a unix socket (mode 0600).
//   request   {"id":1,"method":"status"|"pause"|"resume"|"stop"|"reset"|"snapshot"|"migrate"|"gdb"|"regs"|"x"|"stats"|"stats-reset"|"trace-start"|"trace-stop"|"config","params":{...}}
//   response  {"id":1,"result":...}  or  {"id":1,"error":{"message":"...","code":"EBUSY"}} (code: the error's, if it has one)
//   progress  {"id":1,"progress":{...MigrationStats}}  (zero or more, before a migrate's response)
// Several clients may be connected, and each may have several calls under way. Per client, what
// the server holds is bounded (ApiServerOptions): it stops reading from a client whose replies
// are not taken, and drops one that passes a cap.
import net from 'node:net';
import { migrateMachine } from '../migration/send.js';
import { snapshotMachine } from '../migration/snapshot.js';
import { listenOnPrivateUnixSocket } from '../kvm/unix-socket.js';
import { parseMigrationAddress } from '../migration/transport.js';
import { checkAutoConverge } from '../migration/auto-converge.js';
import { type ExitStats, type Machine } from '../vmm/machine.js';
import type { MigrateOptions, MigrationProgress, MigrationStats, NonConvergence, SnapshotInfo, SnapshotOptions } from '../migration/types.js';
import { ErrorCode, NodeKvmError, argTypeError, argValueError, outOfRangeError } from '../kvm/errors.js';

export type ApiMachineState = 'created' | 'running' | 'paused' | 'stopping' | 'stopped';

/** What the API needs of a machine (Machine implements it). */
export interface ApiMachine {
  readonly state: ApiMachineState;
  readonly vcpuCount: number;
  readonly memoryBytes: number;
  pause(): Promise<void>;
  resume(): void;
  /** Begins ending the machine (as QEMU's monitor command quit). */
  stop(): void;
  /** Reboots the guest (Machine.reset(), as QEMU's system_reset). */
  reset(): Promise<void>;
  snapshot(path: string, options?: SnapshotOptions): Promise<SnapshotInfo>;
  migrate(address: string, options?: MigrateOptions): Promise<MigrationStats>;
  /** Starts a GDB stub on the machine (lib/debug); resolves with where it listens. */
  gdb?(address: string): Promise<string>;
  /** A vCPU's registers (lib/debug/inspect.ts). */
  regs?(vcpu: number): Promise<ApiRegisters>;
  /** Guest memory (lib/debug/inspect.ts). */
  x?(address: bigint, length: number, options: { vcpu: number; physical: boolean }): Promise<Buffer>;
  /** Exit statistics; `start`: start counting if the machine does not count yet. */
  stats?(start: boolean): ExitStats;
  /** Exit statistics back to zero (machine.resetExitStats()), then as they are. */
  statsReset?(): Promise<ExitStats>;
  /** Starts an exit trace to this file (machine.startExitTrace()). */
  traceStart?(path: string): Promise<void>;
  /** Stops the exit trace; its path, or null when there was none (machine.stopExitTrace()). */
  traceStop?(): Promise<string | null>;
  /** The machine's configuration, as `node-kvm run --config` reads it. */
  config?(): Record<string, unknown>;
}

/** A real machine as the API sees it: its lifecycle, and snapshots and migrations of it. */
export function apiMachine(machine: Machine, runConfig: Record<string, unknown> = {}): ApiMachine {
  return {
    get state() {
      return machine.state;
    },
    vcpuCount: machine.vcpuCount,
    memoryBytes: machine.memoryBytes,
    pause: () => machine.pause(),
    resume: () => machine.resume(),
    stop: () => void machine.stop(),
    reset: () => machine.reset(),
    snapshot: (path, options) => snapshotMachine(machine, path, options),
    migrate: (address, options) => migrateMachine(machine, address, options),
    gdb: async (address) => {
      const { GdbServer } = await import('../debug/gdb-server.js');
      return (await GdbServer.listen(machine, address)).address;
    },
    regs: async (vcpu) => {
      const { readRegisters, formatRegisters } = await import('../debug/inspect.js');
      const state = await readRegisters(machine, vcpu);
      return { vcpu, text: formatRegisters(state), regs: hexFields(state.regs), sregs: hexFields(state.sregs) as ApiRegisters['sregs'] };
    },
    x: async (address, length, options) => {
      const { readGuestMemory } = await import('../debug/inspect.js');
      return readGuestMemory(machine, address, length, options);
    },
    stats: (start) => {
      if (start) void machine.startExitStats();
      return machine.exitStats();
    },
    statsReset: async () => {
      await machine.resetExitStats();
      return machine.exitStats();
    },
    traceStart: (path) => machine.startExitTrace(path),
    traceStop: () => machine.stopExitTrace(),
    config: () => machineConfig(machine, runConfig),
  };
}

/**
 * `runConfig` (what the machine was run with, as a configuration object) with what the machine
 * has in fact: its RAM, vCPUs and irqchip where they are options of the way it was made (a
 * restored machine's come from its snapshot, so they are not), and its dirty log.
 */
function machineConfig(machine: Machine, runConfig: Record<string, unknown>): Record<string, unknown> {
  const config: Record<string, unknown> = { ...runConfig };
  if (config.restore === undefined) {
    config.memory = `${machine.memoryBytes / (1024 * 1024)}M`;
    config.vcpus = machine.vcpuCount;
  }
  if (machine.boot !== null) config.irqchip = machine.irqchip;
  config['dirty-log'] = machine.dirtyLogMode;
  return config;
}

/** Registers as JSON: each number as a 0x string (64-bit values do not fit a JSON number). */
export interface ApiRegisters {
  vcpu: number;
  /** As QEMU's `info registers` prints them. */
  text: string;
  regs: Record<string, string>;
  sregs: Record<string, string | Record<string, string>>;
}

function hexFields(value: object): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [key, field] of Object.entries(value)) {
    if (typeof field === 'bigint' || typeof field === 'number') out[key] = `0x${field.toString(16)}`;
    else if (Array.isArray(field)) out[key] = field.map((item) => `0x${BigInt(item).toString(16)}`).join(' ');
    else if (typeof field === 'object' && field !== null) (out as Record<string, unknown>)[key] = hexFields(field);
  }
  return out;
}

export interface ApiStatus {
  state: ApiMachineState;
  vcpuCount: number;
  memoryBytes: number;
  /** The latest progress of a migration under way, else null. */
  migration: MigrationProgress | null;
}

/** migrate()'s options as JSON (progress comes back as notifications), plus where to. */
export interface ApiMigrateParams extends Omit<MigrateOptions, 'onProgress'> {
  /** tcp:HOST:PORT or unix:PATH */
  address: string;
}

/** Each method's params and result. */
export interface ApiMethods {
  status: { params: Record<string, never>; result: ApiStatus };
  pause: { params: Record<string, never>; result: { state: ApiMachineState } };
  resume: { params: Record<string, never>; result: { state: ApiMachineState } };
  stop: { params: Record<string, never>; result: { state: ApiMachineState } };
  reset: { params: Record<string, never>; result: { state: ApiMachineState } };
  snapshot: { params: { path: string; diff?: boolean }; result: SnapshotInfo };
  migrate: { params: ApiMigrateParams; result: MigrationStats };
  /** A GDB stub on the running machine: tcp:HOST:PORT (port 0: any) or unix:PATH. */
  gdb: { params: { address: string }; result: { address: string } };
  /** A vCPU's registers (default vCPU 0), the machine running or paused. */
  regs: { params: { vcpu?: number }; result: ApiRegisters };
  /**
   * Guest memory: `address` a number or a '0x...' string, virtual through `vcpu`'s page tables
   * unless `physical`; `length` default 64, at most 1 MiB. `data`: the bytes in hex.
   */
  x: { params: { address: string | number; length?: number; vcpu?: number; physical?: boolean }; result: { address: string; length: number; data: string } };
  /** Exit statistics (machine.exitStats()); counting starts with the first call unless `start` is false. */
  stats: { params: { start?: boolean }; result: ExitStats };
  /** Exit statistics back to zero, counting on (nothing happens to a machine that does not count); the result: as they are then. */
  'stats-reset': { params: Record<string, never>; result: ExitStats };
  /** Starts writing every exit to `path` (absolute: the machine's working directory is not the caller's). */
  'trace-start': { params: { path: string }; result: { path: string } };
  /** Stops the exit trace, the file complete; `path`: null when none was being written. */
  'trace-stop': { params: Record<string, never>; result: { path: string | null } };
  /** The machine's configuration: run's options by their long names, as `node-kvm run --config` reads them. */
  config: { params: Record<string, never>; result: Record<string, unknown> };
}

export type ApiMethod = keyof ApiMethods;
export const API_METHODS: readonly ApiMethod[] = ['status', 'pause', 'resume', 'stop', 'reset', 'snapshot', 'migrate', 'gdb', 'regs', 'x', 'stats', 'stats-reset', 'trace-start', 'trace-stop', 'config'];

/** A request line longer than this is refused and its connection closed. */
export const MAX_REQUEST_LINE_BYTES = 1024 * 1024;

/**
 * What the server holds for each client. A client that does not read its replies is first
 * paused (no more of its requests are read) and, past a cap, dropped: its connection is
 * destroyed, its calls under way still complete on the machine and their answers are discarded.
 */
export interface ApiServerOptions {
  /**
   * Stop reading a client's requests while this many bytes of its replies wait to be written,
   * resume once they are (also the stream high-water mark of each connection). Default 64 KiB.
   */
  highWaterBytes?: number;
  /**
   * Drop a client once more than this many bytes of its replies wait to be written: the calls
   * under way when it was paused, and a migration's progress, which comes without any request
   * being read. Default 4 MiB (about 9000 progress lines).
   */
  maxQueuedReplyBytes?: number;
  /** Calls of one client run at once; its further requests wait, and reading stops. Default 32. */
  maxCallsUnderWay?: number;
  /**
   * Drop a client once more than this many of its requests are read but not started. Reading
   * stops while any wait, so they come from one read of the socket (at most 64 KiB); the default,
   * 65536, lets all of those wait.
   */
  maxPendingRequests?: number;
}

export const API_SERVER_DEFAULTS: Readonly<Required<ApiServerOptions>> = {
  highWaterBytes: 64 * 1024,
  maxQueuedReplyBytes: 4 * 1024 * 1024,
  maxCallsUnderWay: 32,
  maxPendingRequests: 65536,
};

/** One connected client, as ApiServer.stats() reports it. */
export interface ApiClientStats {
  /** Bytes of replies not yet handed to the kernel. */
  queuedReplyBytes: number;
  callsUnderWay: number;
  /** Requests read but not yet started. */
  pendingRequests: number;
  /** Whether the server has stopped reading this client's requests for now. */
  readingPaused: boolean;
}

export interface ApiServerStats {
  clients: ApiClientStats[];
  /** Clients dropped for passing a cap of ApiServerOptions since the server started. */
  droppedClients: number;
}

export interface ApiServer {
  readonly path: string;
  /** What the server holds for each client now. */
  stats(): ApiServerStats;
  /** Stops listening, drops the connections and removes the socket file. */
  close(): Promise<void>;
}

/** Serves `machine`'s control API on a new unix socket at `socketPath`. */
export async function startApiServer(socketPath: string, machine: ApiMachine, options: ApiServerOptions = {}): Promise<ApiServer> {
  if (typeof socketPath !== 'string' || socketPath === '') throw argTypeError('socketPath must be a file path');
  if (typeof machine !== 'object' || machine === null) throw argTypeError('machine must be an object');
  const limits = checkServerOptions(options);
  const connections = new Set<net.Socket>();
  const clients = new Map<net.Socket, () => ApiClientStats>();
  let droppedClients = 0;
  let migration: MigrationProgress | null = null;
  let migrating = false;

  const methods: { [M in ApiMethod]: (params: Record<string, unknown>, progress: (p: MigrationProgress) => void) => Promise<ApiMethods[M]['result']> } = {
    async status(params) {
      checkParams(params, 'status', []);
      return { state: machine.state, vcpuCount: machine.vcpuCount, memoryBytes: machine.memoryBytes, migration };
    },
    async pause(params) {
      checkParams(params, 'pause', []);
      await machine.pause();
      return { state: machine.state };
    },
    async resume(params) {
      checkParams(params, 'resume', []);
      machine.resume();
      return { state: machine.state };
    },
    // Answered as the machine begins to end ('stopping'): the answer goes out before the run
    // command closes this server on its way out.
    async stop(params) {
      checkParams(params, 'stop', []);
      machine.stop();
      return { state: machine.state };
    },
    async reset(params) {
      checkParams(params, 'reset', []);
      const state = machine.state;
      if (state !== 'running' && state !== 'paused') throw new NodeKvmError(ErrorCode.MachineState, `machine is ${state}: there is no guest to reset`);
      await machine.reset();
      return { state: machine.state };
    },
    async snapshot(params) {
      checkParams(params, 'snapshot', ['path', 'diff']);
      const path = params.path;
      // The server's working directory is not the caller's: only absolute paths mean the same to both.
      const pathProblem = 'snapshot: params.path must be an absolute file path';
      if (typeof path !== 'string') throw argTypeError(pathProblem);
      if (!path.startsWith('/')) throw argValueError(pathProblem);
      if (params.diff !== undefined && typeof params.diff !== 'boolean') throw argTypeError('snapshot: params.diff must be a boolean');
      return machine.snapshot(path, { diff: params.diff === true });
    },
    async gdb(params) {
      checkParams(params, 'gdb', ['address']);
      if (typeof params.address !== 'string') throw argTypeError('gdb: params.address must be a string (tcp:HOST:PORT or unix:PATH)');
      if (!machine.gdb) throw new NodeKvmError(ErrorCode.MachineState, 'gdb: this machine cannot be debugged');
      return { address: await machine.gdb(params.address) };
    },
    async regs(params) {
      checkParams(params, 'regs', ['vcpu']);
      const vcpu = params.vcpu ?? 0;
      if (typeof vcpu !== 'number') throw argTypeError('regs: params.vcpu must be an integer');
      if (!machine.regs) throw new NodeKvmError(ErrorCode.MachineState, 'regs: this machine cannot be inspected');
      return machine.regs(vcpu);
    },
    async x(params) {
      checkParams(params, 'x', ['address', 'length', 'vcpu', 'physical']);
      const { address, length = 64, vcpu = 0, physical = false } = params;
      let at: bigint;
      if (typeof address === 'number' && Number.isSafeInteger(address) && address >= 0) at = BigInt(address);
      else if (typeof address === 'string' && /^(0x[0-9a-fA-F]{1,16}|\d{1,20})$/.test(address)) at = BigInt(address);
      else throw argTypeError("x: params.address must be a non-negative integer or a string ('0x1000', '4096')");
      if (typeof length !== 'number') throw argTypeError('x: params.length must be an integer');
      if (typeof vcpu !== 'number') throw argTypeError('x: params.vcpu must be an integer');
      if (typeof physical !== 'boolean') throw argTypeError('x: params.physical must be a boolean');
      if (!machine.x) throw new NodeKvmError(ErrorCode.MachineState, 'x: this machine cannot be inspected');
      const data = await machine.x(at, length, { vcpu, physical });
      return { address: `0x${at.toString(16)}`, length: data.length, data: data.toString('hex') };
    },
    async stats(params) {
      checkParams(params, 'stats', ['start']);
      if (params.start !== undefined && typeof params.start !== 'boolean') throw argTypeError('stats: params.start must be a boolean');
      if (!machine.stats) throw new NodeKvmError(ErrorCode.MachineState, 'stats: this machine does not count exits');
      return machine.stats(params.start !== false);
    },
    async 'stats-reset'(params) {
      checkParams(params, 'stats-reset', []);
      if (!machine.statsReset) throw new NodeKvmError(ErrorCode.MachineState, 'stats-reset: this machine does not count exits');
      return machine.statsReset();
    },
    async 'trace-start'(params) {
      checkParams(params, 'trace-start', ['path']);
      const { path } = params;
      const pathProblem = 'trace-start: params.path must be an absolute file path';
      if (typeof path !== 'string') throw argTypeError(pathProblem);
      if (!path.startsWith('/')) throw argValueError(pathProblem);
      if (!machine.traceStart) throw new NodeKvmError(ErrorCode.MachineState, 'trace-start: this machine cannot trace its exits');
      await machine.traceStart(path);
      return { path };
    },
    async 'trace-stop'(params) {
      checkParams(params, 'trace-stop', []);
      if (!machine.traceStop) throw new NodeKvmError(ErrorCode.MachineState, 'trace-stop: this machine cannot trace its exits');
      return { path: await machine.traceStop() };
    },
    async config(params) {
      checkParams(params, 'config', []);
      if (!machine.config) throw new NodeKvmError(ErrorCode.MachineState, 'config: this machine has no configuration to report');
      return machine.config();
    },
    async migrate(params, progress) {
      const options = checkMigrateParams(params);
      if (migrating) throw new NodeKvmError(ErrorCode.MachineState, 'a migration is already under way');
      migrating = true;
      try {
        return await machine.migrate(params.address as string, {
          ...options,
          onProgress: (update) => {
            migration = update;
            progress(update);
          },
        });
      } finally {
        migrating = false;
        migration = null;
      }
    },
  };

  const serve = (socket: net.Socket) => {
    connections.add(socket);
    // A client that goes away mid-call: its answers are dropped, the call itself completes.
    socket.on('error', () => {});
    // Requests read but not started: pending[nextPending...]
    let pending: string[] = [];
    let nextPending = 0;
    let callsUnderWay = 0;
    const pendingCount = () => pending.length - nextPending;
    const discardPending = () => {
      pending = [];
      nextPending = 0;
    };
    socket.on('close', () => {
      connections.delete(socket);
      clients.delete(socket);
      discardPending();
    });
    clients.set(socket, () => ({ queuedReplyBytes: socket.writableLength, callsUnderWay, pendingRequests: pendingCount(), readingPaused: socket.isPaused() }));

    const drop = () => {
      if (socket.destroyed) return;
      droppedClients++;
      discardPending();
      socket.destroy();
    };
    const send = (message: object) => {
      if (socket.destroyed || !socket.writable) return;
      // What is answered in one tick goes out in one write.
      if (socket.writableCorked === 0) {
        socket.cork();
        process.nextTick(() => socket.uncork());
      }
      socket.write(`${JSON.stringify(message)}\n`);
      if (socket.writableLength > limits.maxQueuedReplyBytes) drop();
    };
    const callDone = () => {
      callsUnderWay--;
      pump();
    };
    // Starts what may start, and reads on only when nothing waits: the replies not yet taken
    // stay under highWaterBytes plus what the calls under way answer.
    const pump = () => {
      while (pendingCount() > 0 && callsUnderWay < limits.maxCallsUnderWay && !socket.writableNeedDrain && !socket.destroyed) {
        const line = pending[nextPending++]!;
        if (nextPending === pending.length) discardPending();
        callsUnderWay++;
        void answer(line, send).then(callDone);
      }
      if (socket.destroyed) return;
      const throttled = pendingCount() > 0 || callsUnderWay >= limits.maxCallsUnderWay || socket.writableNeedDrain;
      if (throttled) socket.pause();
      else if (socket.isPaused()) socket.resume();
    };
    socket.on('drain', pump);

    const lines = new LineSplitter(MAX_REQUEST_LINE_BYTES);
    socket.on('data', (chunk: Buffer) => {
      if (lines.overflowed || socket.destroyed) return;
      for (const line of lines.push(chunk)) pending.push(line);
      pump();
      if (lines.overflowed) {
        // Where the next request starts is unknowable now: refuse and hang up. Requests read but
        // not started are not run: their answers could not be sent.
        discardPending();
        send({ id: null, error: { message: `request line longer than ${MAX_REQUEST_LINE_BYTES} bytes`, code: ErrorCode.ApiProtocol } });
        socket.end(() => socket.destroy());
      } else if (pendingCount() > limits.maxPendingRequests) drop();
    });
  };

  const answer = async (line: string, send: (message: object) => void) => {
    let id: number | string | null = null;
    try {
      let request: unknown;
      try {
        request = JSON.parse(line);
      } catch (error) {
        throw new NodeKvmError(ErrorCode.ApiProtocol, `malformed JSON: ${(error as Error).message}`, { cause: error });
      }
      if (typeof request !== 'object' || request === null || Array.isArray(request)) {
        throw new NodeKvmError(ErrorCode.ApiProtocol, 'a request is a JSON object {"id":..., "method":..., "params":{...}}');
      }
      const { id: requestId, method, params } = request as Record<string, unknown>;
      if (!(typeof requestId === 'string' || (typeof requestId === 'number' && Number.isFinite(requestId)))) {
        throw new NodeKvmError(ErrorCode.ApiProtocol, 'request id must be a number or a string');
      }
      id = requestId;
      if (typeof method !== 'string' || !(API_METHODS as readonly string[]).includes(method)) {
        throw argValueError(`unknown method ${JSON.stringify(method)} (methods: ${API_METHODS.join(', ')})`);
      }
      if (params !== undefined && (typeof params !== 'object' || params === null || Array.isArray(params))) {
        throw argTypeError(`${method}: params must be an object`);
      }
      const result = await methods[method as ApiMethod]((params ?? {}) as Record<string, unknown>, (progress) => send({ id: requestId, progress }));
      send({ id, result });
    } catch (error) {
      send({ id, error: errorBody(error) });
    }
  };

  const server = net.createServer({ highWaterMark: limits.highWaterBytes }, serve);
  const removeSocketFile = await listenOnPrivateUnixSocket(server, socketPath);
  let closing: Promise<void> | null = null;
  return {
    path: socketPath,
    stats() {
      return { clients: [...clients.values()].map((clientStats) => clientStats()), droppedClients };
    },
    close() {
      closing ??= new Promise<void>((resolve) => {
        server.close(() => resolve());
        for (const socket of connections) socket.destroy();
        removeSocketFile();
      });
      return closing;
    },
  };
}

function checkServerOptions(options: ApiServerOptions): Required<ApiServerOptions> {
  if (typeof options !== 'object' || options === null) throw argTypeError('startApiServer: options must be an object');
  const limits = { ...API_SERVER_DEFAULTS };
  for (const key of Object.keys(options) as (keyof ApiServerOptions)[]) {
    if (!Object.hasOwn(API_SERVER_DEFAULTS, key)) throw argValueError(`startApiServer: unknown option '${key}'`);
    const value = options[key];
    if (value === undefined) continue;
    if (!Number.isSafeInteger(value) || value < 1) throw outOfRangeError(`startApiServer: ${key} must be a positive integer`);
    limits[key] = value;
  }
  if (limits.maxQueuedReplyBytes < limits.highWaterBytes) {
    throw outOfRangeError(`startApiServer: maxQueuedReplyBytes (${limits.maxQueuedReplyBytes}) must be at least highWaterBytes (${limits.highWaterBytes})`);
  }
  return limits;
}

function checkParams(params: Record<string, unknown>, method: string, allowed: string[]): void {
  for (const key of Object.keys(params)) {
    if (!allowed.includes(key)) throw argValueError(`${method}: unknown parameter '${key}'`);
  }
}

function checkMigrateParams(params: Record<string, unknown>): Omit<MigrateOptions, 'onProgress'> {
  checkParams(params, 'migrate', ['address', 'token', 'downtimeBudgetMs', 'maxIterations', 'maxPrecopyMs', 'onNonConvergence', 'timeoutMs', 'autoConverge', 'postcopy', 'postcopyRecoveryMs', 'local']);
  if (typeof params.address !== 'string') throw argTypeError('migrate: params.address must be a string (tcp:HOST:PORT or unix:PATH)');
  const address = parseMigrationAddress(params.address);
  if (address.kind === 'unix' && !address.path.startsWith('/')) throw argValueError('migrate: a unix socket path must be absolute');
  const options: Omit<MigrateOptions, 'onProgress'> = {};
  if (params.token !== undefined) {
    if (typeof params.token !== 'string') throw argTypeError('migrate: params.token must be a non-empty string');
    if (params.token === '') throw argValueError('migrate: params.token must be a non-empty string');
    options.token = params.token;
  }
  const positive = (name: 'downtimeBudgetMs' | 'maxPrecopyMs' | 'timeoutMs' | 'postcopyRecoveryMs') => {
    const value = params[name];
    if (value === undefined) return;
    if (typeof value !== 'number') throw argTypeError(`migrate: params.${name} must be a positive number`);
    if (!Number.isFinite(value) || value <= 0) throw outOfRangeError(`migrate: params.${name} must be a positive number`);
    options[name] = value;
  };
  positive('downtimeBudgetMs');
  positive('maxPrecopyMs');
  positive('timeoutMs');
  positive('postcopyRecoveryMs');
  if (params.postcopy !== undefined) {
    if (params.postcopy !== true && params.postcopy !== false && params.postcopy !== 'after-rounds') throw argValueError("migrate: params.postcopy must be true, false or 'after-rounds'");
    options.postcopy = params.postcopy;
  }
  if (params.maxIterations !== undefined) {
    if (typeof params.maxIterations !== 'number') throw argTypeError('migrate: params.maxIterations must be a positive integer');
    if (!Number.isInteger(params.maxIterations) || params.maxIterations < 1) throw outOfRangeError('migrate: params.maxIterations must be a positive integer');
    options.maxIterations = params.maxIterations as number;
  }
  if (params.onNonConvergence !== undefined) {
    if (params.onNonConvergence !== 'finish' && params.onNonConvergence !== 'abort') throw argValueError("migrate: params.onNonConvergence must be 'finish' or 'abort'");
    options.onNonConvergence = params.onNonConvergence;
  }
  if (params.autoConverge !== undefined) {
    // true, false, or { throttleInitial, throttleIncrement, throttleMax }: checked as migrate() does.
    checkAutoConverge(params.autoConverge as MigrateOptions['autoConverge']);
    options.autoConverge = params.autoConverge as MigrateOptions['autoConverge'];
  }
  if (params.local !== undefined) {
    if (typeof params.local !== 'boolean') throw argTypeError('migrate: params.local must be a boolean');
    if (params.local && address.kind !== 'unix') throw argValueError('migrate: a local migration needs a unix:PATH address (it hands file descriptors to a process on this host)');
    options.local = params.local;
  }
  return options;
}

function errorBody(error: unknown): { message: string; code?: string } {
  if (!(error instanceof Error)) return { message: String(error) };
  const code = (error as { code?: unknown }).code;
  return typeof code === 'string' ? { message: error.message, code } : { message: error.message };
}

/** Splits a byte stream into lines (without their '\n'), up to a line longer than a limit. */
export class LineSplitter {
  #pieces: Buffer[] = [];
  #pendingBytes = 0;
  /** A line grew past the limit: nothing after it is split any more. */
  overflowed = false;

  constructor(readonly maxLineBytes: number) {}

  /** The lines `chunk` completes. */
  push(chunk: Buffer): string[] {
    const lines: string[] = [];
    if (this.overflowed) return lines;
    let start = 0;
    for (let newline = chunk.indexOf(0x0a); newline >= 0; newline = chunk.indexOf(0x0a, start)) {
      if (!this.#take(chunk.subarray(start, newline))) return lines;
      const line = Buffer.concat(this.#pieces).toString('utf8').replace(/\r$/, '');
      this.#pieces = [];
      this.#pendingBytes = 0;
      if (line.trim() !== '') lines.push(line);
      start = newline + 1;
    }
    if (start < chunk.length) this.#take(chunk.subarray(start));
    return lines;
  }

  #take(piece: Buffer): boolean {
    this.#pendingBytes += piece.length;
    if (this.#pendingBytes > this.maxLineBytes) {
      this.overflowed = true;
      this.#pieces = [];
      return false;
    }
    this.#pieces.push(piece);
    return true;
  }
}
