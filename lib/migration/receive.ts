// The destination side of a live migration: accept one authenticated connection, check the
// stream against this host's expectations, write the pages into a fresh machine's RAM as they
// come, and only once the whole stream has arrived intact apply the state and run the guest.
import { writeSync } from 'node:fs';
import { Socket } from 'node:net';
import { PAGE_SIZE } from '../kvm/constants.js';
import { GuestMemory } from '../kvm/memory.js';
import { disksMismatch, logToStderr } from '../vmm/builder.js';
import { checkMemoryBytes, checkVcpus } from '../vmm/config.js';
import type { DeviceStatesAhead } from '../vmm/devices.js';
import { virtioMismatch } from '../vmm/virtio-devices.js';
import { buildMachine, machineInternals, type CpuState, type Machine, type MachineShape, type MachineState } from '../vmm/machine.js';
import { argTypeError } from '../kvm/errors.js';
import { spinRead } from '../kvm/host.js';
import { MigrationError, MigrationErrorCode as Code, abortError, abortPromise, abortable, checkSignal, throwIfAborted } from './errors.js';
import {
  SectionType, checkHeader, decodeErrorSection, encodeEnd, encodeErrorSection, encodeHeader, encodeSection, encodeSync,
} from './format.js';
import { SectionParser, type SectionParserTarget } from './section-parser.js';
import { warmUpPageStream } from './page-stream-warm-up.js';
import { applyDevicesAsAhead, rehearseRestore } from './warm-up.js';
import { SectionReader } from './section-reader.js';
import { enlargeSocketBuffers, reopenWithReadBuffer, socketFd } from './socket-buffers.js';
import { socketSource } from './sources.js';
import { StateSectionReader, checkDeviceStates, checkShape, cpuStateOf, decodeConfigSection, decodeDeviceStatesAhead, encodeConfigSection, encodeMachineState, mergeDeviceStates, warmUpStateCodec } from './state-sections.js';
import { writeChunks } from './writers.js';
import { markPhase, resetPhases } from '../vmm/phase-timing.js';
import { formatMigrationAddress, listenForMigration, parseMigrationAddress } from './transport.js';
import { DEFAULT_MIGRATION_TIMEOUT_MS } from './send.js';
import { PostcopyPages, decodeLacking, runPostcopyDestination } from './postcopy-destination.js';
import { encodePageRanges } from './postcopy-ranges.js';
import { receiveLocalMigration, type LocalHandover } from './local.js';
import type { IncomingConfig, PageRange } from './types.js';

/**
 * Waits for one migration at `address` ('tcp:HOST:PORT' or 'unix:PATH'), receives the guest,
 * and resolves with the machine running it here. Aborting `config.signal` stops listening, or
 * stops the transfer and tells the source why; the machine built for it is stopped (ABORT_ERR).
 */
