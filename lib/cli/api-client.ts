// A client for a machine's control API (see api-server.ts): one call per connection.
import net from 'node:net';
import { parseArgs, type ParseArgsConfig } from 'node:util';
import { LineSplitter, type ApiMethod, type ApiMethods } from './api-server.js';
import type { MigrationProgress } from '../migration/types.js';
import { ErrorCode, NodeKvmError, argTypeError, argValueError, systemError } from '../kvm/errors.js';

/** Responses carry at most a few KiB; anything near this is not our server. */
const MAX_RESPONSE_LINE_BYTES = 16 * 1024 * 1024;

/**
 * The machine answered the call with an error: its message, and its code ('EBUSY',
 * 'ERR_MACHINE_STATE', ...), or ERR_API_CALL_FAILED where the error had none.
 */
export class ApiError extends NodeKvmError {
  constructor(message: string, code: string = ErrorCode.ApiCallFailed) {
    super(code, message);
    this.name = 'ApiError';
  }
}

/**
 * Calls `method` on the machine serving `socketPath` and resolves with its result; a migrate's
 * progress goes to `onProgress` meanwhile. Rejects with an ApiError when the machine answers
 * with an error; with a NodeKvmError when it cannot be reached (the system error's code: ENOENT,
 * ECONNREFUSED), hangs up first (ERR_API_CLOSED) or answers what is not the API (ERR_API_PROTOCOL).
 */
export function callApi<M extends ApiMethod>(
  socketPath: string, method: M, params: ApiMethods[M]['params'], onProgress?: (progress: MigrationProgress) => void,
): Promise<ApiMethods[M]['result']> {
  if (typeof socketPath !== 'string' || socketPath === '') return Promise.reject(argTypeError('socketPath must be a file path'));
  const id = 1;
  return new Promise((resolve, reject) => {
    const socket = net.createConnection({ path: socketPath });
    let answered = false;
    const settle = (error: Error | null, result?: unknown) => {
      if (answered) return;
      answered = true;
      socket.destroy();
      if (error) reject(error);
      else resolve(result as ApiMethods[M]['result']);
    };
    socket.once('connect', () => socket.write(`${JSON.stringify({ id, method, params })}\n`));
    socket.on('error', (error: NodeJS.ErrnoException) => {
      const unreachable = error.code === 'ENOENT' || error.code === 'ECONNREFUSED';
      settle(systemError(unreachable
        ? `no machine is serving the API socket ${socketPath} (${error.code})`
        : `API socket ${socketPath}: ${error.code ?? error.message}`, error));
    });
    socket.on('close', () => settle(new NodeKvmError(ErrorCode.ApiClosed, `the machine closed the API connection on ${socketPath} before answering ${method}`)));
    const lines = new LineSplitter(MAX_RESPONSE_LINE_BYTES);
    socket.on('data', (chunk: Buffer) => {
      for (const line of lines.push(chunk)) {
        let message: { id?: unknown; result?: unknown; error?: { message?: unknown; code?: unknown }; progress?: MigrationProgress };
        try {
          message = JSON.parse(line);
        } catch (error) {
          settle(new NodeKvmError(ErrorCode.ApiProtocol, `API socket ${socketPath}: the answer is not JSON`, { cause: error }));
          return;
        }
        if (message.error !== undefined && (message.id === id || message.id === null)) {
          const code = typeof message.error?.code === 'string' ? message.error.code : undefined;
          settle(new ApiError(String(message.error?.message ?? 'unknown error'), code));
          return;
        }
        if (message.id !== id) continue;
        if (message.progress !== undefined) {
          try {
            onProgress?.(message.progress);
          } catch (error) {
            settle(error as Error);
            return;
          }
        } else if ('result' in message) settle(null, message.result);
      }
      if (lines.overflowed) settle(new NodeKvmError(ErrorCode.ApiProtocol, `API socket ${socketPath}: an answer longer than ${MAX_RESPONSE_LINE_BYTES} bytes`));
    });
  });
}

/** The --api-socket option of a command that talks to a running machine. */
/** The options every command to a running machine takes, beside its own. */
const API_COMMAND_OPTIONS = { help: { type: 'boolean', short: 'h' }, 'api-socket': { type: 'string' } } as const;

type CommandOptions = NonNullable<ParseArgsConfig['options']>;
type ApiCommandConfig<T extends CommandOptions> = { args: string[]; allowPositionals: true; options: typeof API_COMMAND_OPTIONS & T };

/**
 * The arguments of a command to a running machine: its own `options` and the API_COMMAND_OPTIONS,
 * and positionals. Undefined after printing `usage` for -h/--help (the command exits 0).
 */
export function parseApiCommandArgs<T extends CommandOptions>(args: string[], options: T, usage: string): ReturnType<typeof parseArgs<ApiCommandConfig<T>>> | undefined {
  const config: ApiCommandConfig<T> = { args, allowPositionals: true, options: { ...API_COMMAND_OPTIONS, ...options } };
  const parsed = parseArgs(config);
  if ((parsed.values as { help?: boolean }).help) {
    console.log(usage);
    return undefined;
  }
  return parsed;
}

export function requireApiSocket(value: string | undefined, command: string): string {
  if (value === undefined || value === '') {
    throw argValueError(`${command} needs --api-socket PATH (the socket a machine serves with node-kvm run --api-socket)`);
  }
  return value;
}
