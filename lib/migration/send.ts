// The source side of a live migration (pre-copy): send all RAM while the guest runs, then what it
// dirtied, round after round, until the rest fits in the downtime budget; then pause, send the
// rest and the machine's state, and wait for the destination to say the guest runs there. Any
// failure before the stream's End has gone out resumes the guest here: nothing is lost. After
// that, only the destination's Error does: without its word the guest stays paused
// (EUNCONFIRMED), as it may run there.
import { closeSync } from 'node:fs';
import type { Socket } from 'node:net';
import { dupSocket } from '../kvm/host.js';
import { PAGE_SIZE } from '../kvm/constants.js';
import type { GuestMemory } from '../kvm/memory.js';
import type { DirtyTracker } from '../vmm/dirty-tracker.js';
import type { DeviceStatesAhead } from '../vmm/devices.js';
import type { StateWriteOut, StateWrittenOut } from '../vmm/types.js';
import { machineInternals, type CpuState, type DeviceStates, type Machine, type MachineShape, type MachineState, type RawVcpuState } from '../vmm/machine.js';
import { pageCountOf, populatedPageRanges, unionRanges } from '../vmm/page-ranges.js';
import { argTypeError, argValueError, outOfRangeError } from '../kvm/errors.js';
import { MigrationError, MigrationErrorCode as Code, abortPromise, checkSignal, throwIfAborted } from './errors.js';
import { SectionType, encodeEnd, encodeErrorSection, encodeHeader, encodeSection, encodeSync, newStreamId } from './format.js';
import { newMigrationStats } from './stats.js';
import { MAX_BATCH_PAGES, MAX_BATCH_SECTION_BYTES, encodeLivePageBatch, encodePageBatch } from './pages.js';
import { migrateMachineLocally } from './local.js';
import { PeerReplies } from './peer-replies.js';
import { decodePageRanges, encodePageRanges } from './postcopy-ranges.js';
import { DEFAULT_POSTCOPY_RECOVERY_MS, newPostcopyStats, runPostcopySource } from './postcopy-source.js';
import { enlargeSocketBuffers, socketFd } from './socket-buffers.js';
import { DeviceStatesSentAhead, FinalConfigSections, encodeConfigSection, encodeCpuState, encodeDeviceStateSection, encodeMachineState, rehearseStateEncoding, warmUpStateEncoding } from './state-sections.js';
import { destinationReadsDeviceStateAhead, destinationReadsLivePages } from './handshake.js';
import { connectForMigration, parseMigrationAddress } from './transport.js';
import { markPhase, resetPhases } from '../vmm/phase-timing.js';
import { SectionBufferPool, queueChunks, withStallTimeout } from './writers.js';
import { AutoConverge, checkAutoConverge, type CheckedAutoConverge, type ThrottleControl } from './auto-converge.js';
import type { DirtyLogMode, MigrateOptions, MigrationPhase, MigrationStats, PageRange, PostcopyMode } from './types.js';

export const DEFAULT_DOWNTIME_BUDGET_MS = 50;
export const DEFAULT_MAX_ITERATIONS = 30;
export const DEFAULT_MAX_PRECOPY_MS = 60_000;
export const DEFAULT_MIGRATION_TIMEOUT_MS = 10_000;

/**
 * How long a migration's source tries to take its disk images back after a failure: a
 * destination on this host that failed lets go of them as it says so, or as its process ends.
 */
const DISK_RETAKE_MS = 2000;
/** Who has the machine's dirty tracker during a migration. */
const MIGRATION = 'migration';

/**
 * Live-migrates the running guest to a destination waiting with receiveMachine() (or
 * `node-kvm run --incoming`). On success the machine ends with exit reason 'migrated'; on any
 * failure, and on an abort through `options.signal` before the guest's last state has gone out,
 * the guest keeps running here and the promise rejects with what happened. The machine emits
 * 'progress' with the statistics whenever `options.onProgress` is called.
 */