export async function receiveMachine(address: string, config: IncomingConfig = {}): Promise<Machine> {
  if (typeof config !== 'object' || config === null) throw argTypeError('config must be an object');
  const signal = checkSignal(config.signal, 'config.signal');
  throwIfAborted(signal, `waiting for a migration on ${address}`);
  if (config.memoryBytes !== undefined) checkMemoryBytes(config.memoryBytes);
  if (config.vcpus !== undefined) checkVcpus(config.vcpus);
  // Refused connections are worth a line wherever the machine's warnings go.
  config = { ...config, log: config.log ?? logToStderr };
  const newMemory = (size: number) => {
    const memory = GuestMemory.create(size, { backing: 'memfd' });
    // The stream is parsed into guest RAM from JavaScript: its ArrayBuffer now, and with it the
    // garbage collection V8 makes for so much external memory, rather than during the transfer.
    void memory.buffer;
    return memory;
  };
  // With the shape known, build the machine while waiting (as QEMU's -incoming does): the
  // stream then finds it ready, which keeps VM creation out of the migration's time.
  let prebuilt: Promise<Machine> | null = null;
  if (config.memoryBytes !== undefined && config.vcpus !== undefined) {
    prebuilt = buildMachine({
      shape: { memoryBytes: config.memoryBytes, vcpus: config.vcpus, irqchip: config.irqchip ?? true },
      boot: null,
      memory: newMemory,
      runtime: config,
      incoming: true,
      signal,
    });
    prebuilt.catch(() => {});
    prebuilt = prebuilt.then(async (machine) => {
      await warmUp(machine);
      return machine;
    });
    prebuilt.catch(() => {});
    // Listen only once ready: a source that connects finds the machine waiting.
    await prebuilt.catch(() => null);
  }
  try {
    return await receiveMigration(address, config, async (shape, handover) => {
      checkMemoryBytes(shape.memoryBytes);
      checkVcpus(shape.vcpus);
      let machine: Machine | null = prebuilt ? await prebuilt.catch(() => null) : null;
      prebuilt = null;
      // A local migration brings its own RAM, disks and TAPs: the machine built ahead takes the RAM
      // in place of its own, but not the others (its threads have its own disks and TAPs open).
      const handsOverDevices = handover !== undefined && (handover.disks.length > 0 || handover.net.length > 0);
      if (machine && (handsOverDevices || machine.irqchip !== shape.irqchip || disksMismatch(shape.disks, machine.shape.disks) || virtioMismatch(shape, machine.shape))) {
        await machine.stop();
        machine = null;
      }
      if (machine && handover) {
        // Never run, so KVM has mapped none of its pages: from here on they are the source's.
        try {
          machine.memory.replaceWith(handover.memory);
        } catch (error) {
          await machine.stop();
          throw error;
        }
        handover.memory.close();
      }
      const builtAhead = machine !== null;
      machine ??= await abortable(buildMachine(handover
        ? { shape, boot: null, memory: () => handover.memory, runtime: localRuntime(config, shape, handover), savedDisks: shape.disks ?? [], incoming: true, signal }
        : { shape, boot: null, memory: newMemory, runtime: config, savedDisks: shape.disks ?? [], incoming: true, signal }), signal, `receiving a migration on ${address}`);
      if (handover && !builtAhead) await warmUp(machine);
      if (signal?.aborted) {
        // Aborted as the build resolved: the machine goes at once.
        await machine.stop();
        throw abortError(`receiving a migration on ${address}`, signal);
      }
      const target = machine;
      const internals = machineInternals(target);
      const rehearsal = rehearsalStates.get(target);
      // The same functions as the rehearsal calls, not wrappers of their own: V8 compiles a
      // function at its first call, which would then be inside the downtime.
      const start = (paused: boolean, onRunning?: (() => void) | null, rehearsing = false) => internals.start(paused, onRunning ?? null, rehearsing);
      const applyCpu = internals.applyCpuState;
      return {
        memory: target.memory,
        rehearse: rehearsal
          ? async () => {
            try {
              const state = warmUpStateCodec(rehearsal.state, rehearsal.sections);
              await applyCpu(state);
              applyDevicesAsAhead(internals, state);
              start(false, null, true);
            } catch {
              // Only a rehearsal: the real state says what is wrong.
            }
          }
          : undefined,
        applyCpu,
        apply: async (state: MachineState) => {
          // The source let go of the images before it sent its last state (see migrateMachine()).
          if (target.shape.disks?.length) internals.lockDisks();
          await internals.applyState(state);
        },
        // (Only with images: run for the first time, inside the downtime, a call is compiled.)
        lockDisks: target.shape.disks?.length ? internals.lockDisks : undefined,
        applyDevices: internals.applyDeviceState,
        applyDevicesAhead: (part: DeviceStatesAhead) => internals.applyDeviceStateAhead(part),
        start,
        // A local migration's images are the source's open files: unlocking them would unlock them for it too.
        releaseDisks: () => (handover ? undefined : internals.unlockDisks()),
        discard: async () => {
          await target.stop();
        },
        machine: target,
      };
    });
  } finally {
    // Built for a migration that never arrived.
    if (prebuilt) await (await (prebuilt as Promise<Machine>).catch(() => null))?.stop();
  }
}

/**
 * The state each warmed-up machine rehearses with (see IncomingTarget.rehearse()), and its
 * sections, encoded once: the rehearsal comes just before the source pauses, and only the reading
 * is the destination's to warm (encoding it there took 0.1 ms of the 0.2).
 */
