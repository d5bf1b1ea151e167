// Shapes shared by snapshots, live migration and the control API.

import type { MachineRuntimeConfig } from '../vmm/config.js';
import type { DirtyLogMode } from '../vmm/dirty-tracker.js';
import type { Machine, MachineShape } from '../vmm/machine.js';

export type { PageRange } from '../vmm/page-ranges.js';
export type { DirtyLogMode } from '../vmm/dirty-tracker.js';

/** What happens when pre-copy hits its iteration or time cap before converging. */
export type NonConvergence = 'finish' | 'abort';

/**
 * Post-copy: `true` moves the guest at once after the handshake (no pre-copy pass: the downtime
 * does not grow with RAM); 'after-rounds' pre-copies as usual and switches to post-copy only where
 * pre-copy would not converge (the iteration or time cap), instead of a long stop-and-copy
 * (onNonConvergence then does not apply). false: pre-copy only.
 */
export type PostcopyMode = boolean | 'after-rounds';

/** How machine.migrate() (migrateMachine()) migrates: the token, the downtime budget, the caps on pre-copy and what to do at them, progress, and an abort signal. */
export interface MigrateOptions {
  /** For tcp: the secret both sides were given. */
  token?: string;
  /**
   * Same-host live update: over a unix:PATH address, hand guest RAM (its memfd), the disk images
   * and the TAPs to the destination process (SCM_RIGHTS) instead of copying pages; the downtime
   * is the round trip of the machine's state, whatever the size of RAM. The pre-copy options do
   * not apply. Refused for a tcp: address, and for a machine whose RAM is a copy-on-write file
   * mapping (restored from a snapshot). Default false.
   */
  local?: boolean;
  /** Longest pause of the guest the pre-copy aims for. Default 50 ms. */
  downtimeBudgetMs?: number;
  /** Pre-copy rounds at most (the first full pass counts). Default 30. */
  maxIterations?: number;
  /** Pre-copy time at most before the final pass. Default 60 s. */
  maxPrecopyMs?: number;
  /** At the cap: pause and finish anyway (default), or give up and keep running here. */
  onNonConvergence?: NonConvergence;
  /**
   * Post-copy (see PostcopyMode): the guest runs at the destination while the pages it lacks
   * follow, fetched on demand as it faults on them (userfaultfd) and streamed in the background.
   * Once the destination runs the guest the source can no longer resume it: a broken connection
   * leaves the guest paused at the destination until this side reconnects (within
   * postcopyRecoveryMs) and sends what is missing; this side keeps its copy, paused, until then.
   * Default false.
   */
  postcopy?: PostcopyMode;
  /** Post-copy: how long to keep trying to reconnect after the connection broke. Default 60 s. */
  postcopyRecoveryMs?: number;
  /**
   * Give up if connecting or any read/write stalls this long. Default 10 s. Given up while
   * waiting for the destination's word that the guest runs there (the whole stream out), the
   * guest stays paused: EUNCONFIRMED.
   */
  timeoutMs?: number;
  /**
   * Throttle the vCPUs while the guest dirties memory faster than the link carries it, until it
   * fits (QEMU's auto-converge); true for the defaults. Off by default.
   */
  autoConverge?: boolean | AutoConvergeOptions;
  /** Called after every round and at each phase change (the machine emits 'progress' then too). */
  onProgress?: (progress: MigrationProgress) => void;
  /**
   * Aborting it gives up (MigrationError, code ABORT_ERR) and tells the destination why; the guest
   * runs on here. It counts until the guest's last state has gone out: from then on the outcome is
   * the destination's.
   */
  signal?: AbortSignal;
}

/**
 * How auto-converge throttles, as QEMU's parameters of the same names: after two rounds in which
 * the guest dirtied more than half of what went out, the vCPUs sleep `throttleInitial` % of every
 * 10 ms, then `throttleIncrement` % more after each two such rounds, up to `throttleMax` %.
 */
export interface AutoConvergeOptions {
  /** Percent, 1..99. Default 20 (QEMU's cpu-throttle-initial). */
  throttleInitial?: number;
  /** Percent, 1..99. Default 10 (QEMU's cpu-throttle-increment). */
  throttleIncrement?: number;
  /** Percent, 1..99, at least throttleInitial. Default 99 (QEMU's max-cpu-throttle). */
  throttleMax?: number;
}

/** Where a live migration is: setting up, copying while the guest runs, copying the rest with the guest paused, post-copy (the guest runs at the destination, the rest follows), done, or failed. */
export type MigrationPhase = 'setup' | 'precopy' | 'stop-copy' | 'postcopy' | 'completed' | 'failed';

/** Like QEMU's query-migrate. Times in ms, sizes in bytes. */
export interface MigrationStats {
  phase: MigrationPhase;
  totalTimeMs: number;
  setupTimeMs: number;
  /** Guest paused until the destination resumed it (measured here, from pause to its ack). */
  downtimeMs: number;
  /** While pre-copy runs: what is left to send over the measured throughput. */
  expectedDowntimeMs: number;
  bytesTransferred: number;
  pagesTransferred: number;
  zeroPagesSkipped: number;
  /** Pages sent again because the guest wrote them after they were sent. */
  pagesResent: number;
  iterations: number;
  /** Pages the guest dirtied per second, over the last round. */
  dirtyPagesRate: number;
  /** Bytes per second over the whole migration. */
  throughputBytesPerSec: number;
  remainingPages: number;
  memoryBytes: number;
  dirtyLogMode: DirtyLogMode;
  /**
   * Auto-converge: the share of every 10 ms the vCPUs sleep now, in percent (QEMU's
   * cpu-throttle-percentage); at 'completed', the share when the guest paused; 0 when off.
   */
  cpuThrottlePercentage: number;
  /** Auto-converge: how long the guest was throttled in all (wall time with a share above 0). */
  throttledMs: number;
  /** Post-copy figures, as QEMU's (present once post-copy has started). */
  postcopy?: PostcopyStats;
}

