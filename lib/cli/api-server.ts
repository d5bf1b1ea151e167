// The control API of a running machine: newline-delimited JSON over a unix socket (mode 0600).
//   request   {"id":1,"method":"status"|"pause"|"resume"|"snapshot"|"migrate","params":{...}}
//   response  {"id":1,"result":...}  or  {"id":1,"error":{"message":"..."}}
//   progress  {"id":1,"progress":{...MigrationStats}}  (zero or more, before a migrate's response)
// Several clients may be connected, and each may have several calls under way.
import net from 'node:net';
import { listenOnPrivateUnixSocket, parseMigrationAddress } from '../migration/transport.js';
import type { MigrateOptions, MigrationProgress, MigrationStats, NonConvergence, SnapshotInfo, SnapshotOptions } from '../migration/types.js';

export type ApiMachineState = 'created' | 'running' | 'paused' | 'stopping';

/** What the API needs of a machine (Machine implements it). */
export interface ApiMachine {
  readonly state: ApiMachineState;
  readonly vcpuCount: number;
  readonly memoryBytes: number;
  pause(): Promise<void>;
  resume(): void;
  snapshot(path: string, options?: SnapshotOptions): Promise<SnapshotInfo>;
  migrate(address: string, options?: MigrateOptions): Promise<MigrationStats>;
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
  snapshot: { params: { path: string; diff?: boolean }; result: SnapshotInfo };
  migrate: { params: ApiMigrateParams; result: MigrationStats };
}

export type ApiMethod = keyof ApiMethods;
export const API_METHODS: readonly ApiMethod[] = ['status', 'pause', 'resume', 'snapshot', 'migrate'];

/** A request line longer than this is refused and its connection closed. */
export const MAX_REQUEST_LINE_BYTES = 1024 * 1024;

export interface ApiServer {
  readonly path: string;
  /** Stops listening, drops the connections and removes the socket file. */
  close(): Promise<void>;
}

/** Serves `machine`'s control API on a new unix socket at `socketPath`. */
export async function startApiServer(socketPath: string, machine: ApiMachine): Promise<ApiServer> {
  if (typeof socketPath !== 'string' || socketPath === '') throw new TypeError('socketPath must be a file path');
  if (typeof machine !== 'object' || machine === null) throw new TypeError('machine must be an object');
  const connections = new Set<net.Socket>();
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
    async snapshot(params) {
      checkParams(params, 'snapshot', ['path', 'diff']);
      const path = params.path;
      // The server's working directory is not the caller's: only absolute paths mean the same to both.
      if (typeof path !== 'string' || !path.startsWith('/')) throw new TypeError('snapshot: params.path must be an absolute file path');
      if (params.diff !== undefined && typeof params.diff !== 'boolean') throw new TypeError('snapshot: params.diff must be a boolean');
      return machine.snapshot(path, { diff: params.diff === true });
    },
    async migrate(params, progress) {
      const options = checkMigrateParams(params);
      if (migrating) throw new Error('a migration is already under way');
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
    socket.on('close', () => connections.delete(socket));
    // A client that goes away mid-call: its answers are dropped, the call itself completes.
    socket.on('error', () => {});
    const send = (message: object) => {
      if (!socket.destroyed && socket.writable) socket.write(`${JSON.stringify(message)}\n`);
    };
    const lines = new LineSplitter(MAX_REQUEST_LINE_BYTES);
    socket.on('data', (chunk: Buffer) => {
      if (lines.overflowed) return;
      for (const line of lines.push(chunk)) void answer(line, send);
      if (lines.overflowed) {
        // Where the next request starts is unknowable now: refuse and hang up.
        send({ id: null, error: { message: `request line longer than ${MAX_REQUEST_LINE_BYTES} bytes` } });
        socket.end(() => socket.destroy());
      }
    });
  };

  const answer = async (line: string, send: (message: object) => void) => {
    let id: number | string | null = null;
    try {
      let request: unknown;
      try {
        request = JSON.parse(line);
      } catch (error) {
        throw new SyntaxError(`malformed JSON: ${(error as Error).message}`);
      }
      if (typeof request !== 'object' || request === null || Array.isArray(request)) {
        throw new TypeError('a request is a JSON object {"id":..., "method":..., "params":{...}}');
      }
      const { id: requestId, method, params } = request as Record<string, unknown>;
      if (!(typeof requestId === 'string' || (typeof requestId === 'number' && Number.isFinite(requestId)))) {
        throw new TypeError('request id must be a number or a string');
      }
      id = requestId;
      if (typeof method !== 'string' || !(API_METHODS as readonly string[]).includes(method)) {
        throw new RangeError(`unknown method ${JSON.stringify(method)} (methods: ${API_METHODS.join(', ')})`);
      }
      if (params !== undefined && (typeof params !== 'object' || params === null || Array.isArray(params))) {
        throw new TypeError(`${method}: params must be an object`);
      }
      const result = await methods[method as ApiMethod]((params ?? {}) as Record<string, unknown>, (progress) => send({ id: requestId, progress }));
      send({ id, result });
    } catch (error) {
      send({ id, error: errorBody(error) });
    }
  };

  const server = net.createServer(serve);
  const removeSocketFile = await listenOnPrivateUnixSocket(server, socketPath);
  let closing: Promise<void> | null = null;
  return {
    path: socketPath,
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

function checkParams(params: Record<string, unknown>, method: string, allowed: string[]): void {
  for (const key of Object.keys(params)) {
    if (!allowed.includes(key)) throw new RangeError(`${method}: unknown parameter '${key}'`);
  }
}

function checkMigrateParams(params: Record<string, unknown>): Omit<MigrateOptions, 'onProgress'> {
  checkParams(params, 'migrate', ['address', 'token', 'downtimeBudgetMs', 'maxIterations', 'maxPrecopyMs', 'onNonConvergence', 'timeoutMs']);
  if (typeof params.address !== 'string') throw new TypeError('migrate: params.address must be a string (tcp:HOST:PORT or unix:PATH)');
  const address = parseMigrationAddress(params.address);
  if (address.kind === 'unix' && !address.path.startsWith('/')) throw new TypeError('migrate: a unix socket path must be absolute');
  const options: Omit<MigrateOptions, 'onProgress'> = {};
  if (params.token !== undefined) {
    if (typeof params.token !== 'string' || params.token === '') throw new TypeError('migrate: params.token must be a non-empty string');
    options.token = params.token;
  }
  const positive = (name: 'downtimeBudgetMs' | 'maxPrecopyMs' | 'timeoutMs') => {
    const value = params[name];
    if (value === undefined) return;
    if (typeof value !== 'number' || !Number.isFinite(value) || value <= 0) throw new RangeError(`migrate: params.${name} must be a positive number`);
    options[name] = value;
  };
  positive('downtimeBudgetMs');
  positive('maxPrecopyMs');
  positive('timeoutMs');
  if (params.maxIterations !== undefined) {
    if (!Number.isInteger(params.maxIterations) || (params.maxIterations as number) < 1) throw new RangeError('migrate: params.maxIterations must be a positive integer');
    options.maxIterations = params.maxIterations as number;
  }
  if (params.onNonConvergence !== undefined) {
    if (params.onNonConvergence !== 'finish' && params.onNonConvergence !== 'abort') throw new RangeError("migrate: params.onNonConvergence must be 'finish' or 'abort'");
    options.onNonConvergence = params.onNonConvergence;
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