const rehearsalStates = new WeakMap<Machine, { state: MachineState; sections: readonly Uint8Array[] }>();

/**
 * How often the destination runs its dry run while it waits: enough for V8 to optimize the
 * parsing and applying (measured warm, in-process: 0.6-1.2 ms after 8 rounds, 0.35 ms after 50),
 * about 20 ms spent before it listens, not during a migration.
 */
const DESTINATION_WARM_UP_ROUNDS = 50;

/**
 * A dry run of what the stream's end will do (save a state, encode, decode, put it back), so
 * that its code is warm when the guest is paused at the other end. It writes no guest RAM.
 */
async function warmUp(machine: Machine): Promise<void> {
  try {
    const state = await rehearseRestore(machine, DESTINATION_WARM_UP_ROUNDS, { devicesAhead: true });
    rehearsalStates.set(machine, { state, sections: encodeMachineState(state) });
  } catch (error) {
    machineInternals(machine).log(`warming up for the incoming migration failed (harmless): ${(error as Error).message}`);
  }
}

/** A local migration's machine: its disks and TAPs are the fds the source handed over (ignoring disks and net given here). */
function localRuntime(config: IncomingConfig, shape: MachineShape, handover: LocalHandover): IncomingConfig {
  return {
    ...config,
    disks: (shape.disks ?? []).map((disk, index) => ({ path: disk.path, readOnly: disk.readOnly, id: disk.id, fd: handover.disks[index]! })),
    net: (shape.net ?? []).map((card, index) => ({ fd: handover.net[index]!, mac: card.mac })),
  };
}

/** What the machine builder hands back for an incoming guest. */
export interface IncomingTarget {
  memory: GuestMemory;
  /**
   * One more dry run of apply() (the machine's own state, decoded anew), just before the real
   * state comes: after a process has waited idle, the same warm code takes 2-3 times as long
   * (0.6 against 0.25 ms here), its caches and CPU gone cold. Never rejects.
   */
  rehearse?(): Promise<void>;
  /** Puts the VM's and the vCPUs' state on the machine, ahead of the devices' (see encodeCpuState()). */
  applyCpu(state: CpuState): Promise<void>;
  /** Takes the disk images (locks them) and puts the whole state on the machine. */
  apply(state: MachineState): Promise<void>;
  /** Takes the disk images, where the machine has any (before applyDevices()). */
  lockDisks?(): void;
  /**
   * Puts the devices' state on the machine once applyCpu() has put the rest; `appliedAhead`:
   * devices left as applyDevicesAhead() put them.
   */
  applyDevices(devices: MachineState['devices'], appliedAhead?: ReadonlySet<string>): void;
  /** The devices' state the source sent ahead of its pause (SectionType.DeviceStateAhead), put on the machine at once. */
  applyDevicesAhead(part: DeviceStatesAhead): void;
  /** Runs the guest, or sets it up paused (the source's owner had paused it); `onRunning` as soon as its vCPUs are set running. */
  start(paused: boolean, onRunning?: () => void): void;
  /** Lets go of the disk images at once, for the source to take back (a failed migration). */
  releaseDisks(): void;
  discard(): Promise<void>;
  machine: Machine;
}