/** What post-copy did: requests, pages on demand and in the background, fault latency, time. */
export interface PostcopyStats {
  /** Pages the destination lacked when the guest started there. */
  missingPages: number;
  /** PageRequest messages the destination sent (faults waiting on pages not yet there). */
  requests: number;
  /** Pages sent because a fault asked for them. */
  pagesOnDemand: number;
  /** Pages sent by the background stream. */
  pagesBackground: number;
  /** Faults the destination took on missing pages (pages requested or zero-filled there). */
  faults: number;
  /** From a fault to its page placed, at the destination: percentiles in ms (0 without faults). */
  faultLatencyMs: { p50: number; p90: number; p99: number; max: number };
  /** From the guest running at the destination to its last page placed. */
  durationMs: number;
  /** Connections that broke and were resumed. */
  recoveries: number;
}

/** A running migration's figures, as its progress callback and 'progress' events give them. */
export type MigrationProgress = MigrationStats;

/** How machine.snapshot() (snapshotMachine()) writes. */
export interface SnapshotOptions {
  /** Only the pages written since this machine's previous snapshot, layered on that file. */
  diff?: boolean;
  /** Aborting it stops the snapshot (ABORT_ERR): no file is left, the machine runs on. */
  signal?: AbortSignal;
}

/** What a snapshot wrote: where, its kind and parent, bytes and pages, how long the guest was paused and the whole took. */
export interface SnapshotInfo {
  path: string;
  kind: 'full' | 'diff';
  /** The snapshot this one is layered on (diff only). */
  parent?: string;
  bytesWritten: number;
  pagesWritten: number;
  zeroPagesSkipped: number;
  /** Guest paused while the state and memory were captured. */
  pausedMs: number;
  totalTimeMs: number;
}

export interface RestoreConfig extends MachineRuntimeConfig {
  /** Check the checksum of the saved RAM image before mapping it (reads the whole image). */
  verify?: boolean;
  /** Aborting it gives up (ABORT_ERR); a machine built meanwhile is stopped. */
  signal?: AbortSignal;
  /**
   * A machine built ahead (Machine.prepare()) to restore into instead of building one: the
   * restore then creates no kernel object. The snapshot must have its shape (EMISMATCH
   * otherwise, and it stays ready); its RAM is read in (only the pages the snapshot holds), not
   * mapped. The runtime options are the ones given to Machine.prepare(): none may be given here.
   */
  prepared?: PreparedMachine;
}

/** Where a prepared machine stands: waiting for its restore, held by one, used by one, or closed unused. */
export type PreparedMachineState = 'ready' | 'restoring' | 'used' | 'closed';

/**
 * A machine built ahead of a restore (Machine.prepare()): its VM, memory slot, in-kernel
 * interrupt controllers and PIT, devices and vCPUs (each created on its thread) exist, waiting
 * for a snapshot of its shape. `Machine.restore(path, { prepared })` then only reads the snapshot
 * and puts the guest's state and RAM in, and resolves with the machine (created, not yet
 * started). One restore uses it; a snapshot of another shape is refused (EMISMATCH) and leaves it
 * ready.
 */
export interface PreparedMachine {
  /** What it was built as (RAM size, vCPUs, irqchip, devices): a snapshot to restore into it must match. */
  readonly shape: MachineShape;
  /** 'ready' until a restore takes it ('restoring' while that restore checks the snapshot, then 'used'), or close() ('closed'). */
  readonly state: PreparedMachineState;
  /**
   * Frees everything an unused prepared machine holds (VM, RAM, disk images, vCPU threads, which
   * go back to their pool) and resolves once it has. Once a restore has used it, the machine is
   * the restore's and this does nothing; while a restore is checking a snapshot against it, it
   * is closed if that restore gives it back (the snapshot did not fit).
   */
  close(): Promise<void>;
}

/** Machine.prepare()'s options: the restored machine's runtime options, given ahead. */
export interface PrepareConfig extends MachineRuntimeConfig {
  /** Aborting it gives up (ABORT_ERR); a machine built meanwhile is stopped. */
  signal?: AbortSignal;
}

export interface IncomingConfig extends MachineRuntimeConfig {
  /** If given, the incoming stream must match it; by default the stream says. */
  memoryBytes?: number;
  vcpus?: number;
  /** Required for tcp: the secret the source was given too. */
  token?: string;
  /** Give up if no migration arrives, or the stream stalls, this long. Default: wait forever for it, 10 s per stall. */
  timeoutMs?: number;
  /** Called once listening, with the address (the real port for tcp port 0). */
  onListening?: (address: string) => void;
  /** With memoryBytes and vcpus, the machine is built before the stream arrives: whether it has the in-kernel irqchip (default: yes). */
  irqchip?: boolean;
  /**
   * Aborting it stops listening, or stops the transfer and tells the source why (ABORT_ERR); the
   * machine built for the guest is stopped. It counts until the guest runs here.
   */
  signal?: AbortSignal;
  /**
   * Post-copy: after the connection broke, how long the guest waits paused here for the source to
   * reconnect before receiveMachine() rejects (EPOSTCOPY, the paused machine on the error).
   * Default: wait for ever, as QEMU does.
   */
  postcopyRecoveryMs?: number;
  /**
   * Post-copy: called once the guest runs here, before its every page has arrived (receiveMachine()
   * resolves only once they have). Do not read or write the machine's memory from this thread
   * before then: an access to a missing page would wait for ever on the thread that serves it.
   */
  onPostcopy?: (info: { machine: Machine; missingPages: number }) => void;
}