export async function migrateMachine(machine: Machine, address: string, options: MigrateOptions = {}): Promise<MigrationStats> {
  if (typeof address !== 'string') throw argTypeError('address must be a string such as tcp:HOST:PORT or unix:PATH');
  if (typeof options !== 'object' || options === null) throw argTypeError('options must be an object');
  if (options.local !== undefined && typeof options.local !== 'boolean') throw argTypeError('local must be a boolean');
  // A post-copy source held paused: its guest may run at the destination, so it may not move again.
  const held = machineInternals(machine).resumeRefusal;
  if (held !== null) throw new MigrationError(Code.MachineState, `${held}; nor can it migrate again`, { phase: 'setup' });
  if (options.local) {
    // Nothing is copied, so there is nothing to converge or to fetch later.
    if (options.postcopy) throw argValueError('local and postcopy exclude each other: a local migration copies no memory');
    if (options.autoConverge) throw argValueError('local and autoConverge exclude each other: a local migration copies no memory');
    return migrateMachineLocally(machine, address, options);
  }
  const internals = machineInternals(machine);
  return internals.exclusive('migration', async () => {
    const state = machine.state;
    if (state !== 'running' && state !== 'paused') throw new MigrationError(Code.MachineState, `machine is ${state}, not running`, { phase: 'setup' });
    let pausedVcpuStates: RawVcpuState[] | null = null;
    let writtenOut: StateWrittenOut | null = null;
    let warmedUp: Promise<void> = Promise.resolve();
    let warmState: MachineState | null = null;
    const hasDevices = internals.virtioDeviceCount > 0;
    const onProgress = options.onProgress;
    if (onProgress !== undefined && typeof onProgress !== 'function') throw argTypeError('onProgress must be a function');
    const reporting: MigrateOptions = {
      ...options,
      onProgress: (progress) => {
        try {
          onProgress?.(progress);
        } finally {
          machine.emit('progress', { ...progress });
        }
      },
    };
    const stats = await sendMigration(address, reporting, {
      memory: machine.memory,
      memoryBytes: machine.memoryBytes,
      vcpuCount: machine.vcpuCount,
      dirtyLogMode: machine.dirtyLogMode,
      shape: machine.shape,
      warmUp: () => {
        // The final save and its encoding, inside the downtime, then run warm code.
        warmedUp = warmUpStateEncoding(internals.warmUpSave()).then((state) => void (warmState = state));
      },
      rehearseStop: () => {
        if (warmState) rehearseStateEncoding(warmState);
      },
      startTracking: () => internals.startDirtyTracking(MIGRATION),
      // Not for long: a vCPU halted without an irqchip answers the warm-up only after 100 ms.
      beforeStop: () => Promise.race([warmedUp, new Promise<void>((resolve) => setTimeout(resolve, WARM_UP_WAIT_MS).unref())]),
      stopTracking: () => {
        if (internals.dirtyTrackingOwner === MIGRATION) internals.stopDirtyTracking();
      },
      pause: async (writeOut) => {
        writtenOut = null;
        if (machine.state !== 'running') return false;
        // Without virtio devices, the vCPUs save their state as they stop. With them, only once
        // the devices have paused too: a request completing meanwhile raises an interrupt, which
        // belongs in the vCPUs' saved state.
        pausedVcpuStates = await internals.pause(!hasDevices, writeOut ?? undefined, (out) => void (writtenOut = out));
        return true;
      },
      cpuStateWrittenOut: () => writtenOut,
      resume: () => {
        pausedVcpuStates = null;
        if (machine.state === 'paused') machine.resume();
      },
      saveState: () => internals.saveState(pausedVcpuStates),
      saveCpuState: () => internals.saveCpuState(pausedVcpuStates),
      saveDeviceState: () => internals.saveDeviceState(),
      saveDeviceStateAhead: () => internals.saveDeviceStateAhead(),
      releaseDisks: () => internals.unlockDisks(),
      retakeDisks: () => internals.lockDisksWithin(DISK_RETAKE_MS),
      throttle: internals.vcpuThrottle,
      holdPaused: (reason) => internals.refuseResume(reason),
    });
    internals.end({ reason: 'migrated' });
    return stats;
  });
}

/** What a machine lends a migration. */
export interface MigrationSource {
  readonly memory: GuestMemory;
  readonly memoryBytes: number;
  readonly vcpuCount: number;
  readonly dirtyLogMode: DirtyLogMode;
  readonly shape: MachineShape;
  startTracking(): DirtyTracker;
  stopTracking(): void;
  /** Starts warming up what runs inside the downtime (called once the first pages are queued). */
  warmUp?(): void;
  /** Resolves once what runs inside the downtime is warm (started by warmUp()); never rejects. */
  beforeStop?(): Promise<void>;
  /** Runs the last state's encoding once more, just before the pause (while the destination answers the Sync). */
  rehearseStop?(): void;
  /**
   * Pauses if running; true if it did (a guest paused before the migration stays paused if it
   * fails). `writeOut`: where a one-vCPU machine's pause writes the VM's and the vCPU's state the
   * moment the vCPU has parked (see cpuStateWrittenOut()).
   */
  pause(writeOut?: StateWriteOut | null): Promise<boolean>;
  /** What the last pause() wrote out (StateWriteOut), null if it wrote nothing (a machine of more vCPUs, with devices). */
  cpuStateWrittenOut?(): StateWrittenOut | null;
  /** Resumes if paused. */
  resume(): void;
  saveState(): Promise<MachineState>;
  /** saveState() in two parts: all but the devices' state, then the devices' (a copying migration sends each as it has it). */
  saveCpuState(): Promise<CpuState>;
  saveDeviceState(): DeviceStates;
  /**
   * The devices' state but the virtio ones', the guest running on: sent ahead of the pause to a
   * destination that reads it (SectionType.DeviceStateAhead).
   */
  saveDeviceStateAhead?(): DeviceStatesAhead & Pick<DeviceStates, 'serial' | 'postCode'>;
  /**
   * Lets go of the disk images' locks (the guest is paused and its disks flushed), so that a
   * destination on the same host can take them before it runs the guest.
   */
  releaseDisks(): void;
  /** Takes the locks back after a failure; rejects if another machine holds an image. */
  retakeDisks(): Promise<void>;
  /** The vCPU throttle, for auto-converge (a source without one refuses autoConverge). */
  readonly throttle?: ThrottleControl;
  /** Post-copy: refuses resume() with `reason` from now on (null: lifts it). */
  holdPaused?(reason: string | null): void;
}