export async function receiveMigration(
  addressText: string,
  config: IncomingConfig,
  build: (shape: MachineShape, handover?: LocalHandover) => Promise<IncomingTarget>,
): Promise<Machine> {
  const address = parseMigrationAddress(addressText);
  const signal = config.signal;
  const stallTimeoutMs = config.timeoutMs ?? DEFAULT_MIGRATION_TIMEOUT_MS;
  let listeningAt = addressText;
  warmUpPageStream();
  warmUpStreamEnd();
  let socket: Socket = await listenForMigration(address, {
    token: config.token,
    timeoutMs: config.timeoutMs,
    signal,
    onListening: (bound) => config.onListening?.((listeningAt = formatMigrationAddress(bound))),
    onRejected: (reason, peer) => config.log?.(`refused a migration connection from ${peer}: ${reason}`),
  });
  socket.on('error', () => {}); // failures surface through the reads below
  enlargeSocketBuffers(socket);
  const what = `receiving a migration on ${addressText}`;
  const aborted = abortPromise(signal, what);
  // The header and the Config section; the rest is parsed as it arrives (receiveSections).
  const source = socketSource(socket, stallTimeoutMs);
  const reader = new SectionReader(source);
  let target: IncomingTarget | undefined;
  // Post-copy: the pages still missing once the guest runs here (see postcopy-destination.ts).
  let postcopy: PostcopyPages | null = null;
  let postcopyBegun = () => {};
  const begun = new Promise<void>((resolve) => (postcopyBegun = resolve));
  let guestRunsHere = false;
  // The page stream once taken (receiveSections()): stopped on a failure here.
  let stream: ReceivedSections | null = null;
  let replyHeaderSent = false;
  const reply = async (chunks: Uint8Array[], shape?: { memoryBytes: number; vcpus: number }) => {
    if (!replyHeaderSent) {
      chunks = [encodeHeader({ kind: 'migration', memoryBytes: shape?.memoryBytes ?? 4096, vcpuCount: shape?.vcpus ?? 1 }), ...chunks];
      replyHeaderSent = true;
    }
    await writeChunks(socket, chunks);
  };
  try {
    const header = await Promise.race([reader.readHeader(), aborted.promise]);
    checkHeader(header, { kind: header.kind === 'local-migration' ? 'local-migration' : 'migration', memoryBytes: config.memoryBytes, vcpuCount: config.vcpus });
    const first = await Promise.race([reader.next(), aborted.promise]);
    if (first.type !== SectionType.Config) throw new MigrationError(Code.Format, `the migration stream starts with a ${first.name} section, not its configuration`);
    const announced = decodeConfigSection(first, 'the migration stream').machine;
    const shape = checkShape(announced, 'the migration stream');
    if (shape.memoryBytes !== header.memoryBytes || shape.vcpus !== header.vcpuCount) {
      throw new MigrationError(Code.Mismatch, 'the migration stream\'s configuration contradicts its header');
    }
    resetPhases();
    markPhase('destination: stream announced');
    if (header.kind === 'local-migration') {
      aborted.dispose();
      return await receiveLocalMigration({ socket, source, header, shape, config, stallTimeoutMs, what, build });
    }
    target = await build(shape);
    markPhase('destination: machine ready');
    throwIfAborted(signal, what);
    const memory = target.memory;
    const ram = memory.bytes();
    const state = new StateSectionReader('the migration stream', header.vcpuCount);
    // The last state's Config is the announced machine with its running flag, as a rule.
    for (const running of [true, false]) state.expectConfig({ machine: announced, running });
    let accepted = false;
    let syncsOwed = 0;
    // Pages of live sections that failed their data's CRC, asked of the source again (a
    // PageRequest, ahead of the Sync answer that follows them): after the acceptance.
    let requestsOwed: PageRange[] = [];
    const askAgain = (ranges: PageRange[]) => void reply([encodeSection(SectionType.PageRequest, encodePageRanges(ranges))]).catch(() => {});
    let syncsParsed = 0;
    // Each resolved once: resolving a promise again calls into Node's rejection tracking (its
    // multiple-resolves hook), compiled at its first call, inside the downtime.
    let cpuArrived: (() => void) | null = null;
    const cpuStateIn = new Promise<void>((resolve) => (cpuArrived = resolve));
    let devicesArrived: (() => void) | null = null;
    const deviceStateIn = new Promise<void>((resolve) => (devicesArrived = resolve));
    let rehearsing: Promise<void> | null = null;
    // The rehearsal, once the chunk that holds the section asking for it is parsed (out of the
    // parse; a microtask: a turn of the event loop took 0.06 ms more of the time before the pause).
    const rehearse = () => Promise.resolve().then(() => target!.rehearse?.());
    // Reads with this thread spinning, rather than asleep in the event loop, where the source is
    // about to send the last state (see receiveSections()).
    let spin = (_maxMs: number, _until: () => boolean): void => {};
    // What each spin waits for (made once, and each run once before the pause: see below).
    const cpuStateComplete = () => state.cpuComplete || state.complete;
    const deviceStateComplete = () => state.complete || postcopy !== null;
    const postcopyBegunHere = () => postcopy !== null;
    const answerSync = () => void rehearsing!.then(() => {
      const answered = reply([encodeSync()]);
      markPhase('destination: Sync answered');
      // The source pauses its guest as soon as it has the answer, and sends its state.
      spin(STATE_SPIN_MS, cpuStateComplete);
      return answered;
    }).catch(() => {});
    // The devices' state sent ahead (SectionType.DeviceStateAhead): put on the machine after the
    // rehearsal, before the Sync that follows it is answered; a failure there fails the migration.
    let devicesAhead: DeviceStatesAhead | null = null;
    let failAhead!: (error: unknown) => void;
    const aheadFailed = new Promise<never>((_, reject) => (failAhead = reject));
    aheadFailed.catch(() => {});
    // From here on the stream is parsed as it arrives, page data going from the socket's read
    // buffer straight into guest RAM: see section-parser.ts for what that allows and why it is
    // safe here (this machine runs only once the whole stream has checked out).
    markPhase('destination: page stream taken');
    const leftover = source.detach();
    const sections = receiveSections(socket, leftover, {
      memoryBytes: ram.length,
      // Into a memfd, pwrite: the kernel allocates and fills each page in one step, a third faster
      // here than a page fault per fresh page followed by a copy. Large zero ranges become holes.
      writePages: memory.fd >= 0
        ? (guestPhysAddr, data) => {
          if (postcopy) return postcopy.target.writePages!(guestPhysAddr, data);
          for (let written = 0; written < data.length;) written += writeSync(memory.fd, data, written, data.length - written, guestPhysAddr + written);
        }
        : (guestPhysAddr, data) => ram.set(data, guestPhysAddr),
      zeroPages: (guestPhysAddr, byteLength) => {
        if (postcopy) postcopy.target.zeroPages!(guestPhysAddr, byteLength);
        else if (byteLength >= 64 * 1024) memory.dontneed(guestPhysAddr, byteLength);
        else ram.fill(0, guestPhysAddr, guestPhysAddr + byteLength);
      },
      pagesDone: (counts) => postcopy?.target.pagesDone!(counts),
      pagesOwed: (table) => {
        const ranges: PageRange[] = [];
        for (let i = 0; i < table.rangeCount; i++) ranges.push({ firstPage: table.addrs[i]! / PAGE_SIZE, pageCount: table.lengths[i]! / PAGE_SIZE });
        if (accepted) askAgain(ranges);
        else requestsOwed.push(...ranges);
      },
      section: (section) => {
        if (section.type === SectionType.Postcopy && !postcopy && state.complete) {
          if (memory.fd < 0) throw new MigrationError(Code.Format, 'post-copy needs guest RAM in a memfd');
          // From here on guest RAM is written only through the userfaultfd.
          postcopy = new PostcopyPages(memory, decodeLacking(section.payload, ram.length));
          postcopyBegun();
        } else if (section.type === SectionType.Sync) {
          // (The first ends the first pre-copy round: with the note above, the page stream's rate at this end.)
          if (syncsParsed++ === 0) markPhase('destination: first Sync parsed');
          // The source pauses its guest as soon as it has the answer: rehearse the state's
          // parsing and applying first (out of this parse), so that the code is warm when the
          // state comes and the dry run does not compete with the source's pause for the CPUs.
          rehearsing ??= rehearse();
          // The source does not wait for the acceptance before it sends: its first Sync may be
          // parsed before the acceptance is written, and is answered after it.
          if (accepted) answerSync();
          else syncsOwed++;
        }
        else if (section.type === SectionType.Error) throw new MigrationError(Code.Canceled, `the source gave up: ${decodeErrorSection(section.payload)}`);
        else if (section.type === SectionType.End) markPhase('destination: End parsed');
        else if (section.type === SectionType.DeviceStateAhead) {
          if (devicesAhead || state.config !== undefined || postcopy) throw new MigrationError(Code.Format, `unexpected ${section.name} section in a migration stream`);
          const part = decodeDeviceStatesAhead(section, 'the migration stream');
          devicesAhead = part;
          rehearsing = (rehearsing ?? rehearse()).then(() => {
            target!.applyDevicesAhead(part);
            markPhase('destination: device states sent ahead applied');
          });
          // (The Sync is then never answered: the failure goes to the source as an Error.)
          rehearsing.catch(failAhead);
        }
        else {
          if (section.type === SectionType.Config) markPhase('destination: state arriving');
          if (!state.take(section)) throw new MigrationError(Code.Format, `unexpected ${section.name} section in a migration stream`);
          if (cpuArrived && state.cpuComplete) {
            cpuArrived();
            cpuArrived = null;
          }
          if (devicesArrived && state.complete) {
            devicesArrived();
            devicesArrived = null;
          }
        }
      },
    }, stallTimeoutMs, signal, what, () => (postcopy as PostcopyPages | null)?.readBuffer() ?? null);
    stream = sections;
    socket = sections.socket;
    spin = sections.spin;
    // V8 compiles a function at its first call (0.02-0.05 ms each here): what the spins wait for
    // is asked once now (reading nothing), so that none of it is compiled inside the downtime.
    spin(0, cpuStateComplete);
    spin(0, deviceStateComplete);
    spin(0, postcopyBegunHere);
    // What start() calls the moment the vCPUs are set running (below), made here and run once
    // empty for the same reason. The answer goes then, before their threads wake and before
    // start()'s bookkeeping (the timers, the console): the source's downtime ends with it.
    let answered: Promise<void> | null = null;
    const onRunning = (dryRun = false) => {
      if (dryRun) return;
      // From here on the guest is this side's, whatever becomes of the answer: a source that
      // does not hear it keeps its copy paused (EUNCONFIRMED) rather than run the guest too.
      guestRunsHere = true;
      markPhase('destination: starting');
      answered = reply([postcopy ? encodeSection(SectionType.Postcopy, new Uint8Array(0)) : encodeEnd()]);
      markPhase('destination: ack written');
    };
    onRunning(true);
    // A stream that fails while the acceptance is being written is reported by the await below.
    sections.ended.catch(() => {});
    const acceptance = reply([encodeConfigSection({ machine: shape })], shape);
    accepted = true;
    if (requestsOwed.length > 0) askAgain(requestsOwed);
    requestsOwed = [];
    for (; syncsOwed > 0; syncsOwed--) answerSync();
    // A source that gave up before the acceptance went out closed the connection: what it said
    // (in the stream) says more than the failed write.
    await acceptance.catch(async (error: unknown) => {
      await sections.ended;
      throw error;
    });
    const expected = { memoryBytes: header.memoryBytes, vcpus: header.vcpuCount };
    // The VM's and the vCPUs' state come first, the devices' in a second write (see
    // encodeCpuState()): checked and applied while the source saves and encodes the rest.
    await Promise.race([sections.ended, begun, cpuStateIn, aheadFailed]);
    // (A stream that ended before them is refused by finish(), which says what it lacks.)
    const cpu = cpuStateOf(state.cpuComplete ? state.cpuParts() : state.finish(), expected, 'the migration stream');
    markPhase('destination: CPU state checked');
    // Never two applies at once.
    await rehearsing;
    await target.applyCpu(cpu);
    // The devices' part may come before the source's last pages (see migrateMachine()): applied
    // as it comes, but for the virtio devices', only once every page is in.
    spin(TAIL_SPIN_MS, deviceStateComplete);
    await Promise.race([sections.ended, begun, deviceStateIn]);
    const merged = devicesAhead ? mergeDeviceStates(devicesAhead, state.finish().devices, 'the migration stream') : null;
    const complete = { ...cpu, devices: merged ? merged.devices : checkDeviceStates(state.finish().devices, 'the migration stream') };
    markPhase('destination: state checked');
    // The source let go of the images before it sent its last state (see migrateMachine()).
    target.lockDisks?.();
    const beforeEnd = complete.devices.virtio === undefined;
    if (beforeEnd) target.applyDevices(complete.devices, merged?.appliedAhead);
    spin(TAIL_SPIN_MS, postcopyBegunHere);
    await Promise.race([sections.ended, begun]);
    if (!beforeEnd) target.applyDevices(complete.devices, merged?.appliedAhead);
    markPhase('destination: state applied');
    // The last moment an abort counts: from here on the guest runs here.
    throwIfAborted(signal, what);
    const pages = postcopy as PostcopyPages | null;
    target.start(complete.running === false, onRunning);
    markPhase('destination: guest started');
    aborted.dispose();
    if (pages) {
      // A failed write is a break, which the post-copy loop sees on the connection.
      await (answered as Promise<void> | null)?.catch(() => {});
      const machine = target.machine;
      config.onPostcopy?.({ machine, missingPages: pages.lackingCount });
      await runPostcopyDestination({
        pages, machine, header, address: listeningAt, token: config.token, stallTimeoutMs, recoveryMs: config.postcopyRecoveryMs,
        log: (message) => config.log?.(message),
        receive: (next, leftover, parserTarget) => receiveSections(next, leftover, parserTarget, stallTimeoutMs, undefined, what, () => pages.readBuffer()),
      }, sections);
      return machine;
    }
    await (answered as Promise<void> | null)?.catch((error: unknown) => {
      config.log?.(`the guest runs here, but the source could not be told (${(error as Error)?.message ?? String(error)}): it keeps its copy paused`);
    });
    socket.end();
    return target.machine;
  } catch (error) {
    aborted.dispose();
    // The guest has run here: it is never thrown away (a PostcopyPausedError holds it, paused).
    if (guestRunsHere) throw error;
    (postcopy as PostcopyPages | null)?.close();
    const message = (error as Error)?.message ?? String(error);
    // Nothing more goes into the machine about to be discarded: once it is, its memfd's number may
    // be another file's, and the source may still be sending its last pages.
    stream?.stop(error as Error);
    // Before the source hears of the failure: it takes its disk images back then.
    target?.releaseDisks();
    try {
      if (!socket.destroyed) await Promise.race([reply([encodeErrorSection(message)]), new Promise((resolve) => setTimeout(resolve, 1000))]);
    } catch {
      // The source is gone already.
    }
    // Half-close so the source reads why before it sees the connection go; drop it soon after.
    socket.end();
    setTimeout(() => socket.destroy(), 1000).unref();
    if (target) await target.discard();
    throw error;
  }
}

