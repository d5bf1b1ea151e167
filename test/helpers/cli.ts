// The `node-kvm` command in this process: main() of lib/cli/commands.ts, which prints what the
// command prints and resolves with its exit status (lib/cli/main.ts only sets it), with stdout and
// stderr captured. Much faster than a child process, each of which loads TypeScript anew; a
// guest's console goes to fd 1 directly, though, so a command that boots a guest needs a process.
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import path from 'node:path';
import { Worker } from 'node:worker_threads';
import { main } from '../../lib/cli/commands.js';
import { watchVcpuThread, type VcpuThread } from '../../lib/vmm/pool.js';
import { repoRoot } from './kvm.js';
import { childExecArgv } from './spawn.js';

const builtVcpuWorker = path.join(repoRoot, 'dist', 'lib', 'vmm', 'vcpu-worker.cjs');

/**
 * A vCPU thread from the built bundle, as the built command's entry starts one before `run` reads
 * its arguments. It loads in milliseconds; from the source, under tap's TypeScript loader, a
 * thread takes a second or more.
 */
function startBuiltVcpuThread(): VcpuThread {
  if (!existsSync(builtVcpuWorker)) throw new Error(`${builtVcpuWorker} is not built: run npm run build:ts`);
  // Plain JavaScript: none of tap's loaders, which take the most of a thread's start.
  return watchVcpuThread(new Worker(builtVcpuWorker, { name: 'vcpu', execArgv: [] }));
}

export interface CommandResult {
  status: number | null;
  signal?: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

let running = false;

/** Sets `object[key]` to `value` and returns what puts it back as it was. */
function replace<T extends object, K extends keyof T>(object: T, key: K, value: T[K]): () => void {
  const own = Object.getOwnPropertyDescriptor(object, key);
  Object.defineProperty(object, key, { value, configurable: true, writable: true, enumerable: own?.enumerable ?? true });
  return () => {
    if (own) Object.defineProperty(object, key, own);
    else delete object[key];
  };
}

export interface InProcessOptions {
  /** Added to the environment while the command runs (undefined: unset). */
  env?: Record<string, string | undefined>;
  /**
   * `run` is handed a first vCPU thread from the built bundle, as the built command's is, instead
   * of starting its threads from the source: for argument errors, where the thread only starts and
   * quits. A guest that runs should run on the source.
   */
  builtFirstThread?: boolean;
}

/**
 * Runs `node-kvm ARGS` in this process, one at a time. stdout and stderr are captured as pipes,
 * not terminals, as a child's would be.
 */
export async function nodeKvmInProcess(args: string[], options: InProcessOptions = {}): Promise<CommandResult> {
  if (running) throw new Error('one in-process node-kvm at a time: they share stdout and stderr');
  running = true;
  let stdout = '';
  let stderr = '';
  const capture = (append: (text: string) => void) => (chunk: string | Uint8Array, encoding?: BufferEncoding | (() => void), done?: () => void) => {
    append(typeof chunk === 'string' ? chunk : Buffer.from(chunk).toString('latin1'));
    const callback = typeof encoding === 'function' ? encoding : done;
    if (callback) process.nextTick(callback);
    return true;
  };
  const restore = [
    replace(process.stdout, 'write', capture((text) => (stdout += text)) as typeof process.stdout.write),
    replace(process.stderr, 'write', capture((text) => (stderr += text)) as typeof process.stderr.write),
    replace(process.stdout, 'isTTY', false),
    replace(process.stderr, 'isTTY', false),
  ];
  const savedEnv = Object.entries(options.env ?? {}).map(([name, value]) => {
    const saved = process.env[name];
    if (value === undefined) delete process.env[name];
    else process.env[name] = value;
    return () => {
      if (saved === undefined) delete process.env[name];
      else process.env[name] = saved;
    };
  });
  try {
    // The entry's rule for starting it (lib/cli/main.ts).
    const starts = options.builtFirstThread && args[0] === 'run' && !args.includes('-h') && !args.includes('--help');
    const firstThread = starts ? startBuiltVcpuThread() : undefined;
    const status = await main(args, firstThread);
    // As the entry does: ended already if run took it, and a thread left unused ends here.
    firstThread?.send({ type: 'quit' });
    await firstThread?.exited;
    return { status, stdout, stderr };
  } finally {
    for (const undo of [...restore, ...savedEnv].reverse()) undo();
    running = false;
  }
}

export interface NodeKvmProcess {
  stdout(): string;
  stderr(): string;
  /** Resolves once stdout (or stderr) matches; rejects if the process ends first, or after `timeoutMs`. */
  waitFor(pattern: RegExp, stream?: 'stdout' | 'stderr', timeoutMs?: number): Promise<RegExpExecArray>;
  kill(signal?: NodeJS.Signals): void;
  result: Promise<CommandResult>;
}

const sourceEntry = path.join(repoRoot, 'lib', 'cli', 'main.ts');

/**
 * Runs `node-kvm ARGS` as a child process from the TypeScript source (the child inherits tap's
 * loader, and its coverage counts), for what needs a process: a guest's console, signals, two
 * machines migrating between processes. `input` is piped to its stdin (else stdin is /dev/null).
 */
export function startNodeKvm(args: string[], env: NodeJS.ProcessEnv = {}, options: { input?: string } = {}): NodeKvmProcess {
  const stdin = options.input === undefined ? 'ignore' : 'pipe';
  const child = spawn(process.execPath, [...childExecArgv, sourceEntry, ...args], { stdio: [stdin, 'pipe', 'pipe'], env: { ...process.env, ...env } });
  // Written at once and closed: the command reads it through a pipe, then its end.
  if (options.input !== undefined) child.stdin!.end(options.input);
  let stdout = '';
  let stderr = '';
  const waiters = new Set<() => void>();
  const wake = () => {
    for (const waiter of waiters) waiter();
  };
  child.stdout!.on('data', (chunk: Buffer) => {
    stdout += chunk.toString('latin1');
    wake();
  });
  child.stderr!.on('data', (chunk: Buffer) => {
    stderr += chunk.toString('latin1');
    wake();
  });
  // Once closed, all its output is in.
  let closed = false;
  const result = new Promise<CommandResult>((resolve) => {
    child.on('close', (status, signal) => {
      closed = true;
      resolve({ status, signal, stdout, stderr });
      wake();
    });
  });
  return {
    stdout: () => stdout,
    stderr: () => stderr,
    waitFor(pattern, stream = 'stdout', timeoutMs = 60_000) {
      return new Promise((resolve, reject) => {
        const fail = (why: string) => {
          waiters.delete(check);
          clearTimeout(deadline);
          reject(new Error(`node-kvm ${args.join(' ')} ${why} without ${pattern} on ${stream}; stdout ${JSON.stringify(stdout.slice(-300))}; stderr ${JSON.stringify(stderr.slice(-600))}`));
        };
        const check = () => {
          const match = pattern.exec(stream === 'stdout' ? stdout : stderr);
          if (match) {
            waiters.delete(check);
            clearTimeout(deadline);
            resolve(match);
          } else if (closed) fail('ended');
        };
        const deadline = setTimeout(() => fail(`ran ${timeoutMs} ms`), timeoutMs);
        waiters.add(check);
        check();
      });
    },
    kill: (signal = 'SIGTERM') => child.kill(signal),
    result,
  };
}