interface CheckedOptions {
  token: string | undefined;
  downtimeBudgetMs: number;
  maxIterations: number;
  maxPrecopyMs: number;
  finishAnyway: boolean;
  timeoutMs: number;
  onProgress: ((progress: MigrationStats) => void) | undefined;
  signal: AbortSignal | undefined;
  autoConverge: CheckedAutoConverge | null;
  postcopy: PostcopyMode;
  postcopyRecoveryMs: number;
}

function checkOptions(options: MigrateOptions): CheckedOptions {
  const positive = (value: number | undefined, name: string, fallback: number, integer = false): number => {
    if (value === undefined) return fallback;
    if (typeof value !== 'number' || !(value > 0) || !Number.isFinite(value) || (integer && !Number.isInteger(value))) {
      throw outOfRangeError(`${name} must be a positive ${integer ? 'integer' : 'number'}, got ${String(value)}`);
    }
    return value;
  };
  if (options.token !== undefined && typeof options.token !== 'string') throw argTypeError('token must be a string');
  if (options.onProgress !== undefined && typeof options.onProgress !== 'function') throw argTypeError('onProgress must be a function');
  const onNonConvergence = options.onNonConvergence ?? 'finish';
  if (onNonConvergence !== 'finish' && onNonConvergence !== 'abort') {
    throw argValueError(`onNonConvergence must be 'finish' or 'abort', got ${String(onNonConvergence)}`);
  }
  const postcopy = options.postcopy ?? false;
  if (postcopy !== true && postcopy !== false && postcopy !== 'after-rounds') {
    throw argValueError(`postcopy must be true, false or 'after-rounds', got ${typeof postcopy === 'string' ? `'${postcopy}'` : String(postcopy)}`);
  }
  return {
    postcopy,
    postcopyRecoveryMs: positive(options.postcopyRecoveryMs, 'postcopyRecoveryMs', DEFAULT_POSTCOPY_RECOVERY_MS),
    token: options.token,
    downtimeBudgetMs: positive(options.downtimeBudgetMs, 'downtimeBudgetMs', DEFAULT_DOWNTIME_BUDGET_MS),
    maxIterations: positive(options.maxIterations, 'maxIterations', DEFAULT_MAX_ITERATIONS, true),
    maxPrecopyMs: positive(options.maxPrecopyMs, 'maxPrecopyMs', DEFAULT_MAX_PRECOPY_MS),
    finishAnyway: onNonConvergence === 'finish',
    timeoutMs: positive(options.timeoutMs, 'timeoutMs', DEFAULT_MIGRATION_TIMEOUT_MS),
    onProgress: options.onProgress,
    signal: checkSignal(options.signal, 'options.signal'),
    autoConverge: checkAutoConverge(options.autoConverge),
  };
}