let streamEndWarmedUp = false;

/**
 * Runs receiveSections() once over a made-up stream whose first piece holds its End (the socket
 * is then never touched), so that V8 has compiled what a stream's end runs before a real one
 * comes, inside the downtime: it compiles each function at its first call (about 0.05 ms here).
 */
function warmUpStreamEnd(): void {
  receiveBuffer();
  if (streamEndWarmedUp) return;
  streamEndWarmedUp = true;
  const target: SectionParserTarget = { memoryBytes: PAGE_SIZE, writePages: () => {}, zeroPages: () => {}, section: () => {} };
  receiveSections(new Socket(), [Buffer.concat([encodeSync(), encodeEnd()])], target, 1000, undefined, 'a warm-up').ended.catch(() => {});
  // A Promise.race() whose other promises settle later calls Node's promise hook (its check for
  // a promise resolved twice), as the stream's end does: compiled at its first call, here.
  void Promise.race([Promise.resolve(), Promise.resolve()]);
}

/**
 * How long the destination spins at most for the source's last state after answering its Sync
 * (the source pauses, then writes the CPU state: about 1 ms here), and for each later part of
 * it. Past that it waits in the event loop as for any other data.
 */
const STATE_SPIN_MS = 5;
const TAIL_SPIN_MS = 3;

