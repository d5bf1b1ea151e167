// One vCPU thread, from the moment it is started. A thread takes messages before it has loaded
// (they wait in its queue), so a machine hands it its vCPU at once instead of waiting for it to
// report idle: one message hop less on the way to the guest's first instruction.
import { fileURLToPath } from 'node:url';
import { Worker, type TransferListItem } from 'node:worker_threads';
import type { WorkerMessage } from './types.js';
import { workerEntry } from './worker-entry.js';
import { ErrorCode, NodeKvmError } from '../kvm/errors.js';

// The worker module sits beside this one, as .ts under a TypeScript loader and .js when built;
// built, its one-file bundle starts faster where there is one (scripts/bundle.mjs).
const workerFile = workerEntry(fileURLToPath(import.meta.url), 'vcpu-worker');

/**
 * What a vCPU thread is sent: `{ type: 'quit' }` ends an idle thread (one its pool or machine no
 * longer wants); the VMM sends it its machine's vCPU (an assignment only the VMM builds).
 */
export type VcpuThreadMessage = { type: 'quit' } | { type: 'assign'; assignment: unknown };

/** A worker thread that runs vCPUs (startVcpuThread()): its Worker, when it has loaded, and how to talk to it. */
export interface VcpuThread {
  readonly worker: Worker;
  /** Resolves once the thread has loaded its code and is idle; rejects if it fails to load. */
  readonly loaded: Promise<void>;
  /** Resolves once the thread has ended, however it ended. */
  readonly exited: Promise<void>;
  /** Where loading stands (what `loaded` says, readable at once). */
  readonly status: 'loading' | 'loaded' | 'failed';
  /** Posts `message` to the thread (an assignment, or quit). */
  send(message: VcpuThreadMessage, transfer?: TransferListItem[]): void;
}

/** Starts a vCPU thread; it is usable (send() an assignment) before it has loaded. */
export function startVcpuThread(): VcpuThread {
  return watchVcpuThread(new Worker(workerFile, { name: 'vcpu' }));
}

/** A just-started Worker as a vCPU thread: it has loaded when it reports idle. */
export function watchVcpuThread(worker: Worker): VcpuThread {
  let status: VcpuThread['status'] = 'loading';
  const exited = new Promise<void>((resolve) => worker.once('exit', () => resolve()));
  const loaded = new Promise<void>((resolve, reject) => {
    const settle = (error?: Error) => {
      worker.off('message', onMessage);
      worker.off('error', onError);
      worker.off('exit', onExit);
      status = error ? 'failed' : 'loaded';
      if (error) reject(error);
      else resolve();
    };
    const onMessage = (message: WorkerMessage) => {
      if (message.type === 'idle') settle();
    };
    const onError = (error: Error) => settle(new NodeKvmError(ErrorCode.WorkerInitFailed, `a vCPU thread failed to load: ${error.message}`, { cause: error }));
    const onExit = (code: number) => settle(new NodeKvmError(ErrorCode.WorkerInitFailed, `a vCPU thread ended (status ${code}) before it had loaded`));
    worker.on('message', onMessage);
    worker.on('error', onError);
    worker.on('exit', onExit);
  });
  // Observed by whoever holds the thread; this keeps an unheld failure from being unhandled.
  loaded.catch(() => {});
  return {
    worker,
    loaded,
    exited,
    get status() {
      return status;
    },
    send: (message, transfer) => worker.postMessage(message, transfer),
  };
}