export async function sendMigration(addressText: string, options: MigrateOptions, source: MigrationSource): Promise<MigrationStats> {
  const address = parseMigrationAddress(addressText);
  const opts = checkOptions(options);
  const started = performance.now();
  resetPhases();
  markPhase('source: migration started');
  const stats = newMigrationStats(source.memoryBytes, source.dirtyLogMode);
  if (opts.autoConverge && !source.throttle) throw argValueError('autoConverge: this migration source cannot throttle its vCPUs');
  const what = `migration to ${addressText}`;
  throwIfAborted(opts.signal, what, 'setup');
  // An abort counts until the guest's last state goes out: from then on, whether the guest runs
  // there is the destination's to say (giving up here could leave it running on both sides).
  const aborted = abortPromise(opts.signal, what, () => stats.phase);
  let abortable = true;
  const unlessAborted = <T>(work: Promise<T>): Promise<T> => (abortable && opts.signal ? Promise.race([work, aborted.promise]) : work);
  const progress = (phase: MigrationPhase) => {
    stats.phase = phase;
    stats.totalTimeMs = performance.now() - started;
    autoConverge?.report(stats);
    try {
      opts.onProgress?.({ ...stats });
    } catch {
      // A failing progress callback must not fail the migration.
    }
  };

  // From here on the catch below ends the throttle.
  const autoConverge = opts.autoConverge && source.throttle ? new AutoConverge(opts.autoConverge, source.throttle) : null;
  let socket: Socket | undefined;
  // The copy of the socket's fd the pause writes the last state into (see StateWriteOut).
  let streamFdCopy = -1;
  const closeStreamFdCopy = () => {
    if (streamFdCopy >= 0) closeSync(streamFdCopy);
    streamFdCopy = -1;
  };
  let peer: PeerReplies | undefined;
  let paused = false;
  let pausedAt = 0;
  let disksReleased = false;
  let postcopyStarted = false;
  // Once the kernel has taken the End, the destination may have the whole stream and run the
  // guest: from then on only its word (End: it runs; Error: it never will) settles how this ends.
  let endOut = false;
  const endHandedOver = () => void (endOut = true);
  const startTracking = (): DirtyTracker => {
    const started = source.startTracking();
    // The first pass reads every page that may hold data after this point: what the VMM marked
    // before (the loader's writes, say) must not come round again in the next harvest.
    started.harvest();
    markPhase('source: dirty tracking on');
    return started;
  };
  let trackingEarly: DirtyTracker | undefined;
  // The first pass: every page that may be non-zero (looked for once tracking is on).
  let populatedEarly: PageRange[] | undefined;
  try {
    socket = await connectForMigration(address, {
      token: opts.token, timeoutMs: opts.timeoutMs, signal: opts.signal,
      // Off the migration's path, while the connection is made and the destination greets: the
      // ioctls that start tracking (0.3-3 ms); while it checks the hello: the scan for the pages
      // of the first pass (the kernel walks every populated page, 0.3-1 ms per 64 MiB here).
      // Nothing of the guest's is sent before the destination has proved itself all the same.
      whileConnecting: () => void (trackingEarly = startTracking()),
      whileVerified: () => void (populatedEarly = populatedPageRanges(source.memory)),
    });
    socket.on('error', () => {}); // failures surface through the reads and writes below
    markPhase('source: connected');
    enlargeSocketBuffers(socket);
    const connection = socket;
    const replies = new PeerReplies(connection);
    peer = replies;
    const sectionBuffers = new SectionBufferPool();
    const send = (chunks: Uint8Array[], handedOver?: () => void) =>
      unlessAborted(replies.race(withStallTimeout(connection, queueChunks(connection, chunks, sectionBuffers, handedOver), opts.timeoutMs)));

    const streamId = newStreamId();
    await send([
      encodeHeader({ kind: 'migration', memoryBytes: source.memoryBytes, vcpuCount: source.vcpuCount, streamId }),
      encodeConfigSection({ machine: source.shape }),
    ]);
    // Pre-copy starts without waiting for the answer, as QEMU's does: one round trip less. A
    // destination that refuses says so (Error) and closes, which cuts the writes short; the
    // answer is checked before the guest pauses.
    const accepted = unlessAborted(replies.expectAccept(opts.timeoutMs));
    accepted.then(() => markPhase('source: accepted'), () => {});
    const tracker = trackingEarly ?? startTracking();
    stats.setupTimeMs = performance.now() - started;
    progress('setup');

    // The first pass: every page that may be non-zero; the destination's RAM starts zeroed.
    let ranges: PageRange[] = populatedEarly ?? populatedPageRanges(source.memory);
    // Pages go from guest RAM itself to a destination that reads live Pages sections (no copy
    // into a section buffer), unless post-copy may follow: a page the guest writes as it goes out
    // is owed until it comes again, and post-copy would have to take that over. The socket's
    // queue then holds views of guest RAM: the mapping is kept until the socket has closed,
    // whatever becomes of the machine.
    let live = false;
    // The pages the destination asks for again (a live section's data failed its CRC there): they
    // go with the next round's, or the last pages.
    let askedAgain: PageRange[] = [];
    const withAskedAgain = (harvested: PageRange[]): PageRange[] => {
      if (askedAgain.length === 0) return harvested;
      const all = unionRanges(harvested, askedAgain);
      askedAgain = [];
      return all;
    };
    if (destinationReadsLivePages(connection) && opts.postcopy === false && !connection.closed) {
      connection.once('close', source.memory.retainMapping());
      live = true;
      const memoryPages = source.memoryBytes / PAGE_SIZE;
      replies.onPageRequest((section) => askedAgain.push(...decodePageRanges(section.payload, memoryPages, 'a PageRequest section')));
    }
    const pages = new PageSender(source.memory.bytes(), stats, send, sectionBuffers, live);
    let destinationZeroed = true;
    const sendingStarted = performance.now();
    // The warm-up for the stop (see MigrationSource.warmUp()) starts once the first pages are
    // queued: before, its save on the vCPU thread took the CPU the handshake and the first pages
    // need (with one CPU for a source, 1 ms of the set-up).
    let warmUpStarted = source.warmUp === undefined;
    const startWarmUp = () => {
      if (warmUpStarted) return;
      warmUpStarted = true;
      source.warmUp!();
    };
    const sendPages = (batch: PageRange[]) => pages.send(batch, destinationZeroed, () => {
      if (pages.bytesSent >= WARM_UP_AFTER_BYTES) startWarmUp();
    });

    const precopyStarted = performance.now();
    // Post-copy at once: no pre-copy pass; post-copy after the rounds: where they do not converge.
    let postcopyNow = opts.postcopy === true;
    while (!postcopyNow) {
      const roundStarted = performance.now();
      const bytesBeforeRound = pages.bytesSent;
      await sendPages(ranges);
      markPhase('source: pre-copy round sent');
      destinationZeroed = false;
      stats.iterations++;
      ranges = withAskedAgain(tracker.harvest());
      const roundMs = Math.max(performance.now() - roundStarted, 0.001);
      stats.remainingPages = pageCountOf(ranges);
      stats.dirtyPagesRate = (stats.remainingPages * 1000) / roundMs;
      const elapsedSendingMs = Math.max(performance.now() - sendingStarted, 0.001);
      stats.throughputBytesPerSec = (pages.bytesSent * 1000) / elapsedSendingMs;
      // Until a round has moved enough data to measure, assume the loopback-class rate of 1 GiB/s.
      const bytesPerMs = pages.bytesSent >= 4 * 1024 * 1024 ? pages.bytesSent / elapsedSendingMs : 1024 ** 3 / 1000;
      stats.expectedDowntimeMs = (stats.remainingPages * PAGE_SIZE) / bytesPerMs;
      progress('precopy');
      if (stats.expectedDowntimeMs <= opts.downtimeBudgetMs) break;
      autoConverge?.afterRound(pages.bytesSent - bytesBeforeRound, stats.remainingPages * PAGE_SIZE);
      if (stats.iterations >= opts.maxIterations || performance.now() - precopyStarted >= opts.maxPrecopyMs) {
        if (opts.postcopy === 'after-rounds') {
          postcopyNow = true;
          break;
        }
        if (opts.finishAnyway) break;
        throw new MigrationError(
          Code.NotConverged,
          `the guest dirties memory faster than it can be sent: ${stats.remainingPages} pages left after ${stats.iterations} rounds ` +
            `(expected downtime ${stats.expectedDowntimeMs.toFixed(1)} ms, budget ${opts.downtimeBudgetMs} ms); migration aborted, the guest runs on here`,
          { phase: 'precopy' },
        );
      }
    }

    // Let the destination catch up with what is queued first: a backlog drained after the pause
    // would count as downtime. (Post-copy at once has queued nothing.)
    startWarmUp();
    const warm = source.beforeStop?.();
    // The devices' state goes ahead (before the Sync, which the destination answers once it has
    // put it on its machine): at the end only the devices that changed meanwhile go again.
    let devicesAhead: DeviceStatesSentAhead | null = null;
    const finalConfigs = new FinalConfigSections(source.shape);
    if (opts.postcopy !== true) {
      if (source.saveDeviceStateAhead && destinationReadsDeviceStateAhead(connection)) devicesAhead = new DeviceStatesSentAhead(source.saveDeviceStateAhead());
      await send(devicesAhead ? [devicesAhead.section, encodeSync()] : [encodeSync()]);
      await accepted;
      await warm;
      source.rehearseStop?.();
      // And the devices' end of it: compared once with what went ahead (the guest running on,
      // the answer thrown away), so that the comparison is compiled before the pause.
      try {
        if (devicesAhead && source.saveDeviceStateAhead) devicesAhead.changed(source.saveDeviceStateAhead());
      } catch {
        // Only a rehearsal: the pause says what is wrong.
      }
      await unlessAborted(replies.expectSync(opts.timeoutMs));
    } else {
      await accepted;
      await warm;
    }
    markPhase('source: synced');
    ranges = withAskedAgain(unionRanges(ranges, tracker.harvest()));

    // Stop and copy: nothing changes memory from here on.
    // Not raced with the abort: a pause under way must be known to be undone.
    // The CPU part of the last state (see encodeCpuState()) goes out inside the pause, the moment
    // the vCPU has parked, ahead of the last pages, to a destination of this build (which takes
    // pages up to the End): it checks and applies it while this side saves the devices.
    // (Only with nothing queued on the socket; into a copy of its fd, so that a connection torn
    // down meanwhile cannot leave the number to another file.)
    const prefix = finalConfigs.get({ shape: source.shape, running: true });
    const fd = postcopyNow || !devicesAhead || !prefix || connection.writableLength > 0 ? -1 : socketFd(connection);
    streamFdCopy = fd >= 0 ? dupSocket(fd) : -1;
    const writeOut = streamFdCopy >= 0 && prefix ? { fd: streamFdCopy, prefix, vmRecordType: SectionType.VmState, vcpuRecordType: SectionType.VcpuState } : null;
    pausedAt = performance.now();
    markPhase('source: pause asked');
    paused = await source.pause(writeOut);
    markPhase('source: paused, vCPU states saved');
    autoConverge?.stop();
    throwIfAborted(opts.signal, what, 'stop-copy');
    // To a destination of this build, the state goes before the last pages: they are harvested
    // (and the progress told) once it has gone. Others have them first.
    const pagesFirst = devicesAhead === null;
    const harvestLastPages = () => {
      ranges = withAskedAgain(unionRanges(ranges, tracker.harvest()));
      markPhase('source: last pages harvested');
    };
    stats.phase = 'stop-copy';
    if (pagesFirst || postcopyNow) {
      progress('stop-copy');
      harvestLastPages();
    }
    if (postcopyNow) {
      // What the destination lacks: every page not sent yet (all that may hold data, at once), and
      // every page written since it was sent.
      const missing = opts.postcopy === true ? unionRanges(populatedPageRanges(source.memory), ranges) : ranges;
      const state = { ...(await source.saveState()), running: paused };
      throwIfAborted(opts.signal, what, 'stop-copy');
      abortable = false;
      source.releaseDisks();
      disksReleased = true;
      // From this write on the guest may run there: this side never resumes it again.
      postcopyStarted = true;
      source.holdPaused?.(`post-copy migration to ${addressText} has started: the guest may run at the destination, so it cannot resume here ` +
        '(it would run in two places); stop() gives this copy up');
      stats.postcopy = newPostcopyStats(pageCountOf(missing));
      stats.remainingPages = stats.postcopy.missingPages;
      await send([...encodeMachineState(state), encodeSection(SectionType.Postcopy, encodePageRanges(missing))]);
      try {
        await replies.expectPostcopy(opts.timeoutMs);
      } catch (error) {
        if (error instanceof MigrationError && error.code === Code.Refused) {
          // It refused before running the guest (it never refuses after): the guest runs on here.
          postcopyStarted = false;
          source.holdPaused?.(null);
          throw error;
        }
        // A break before the answer: the destination may run the guest; resume the transfer.
        connection.destroy();
      }
      stats.downtimeMs = performance.now() - pausedAt;
      progress('postcopy');
      await runPostcopySource(source.memory.bytes(), missing, { socket: connection, replies }, stats, {
        address, addressText, token: opts.token, timeoutMs: opts.timeoutMs, recoveryMs: opts.postcopyRecoveryMs,
        memoryBytes: source.memoryBytes, vcpuCount: source.vcpuCount, streamId, onProgress: () => progress('postcopy'),
      });
      stats.remainingPages = 0;
      stats.expectedDowntimeMs = 0;
      stats.throughputBytesPerSec = (stats.bytesTransferred * 1000) / Math.max(performance.now() - sendingStarted, 0.001);
      source.stopTracking();
      progress('completed');
      return { ...stats };
    }
    const written = paused ? source.cpuStateWrittenOut?.() ?? null : null;
    // What the socket did not take of it goes first, before anything else.
    let cpuSent = written && written.writtenBytes < written.totalBytes ? send([written.bytes.subarray(written.writtenBytes)]) : Promise.resolve();
    cpuSent.catch(() => {});
    // To a destination of this build (it took the devices' state ahead), the devices' part goes
    // before the last pages, End after them (with few pages, in one write; with many, first: it
    // applies the devices while they come). Another has the pages first, then the state and
    // End, as it always had.
    if (pagesFirst) {
      await sendPages(ranges);
      markPhase('source: last pages sent');
    }
    // A guest its owner had paused stays paused at the destination.
    const cpu = written ? null : { ...(await source.saveCpuState()), running: paused };
    if (cpu) markPhase('source: VM and vCPU state saved');
    throwIfAborted(opts.signal, what, 'stop-copy');
    abortable = false;
    // The destination locks the images once it has the whole stream, before the guest runs there.
    source.releaseDisks();
    disksReleased = true;
    if (cpu) {
      // In two writes (queued at once, in order): the destination checks and applies the VM's
      // and the vCPUs' state while this side saves and encodes the devices'.
      cpuSent = send([encodeCpuState(cpu, finalConfigs)]);
      cpuSent.catch(() => {});
      markPhase('source: VM and vCPU state written');
    }
    const devices = source.saveDeviceState();
    const devicesPart = encodeDeviceStateSection(devicesAhead ? devicesAhead.changed(devices) : devices);
    markPhase('source: device state saved and encoded');
    if (pagesFirst) {
      await Promise.all([cpuSent, send([devicesPart, encodeEnd()], endHandedOver)]);
    } else {
      harvestLastPages();
      if (pageCountOf(ranges) <= MAX_BATCH_PAGES) {
        // Few pages left (as a rule): the devices' part, they and End in one write (each write
        // costs the source 0.1-0.2 ms here, the receive side of loopback or a veth pair included,
        // more than the destination's applying the devices once they are in: measured in
        // bench/README.md); the progress is told once they are out.
        const lastPages = pages.encode(ranges, destinationZeroed);
        await Promise.all([cpuSent, send([devicesPart, ...lastPages, encodeEnd()], endHandedOver)]);
        markPhase('source: last pages sent');
        progress('stop-copy');
      } else {
        // The devices' part first: the destination checks and applies it while the pages come.
        const devicesSent = send([devicesPart]);
        devicesSent.catch(() => {});
        progress('stop-copy');
        await sendPages(ranges);
        markPhase('source: last pages sent');
        await Promise.all([cpuSent, devicesSent, send([encodeEnd()], endHandedOver)]);
      }
    }
    markPhase('source: state written to the socket');
    closeStreamFdCopy();
    await replies.expectResumed(opts.timeoutMs);
    stats.downtimeMs = performance.now() - pausedAt;
    markPhase('source: ack received');
    stats.remainingPages = 0;
    stats.expectedDowntimeMs = 0;
    stats.throughputBytesPerSec = (pages.bytesSent * 1000) / Math.max(performance.now() - sendingStarted, 0.001);
    connection.end();
    source.stopTracking();
    progress('completed');
    return { ...stats };
  } catch (caught) {
    closeStreamFdCopy();
    autoConverge?.stop();
    const phase = stats.phase;
    if (postcopyStarted) {
      // The destination may run the guest: it stays paused here, with its memory, for good.
      socket?.destroy();
      source.stopTracking();
      progress('failed');
      throw caught instanceof MigrationError && caught.code === Code.PostcopyBroken
        ? caught
        : new MigrationError(Code.PostcopyBroken, `post-copy to ${addressText} failed: ${(caught as Error)?.message ?? String(caught)}; ` +
          'the guest may run at the destination, so it cannot resume here: it stays paused here with its memory', { phase: 'postcopy', cause: caught });
    }
    // A write that failed because the destination gave up: its reason says more than EPIPE.
    const refusal = peer ? await peer.refusal(250) : undefined;
    // The whole stream went out, and the destination said neither that the guest runs there nor
    // that it failed (the connection broke, or its answer did not come in time): it may run the
    // guest. Resuming here could run it in two places; the guest stays paused, its owner decides.
    const unconfirmed = endOut && !refusal;
    let error = refusal
      ? new MigrationError(Code.Refused, `migration failed (${phase}): the destination refused: ${refusal}; the guest runs on here`, { phase, cause: caught })
      : unconfirmed
        ? new MigrationError(
          Code.Unconfirmed,
          `migration to ${addressText}: the destination took the whole stream but neither confirmed that the guest runs there nor said that it failed ` +
            `(${(caught as Error)?.message ?? String(caught)}); it may run the guest, so the guest stays paused here with its state: resume it only once you know it does not run there`,
          { phase, cause: caught },
        )
        : caught;
    source.stopTracking();
    let disksLost: Error | null = null;
    if (disksReleased) {
      try {
        await source.retakeDisks();
      } catch (retakeError) {
        disksLost = retakeError as Error;
      }
    }
    if (unconfirmed) {
      // Paused either way: a destination holding the images most likely runs the guest.
      if (disksLost) error = new MigrationError(Code.Unconfirmed, `${(error as Error).message} (${disksLost.message})`, { phase, cause: caught });
    } else if (disksLost) {
      // Another machine writes an image now: running the guest on here would corrupt it.
      const base = asMigrationError(error, phase);
      error = new MigrationError(
        Code.DiskLocked,
        `${base.message.replace(/; the guest runs on here$/, '')}; the guest stays paused here: ${disksLost.message}`,
        { phase, cause: base },
      );
    } else if (paused) {
      source.resume();
    }
    if (socket && !socket.destroyed) {
      // Tell the destination why, if it still listens, then drop the connection.
      const connection = socket;
      connection.end(encodeErrorSection((error as Error).message));
      setTimeout(() => connection.destroy(), 1000).unref();
    }
    progress('failed');
    throw asMigrationError(error, phase);
  } finally {
    aborted.dispose();
  }
}