/** Bytes each read of an incoming stream may take at most. */
const RECEIVE_BUFFER_BYTES = 4 * 1024 * 1024;
let sharedReceiveBuffer: Buffer | undefined;

/**
 * The buffer every incoming stream of this process reads into (each read is parsed to the end
 * before the next, on this one thread), its pages faulted in before a stream comes: a fresh one
 * cost the destination 1,000 page faults (2 ms of the CPU it is short of) inside the transfer.
 */
function receiveBuffer(): Buffer {
  sharedReceiveBuffer ??= Buffer.allocUnsafe(RECEIVE_BUFFER_BYTES).fill(0);
  return sharedReceiveBuffer;
}

/** The rest of a stream as receiveSections() reads it. */
export interface ReceivedSections {
  /** The connection, reopened for its reads: the one to write replies to. */
  socket: Socket;
  /** Resolves at the End section; rejects with what was wrong. */
  ended: Promise<void>;
  /** See receiveSections(). */
  spin: (maxMs: number, until: () => boolean) => void;
  /** Stops taking the stream (the migration failed here): `ended` rejects with `why`, nothing more is parsed. */
  stop(why: Error): void;
}

/**
 * Parses the rest of the stream from `socket` (reopened with a large read buffer; the new socket
 * is returned at once) into `target` until its End section: `ended` resolves then, or rejects
 * with what was wrong: a malformed section, a closed connection, no data for `stallTimeoutMs`.
 * `spin(maxMs, until)` reads on at once with this thread spinning (spinRead()), until `until()`
 * holds after a read, the stream ends or fails, or `maxMs` have passed: for the moments the
 * source is about to send the last state.
 */
export function receiveSections(
  socket: Socket,
  leftover: Uint8Array[],
  target: SectionParserTarget,
  stallTimeoutMs: number,
  signal: AbortSignal | undefined,
  what: string,
  /** Post-copy's read buffers (see PostcopyPages.readBuffer()), where it lends one. */
  lentBuffer?: () => Uint8Array | null,
): ReceivedSections {
  const parser = new SectionParser(target);
  let spin = (_maxMs: number, _until: () => boolean): void => {};
  let settle!: (error?: Error) => void;
  const ended = new Promise<void>((resolve, reject) => {
    settle = (error) => (error ? reject(error) : resolve());
  });
  let done = false;
  const onAbort = () => finish(abortError(what, signal));
  const finish = (error?: Error) => {
    if (done) return;
    done = true;
    clearTimeout(stall);
    signal?.removeEventListener('abort', onAbort);
    settle(error);
  };
  const take = (bytes: Uint8Array): boolean => {
    if (done) return false;
    try {
      parser.push(bytes);
    } catch (error) {
      finish(error as Error);
      return false;
    }
    stall.refresh();
    if (parser.ended) finish();
    return !parser.ended;
  };
  const stall = setTimeout(() => {
    finish(new MigrationError(Code.TimedOut, `migration stream stalled: no data for ${stallTimeoutMs} ms after ${parser.bytesParsed} bytes`));
  }, Math.min(stallTimeoutMs, 0x7fffffff));
  if (signal?.aborted) onAbort();
  else signal?.addEventListener('abort', onAbort, { once: true });
  for (const chunk of leftover) take(chunk);
  const stop = (why: Error) => finish(why);
  // What had arrived may hold the whole stream, or its end: an Error from a source that gave up
  // (and has closed the connection since).
  if (done) return { socket, ended, spin, stop };
  const buffer = receiveBuffer();
  let reopened: Socket;
  try {
    reopened = reopenWithReadBuffer(socket, lentBuffer ? () => lentBuffer() ?? buffer : buffer, take);
  } catch (error) {
    finish(error as Error);
    return { socket, ended, spin, stop };
  }
  const closed = (why: string) => () => {
    if (!parser.ended) {
      finish(new MigrationError(Code.Truncated, `migration stream truncated: ${why} after ${parser.bytesParsed} bytes (expected ${parser.waitingFor})`));
    }
  };
  reopened.on('end', closed('peer closed the migration stream'));
  reopened.on('close', closed('the connection closed'));
  reopened.on('error', (error) => closed(`the connection failed (${error.message})`)());
  const fd = socketFd(reopened);
  spin = (maxMs, until) => {
    const deadline = performance.now() + maxMs;
    while (!done && fd >= 0 && !until()) {
      const left = deadline - performance.now();
      if (left <= 0) return;
      const into = lentBuffer?.() ?? buffer;
      let got: number;
      try {
        got = spinRead(fd, into, Math.min(left, 1000));
      } catch (error) {
        // Taken from the socket here, the failure would not reach its own read.
        closed(`the connection failed (${(error as Error).message})`)();
        return;
      }
      // Nothing in time, or the end of the stream, which the socket's own read meets too.
      if (got <= 0) return;
      take(into.subarray(0, got));
    }
  };
  return { socket: reopened, ended, spin, stop };
}