/**
 * Sends pages in batches of one Pages section each, counting them into the statistics. A class
 * of this module, not a closure made by each migration: V8 keeps the optimized code of its
 * methods from one migration to the next (a closure was optimized anew for each migration, on
 * the core the destination needs).
 */
export class PageSender {
  readonly #ram: Uint8Array;
  readonly #stats: MigrationStats;
  readonly #write: (chunks: Uint8Array[]) => Promise<void>;
  readonly #buffers: SectionBufferPool;
  readonly #sentOnce: Uint8Array;
  /** Whether send() may make live sections (see sendMigration()). */
  readonly #live: boolean;
  /** Bytes of Pages sections sent so far. */
  bytesSent = 0;

  constructor(ram: Uint8Array, stats: MigrationStats, write: (chunks: Uint8Array[]) => Promise<void>, buffers: SectionBufferPool, live = false) {
    this.#ram = ram;
    this.#live = live;
    this.#stats = stats;
    this.#write = write;
    this.#buffers = buffers;
    this.#sentOnce = new Uint8Array(ram.length / PAGE_SIZE);
  }

  /**
   * `pages`, in batches, so that the destination takes in one while the next is encoded;
   * `queued` is called as each batch has been queued. As live sections where this sender may
   * make them (the views of guest RAM they hold stay mapped until written: see sendMigration()).
   */
  async send(pages: PageRange[], destinationZeroed: boolean, queued?: () => void): Promise<void> {
    for (const batch of batchRanges(pages, BATCH_PAGES)) {
      const chunks = this.encode(batch, destinationZeroed);
      if (chunks.length > 0) await this.#write(chunks);
      queued?.();
    }
  }

  /**
   * `pages` (at most one batch) as one Pages section, counted as sent: for a caller that writes it
   * with other sections. Its chunks in order, none if there is nothing to send: a buffer of the
   * pool, which the write gives back; or, live, the header and table, views of guest RAM and the
   * CRCs (no section buffer at all, which the stop would otherwise allocate where no pre-copy
   * round used one).
   */
  encode(pages: PageRange[], destinationZeroed: boolean): Uint8Array[] {
    if (this.#live) {
      const encoded = encodeLivePageBatch(this.#ram, pages, destinationZeroed);
      this.#count(pages, encoded.bytes, encoded.pagesSent, encoded.zeroPages);
      return encoded.chunks;
    }
    const { section, pagesSent, zeroPages } = encodePageBatch(this.#ram, pages, destinationZeroed, this.#buffers.allocate(MAX_BATCH_SECTION_BYTES));
    this.#count(pages, section.length, pagesSent, zeroPages);
    if (section.length > 0) return [section];
    this.#buffers.release(section);
    return [];
  }

  #count(pages: PageRange[], bytes: number, pagesSent: number, zeroPages: number): void {
    const stats = this.#stats;
    this.#countResent(pages);
    stats.bytesTransferred += bytes;
    stats.pagesTransferred += pagesSent;
    stats.zeroPagesSkipped += zeroPages;
    this.bytesSent += bytes;
  }

  #countResent(batch: PageRange[]): void {
    const sentOnce = this.#sentOnce;
    for (const range of batch) {
      for (let page = range.firstPage; page < range.firstPage + range.pageCount; page++) {
        if (sentOnce[page]) this.#stats.pagesResent++;
        else sentOnce[page] = 1;
      }
    }
  }
}

/** Pages per batch of a round: 2 MiB, one Pages section. */
const BATCH_PAGES = MAX_BATCH_PAGES;

/** Splits sorted ranges into batches of at most `maxPages` pages (a range may be cut in two). */
export function* batchRanges(ranges: readonly PageRange[], maxPages: number): Generator<PageRange[]> {
  let batch: PageRange[] = [];
  let pages = 0;
  for (const range of ranges) {
    let firstPage = range.firstPage;
    let left = range.pageCount;
    while (left > 0) {
      const take = Math.min(left, maxPages - pages);
      batch.push({ firstPage, pageCount: take });
      pages += take;
      firstPage += take;
      left -= take;
      if (pages === maxPages) {
        yield batch;
        batch = [];
        pages = 0;
      }
    }
  }
  if (batch.length > 0) yield batch;
}

/** Pages queued before the warm-up for the stop starts (if the first round is not over sooner). */
const WARM_UP_AFTER_BYTES = 8 * 1024 * 1024;

/** How long the stop-copy waits for the warm-up at most. */
const WARM_UP_WAIT_MS = 20;

function asMigrationError(error: unknown, phase: MigrationPhase): MigrationError {
  // Already told as a migration's failure (with its phase): as it is.
  if (error instanceof MigrationError && error.phase !== undefined) return error;
  const message = (error as Error)?.message ?? String(error);
  const code = (error as { code?: unknown })?.code;
  return new MigrationError(typeof code === 'string' ? code : Code.Internal, `migration failed (${phase}): ${message}; the guest runs on here`, { phase, cause: error });
}

