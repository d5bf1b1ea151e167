// Same-host live update: a live migration to another process on this host over a unix socket, in
// which nothing is copied. Guest RAM is a memfd: the source hands it over (SCM_RIGHTS) with its
// disk images and TAPs while the guest still runs, the destination maps the same pages and
// builds the machine on them, and only then does the source pause, send the machine's state
// (a few KiB) and wait for the destination to say it runs the guest. The downtime is that
// state's round trip, whatever the size of RAM. This is how a VMM upgrades itself under a
// running guest: start the new version with `run --incoming unix:PATH`, then
// `migrate unix:PATH --local`.
//
// What moves and what it means:
// - RAM: both processes map the one memfd. The destination never writes it before it runs the
//   guest, and the source never touches it after it has paused; so a failure at any point before
//   the destination runs leaves the source's guest as it was.
// - Disk images: the same open files, so the same OFD locks, held by both processes at once
//   while both have them open. Neither lets go of them (unlocking would unlock it for the other):
//   each process just closes its fds when it is done with them.
// - TAPs: the same queues; the destination's card reads from its TAP only once it runs.
//
// The exchange (format.ts, kind 'local-migration'), after the handshake:
//   source: header, Config (the shape)
//   destination: header, Config (accepted: send the fds); from here on it reads the socket
//     itself, never through Node, whose reads would drop the fds
//   source: one Fds section, the fds on its first byte
//   destination: Sync (built on them, ready)
//   source: pauses; the state (Config, VmState, VcpuState x n, DeviceState), End
//   destination: applies it, End (it runs the guest from here on), then runs it
// Once its state has gone out the source waits for End, an Error or the connection's end with
// no timer: a destination that writes End runs the guest, so giving up on a timer could leave it
// running on both sides, on the same RAM. Without End (Error, or the connection closed) the
// destination never ran it, and the source resumes.
import { closeSync } from 'node:fs';
import net from 'node:net';
import { GuestMemory } from '../kvm/memory.js';
import { argTypeError, argValueError, outOfRangeError } from '../kvm/errors.js';
import { watchFd } from '../kvm/fd-watch.js';
import { dupSocket, receiveWithFds, sendWithFds } from '../kvm/host.js';
import { machineInternals, type Machine, type MachineShape, type MachineState, type RawVcpuState } from '../vmm/machine.js';
import { MigrationError, MigrationErrorCode as Code, abortError, abortPromise, checkSignal, throwIfAborted } from './errors.js';
import {
  SectionType, decodeErrorSection, encodeEnd, encodeErrorSection, encodeHeader, encodeSection, encodeSync, type Section, type StreamHeader,
} from './format.js';
import { PeerReplies } from './peer-replies.js';
import { socketFd } from './socket-buffers.js';
import { SectionParser } from './section-parser.js';
import { socketSource, type SocketSource } from './sources.js';
import { newMigrationStats } from './stats.js';
import { markPhase, resetPhases } from '../vmm/phase-timing.js';
import { FinalConfigSections, StateSectionReader, encodeConfigSection, encodeFinalState, machineStateOf, rehearseStateEncoding, warmUpStateEncoding } from './state-sections.js';
import { connectForMigration, parseMigrationAddress } from './transport.js';
import { writeChunks } from './writers.js';
import type { IncomingConfig, MigrateOptions, MigrationPhase, MigrationStats } from './types.js';

/** Connecting, and each answer before the pause, within this unless `timeoutMs` says otherwise. */
const DEFAULT_LOCAL_TIMEOUT_MS = 10_000;
/** Bytes of an Fds section at most (its payload: MAX_SECTION_PAYLOAD_BYTES.Fds). */
const MAX_FDS_MESSAGE_BYTES = 8192;
/** File descriptors one local migration hands over at most: RAM, and a disk or TAP per virtio slot. */
const MAX_HANDED_FDS = 64;

/** What the Fds section says the fds are, in the order they come: RAM regions, disks, TAPs. */
export interface FdsRecord {
  /** One memfd per region of guest RAM, mapped at guestPhysAddr. */
  memory: { guestPhysAddr: number; sizeBytes: number }[];
  /** How many disk images follow, in slot order. */
  disks: number;
  /** How many TAPs follow, in card order. */
  net: number;
}

/** What a destination builds a local migration's machine on; the fds are the receiver's to close after the build. */
export interface LocalHandover {
  /** Guest RAM, mapped from the source's memfd. */
  memory: GuestMemory;
  /** One fd per disk image, in slot order. */
  disks: number[];
  /** One TAP fd per network card. */
  net: number[];
}

export function encodeFdsSection(record: FdsRecord): Uint8Array {
  return encodeSection(SectionType.Fds, Buffer.from(JSON.stringify(record), 'utf8'));
}

/** The Fds section's record, checked against the shape announced and the fds that came. */
export function decodeFdsSection(section: Section, shape: MachineShape, fdCount: number): FdsRecord {
  let value: unknown;
  try {
    value = JSON.parse(Buffer.from(section.payload.buffer, section.payload.byteOffset, section.payload.byteLength).toString('utf8'));
  } catch {
    throw new MigrationError(Code.Format, 'the Fds section is not valid JSON');
  }
  const record = value as Partial<FdsRecord> | null;
  const count = (n: unknown): n is number => typeof n === 'number' && Number.isInteger(n) && n >= 0 && n <= MAX_HANDED_FDS;
  if (typeof record !== 'object' || record === null || !Array.isArray(record.memory) || !count(record.disks) || !count(record.net)) {
    throw new MigrationError(Code.Format, 'the Fds section does not say what its fds are');
  }
  // One region today: all of guest RAM at 0 (the machine's one slot).
  const [region, ...more] = record.memory as unknown[];
  const ram = region as { guestPhysAddr?: unknown; sizeBytes?: unknown } | undefined;
  if (more.length > 0 || ram?.guestPhysAddr !== 0 || ram.sizeBytes !== shape.memoryBytes) {
    throw new MigrationError(Code.Mismatch, `the Fds section's guest RAM is not one region of ${shape.memoryBytes} bytes at 0`);
  }
  if (record.disks !== (shape.disks?.length ?? 0)) throw new MigrationError(Code.Mismatch, `the Fds section hands over ${record.disks} disks for a machine with ${shape.disks?.length ?? 0}`);
  if (record.net !== (shape.net?.length ?? 0)) throw new MigrationError(Code.Mismatch, `the Fds section hands over ${record.net} TAPs for a machine with ${shape.net?.length ?? 0} network cards`);
  const expected = 1 + record.disks + record.net;
  if (fdCount !== expected) throw new MigrationError(Code.Protocol, `the Fds section came with ${fdCount} file descriptors, not the ${expected} it names`);
  return { memory: [{ guestPhysAddr: 0, sizeBytes: shape.memoryBytes }], disks: record.disks, net: record.net };
}

// ---------------------------------------------------------------------------------------------
// Source

function connectedFd(socket: net.Socket): number {
  const fd = socketFd(socket);
  if (fd < 0) throw new MigrationError(Code.Closed, 'the connection has no file descriptor (closed?)');
  return fd;
}

/**
 * machine.migrate(address, { local: true }): hands the running guest over to a destination
 * process on this host (Machine.incoming() or `node-kvm run --incoming` on a unix socket). On
 * success the machine ends with exit reason 'migrated'; on any failure before the destination
 * runs the guest, the guest runs on here, its RAM and disks as they were.
 */
export async function migrateMachineLocally(machine: Machine, addressText: string, options: MigrateOptions = {}): Promise<MigrationStats> {
  if (typeof addressText !== 'string') throw argTypeError('address must be a string such as unix:PATH');
  if (typeof options !== 'object' || options === null) throw argTypeError('options must be an object');
  const address = parseMigrationAddress(addressText);
  if (address.kind !== 'unix') {
    throw argValueError(`a local migration hands guest RAM over as a file descriptor, which only a unix socket on this host carries: ${addressText} is not a unix:PATH address`);
  }
  if (options.token !== undefined && typeof options.token !== 'string') throw argTypeError('token must be a string');
  const onProgress = options.onProgress;
  if (onProgress !== undefined && typeof onProgress !== 'function') throw argTypeError('onProgress must be a function');
  const timeoutMs = options.timeoutMs ?? DEFAULT_LOCAL_TIMEOUT_MS;
  if (typeof timeoutMs !== 'number' || !(timeoutMs > 0) || !Number.isFinite(timeoutMs)) throw outOfRangeError(`timeoutMs must be a positive number, got ${String(timeoutMs)}`);
  const signal = checkSignal(options.signal, 'options.signal');
  const internals = machineInternals(machine);
  return internals.exclusive('migration', async () => {
    const state = machine.state;
    if (state !== 'running' && state !== 'paused') throw new MigrationError(Code.MachineState, `machine is ${state}, not running`, { phase: 'setup' });
    if (machine.memory.backing === 'file') {
      throw new MigrationError(Code.MachineState,
        'a local migration hands guest RAM over as its memfd, but this machine\'s RAM is a copy-on-write mapping of a file (a restored snapshot): ' +
        'the pages it wrote are private to this process and cannot move; migrate it without local (its pages are then copied)', { phase: 'setup' });
    }
    const started = performance.now();
    const stats = newMigrationStats(machine.memoryBytes, machine.dirtyLogMode);
    const progress = (phase: MigrationPhase) => {
      stats.phase = phase;
      stats.totalTimeMs = performance.now() - started;
      try {
        onProgress?.({ ...stats });
      } catch {
        // A failing progress callback must not fail the migration.
      }
      machine.emit('progress', { ...stats });
    };
    const what = `local migration to ${addressText}`;
    throwIfAborted(signal, what, 'setup');
    const aborted = abortPromise(signal, what, () => stats.phase);
    let abortable = true;
    const unlessAborted = <T>(work: Promise<T>): Promise<T> => (abortable && signal ? Promise.race([work, aborted.promise]) : work);
    const hasDevices = internals.virtioDeviceCount > 0;
    let socket: net.Socket | undefined;
    let peer: PeerReplies | undefined;
    let paused = false;
    let pausedVcpus: RawVcpuState[] | null = null;
    try {
      socket = await connectForMigration(address, { token: options.token, timeoutMs, signal });
      socket.on('error', () => {}); // failures surface through the reads and writes below
      const connection = socket;
      const replies = new PeerReplies(connection);
      peer = replies;
      const send = async (chunks: Uint8Array[]) => {
        await unlessAborted(replies.race(writeChunks(connection, chunks)));
        for (const chunk of chunks) stats.bytesTransferred += chunk.length;
      };
      await send([
        encodeHeader({ kind: 'local-migration', memoryBytes: machine.memoryBytes, vcpuCount: machine.vcpuCount }),
        encodeConfigSection({ machine: machine.shape }),
      ]);
      // A state saved and encoded now (thrown away), so that the save and the encoding inside the
      // downtime run warm code: a VMM handing its guest to its successor migrates only once.
      const warmedUp = warmUpStateEncoding(internals.warmUpSave());
      await unlessAborted(replies.expectAccept(timeoutMs));
      // The destination read all that came before, so Node has no write of ours queued: the fds'
      // message cannot interleave with one.
      const handed = internals.handoverFds();
      const ramFd = machine.memory.shareFd();
      const fdsSection = encodeFdsSection({ memory: [{ guestPhysAddr: 0, sizeBytes: machine.memoryBytes }], disks: handed.disks.length, net: handed.net.length });
      try {
        sendWithFds(connectedFd(connection), fdsSection, [ramFd, ...handed.disks, ...handed.net]);
      } finally {
        closeSync(ramFd);
      }
      stats.bytesTransferred += fdsSection.length;
      // The destination maps RAM and builds the machine on it while the guest runs on here.
      await unlessAborted(replies.expectSync(timeoutMs));
      // Once more just before the pause: what ran a while ago runs slower again (rehearseStateEncoding()).
      const warmState = await warmedUp;
      if (warmState) rehearseStateEncoding(warmState);
      stats.setupTimeMs = performance.now() - started;
      progress('setup');

      const finalConfigs = new FinalConfigSections(machine.shape);
      // Not raced with the abort: a pause under way must be known to be undone.
      resetPhases();
      markPhase('source: pause asked');
      if (machine.state === 'running') {
        // Without virtio devices, the vCPUs save their state as they stop; with them, only once
        // the devices have paused too (a request completing meanwhile raises an interrupt).
        pausedVcpus = await internals.pause(!hasDevices);
        markPhase('source: paused, vCPU states saved');
        paused = true;
      }
      const pausedAt = performance.now();
      throwIfAborted(signal, what, 'stop-copy');
      progress('stop-copy');
      // A guest its owner had paused stays paused at the destination.
      const machineState: MachineState = { ...(await internals.saveState(pausedVcpus)), running: paused };
      markPhase('source: VM and device state saved');
      throwIfAborted(signal, what, 'stop-copy');
      abortable = false;
      // One buffer, one write: the destination reads the state whole in one wake-up.
      await send([encodeFinalState(machineState, finalConfigs)]);
      markPhase('source: state written to the socket');
      await replies.expectResumed(Infinity);
      stats.downtimeMs = performance.now() - pausedAt;
      markPhase('source: ack received');
      connection.end();
      progress('completed');
      // The destination has RAM, the images (with their locks) and the TAPs now: this machine
      // only closes its fds and unmaps, touching none of it.
      internals.end({ reason: 'migrated' });
      return { ...stats };
    } catch (caught) {
      const phase = stats.phase;
      const refusal = peer ? await peer.refusal(250) : undefined;
      const error = refusal
        ? new MigrationError(Code.Refused, `local migration failed (${phase}): the destination refused: ${refusal}; the guest runs on here`, { phase, cause: caught })
        : asLocalMigrationError(caught, phase);
      if (paused && machine.state === 'paused') machine.resume();
      if (socket && !socket.destroyed) {
        const connection = socket;
        connection.end(encodeErrorSection(error.message));
        setTimeout(() => connection.destroy(), 1000).unref();
      }
      progress('failed');
      throw error;
    } finally {
      aborted.dispose();
    }
  });
}

function asLocalMigrationError(error: unknown, phase: MigrationPhase): MigrationError {
  if (error instanceof MigrationError && error.phase !== undefined) return error;
  const message = (error as Error)?.message ?? String(error);
  const code = (error as { code?: unknown })?.code;
  return new MigrationError(typeof code === 'string' ? code : Code.Internal, `local migration failed (${phase}): ${message}; the guest runs on here`, { phase, cause: error });
}

// ---------------------------------------------------------------------------------------------
// Destination

/** What receiveMigration() hands a local migration once it has read the header and Config. */
export interface LocalIncoming {
  socket: net.Socket;
  /** The source over `socket` that read the header and Config: detached here. */
  source: SocketSource;
  header: StreamHeader;
  shape: MachineShape;
  config: IncomingConfig;
  stallTimeoutMs: number;
  what: string;
  /** Builds the machine on what the source handed over (the fds stay the caller's). */
  build(shape: MachineShape, handover: LocalHandover): Promise<LocalTarget>;
}

/** The machine built for a local migration, as receiveMachine() lends it. */
export interface LocalTarget {
  apply(state: MachineState): Promise<void>;
  start(paused: boolean): void;
  discard(): Promise<void>;
  machine: Machine;
}

/**
 * The destination's side of a local migration, from the source's Config on. Resolves with the
 * machine running the guest; on failure it tells the source why (which then runs its guest on),
 * stops what it built, and rejects.
 */
export async function receiveLocalMigration(incoming: LocalIncoming): Promise<Machine> {
  const { socket, shape, config, stallTimeoutMs, what } = incoming;
  const signal = config.signal;
  if (socket.remoteFamily !== undefined) {
    throw new MigrationError(Code.Protocol, 'a local migration must come over a unix socket on this host, not tcp');
  }
  const leftover = incoming.source.detach();
  if (leftover.length > 0) throw new MigrationError(Code.Protocol, 'the source of a local migration sent more before it was accepted');
  // From here on this side reads the connection itself: a read by Node would drop the fds.
  const fd = connectedFd(socket);
  socket.pause();
  if (socket.readableLength > 0) throw new MigrationError(Code.Protocol, 'the source of a local migration sent more before it was accepted');
  let raw: number | null = dupSocket(fd);
  socket.removeAllListeners('data');
  socket.on('error', () => {});
  socket.destroy();

  let connection: net.Socket | null = null;
  let received: number[] = [];
  let memory: GuestMemory | null = null;
  let target: LocalTarget | null = null;
  try {
    sendWithFds(raw, Buffer.concat([
      encodeHeader({ kind: 'local-migration', memoryBytes: shape.memoryBytes, vcpuCount: shape.vcpus }),
      encodeConfigSection({ machine: shape }),
    ]), []);
    const { section, fds } = await receiveFdsSection(raw, stallTimeoutMs, signal, what);
    received = fds;
    // Back to Node for the rest: nothing more comes with fds.
    connection = new net.Socket({ fd: raw, readable: true, writable: true });
    raw = null;
    connection.on('error', () => {});
    if (section.type === SectionType.Error) throw new MigrationError(Code.Canceled, `the source gave up: ${decodeErrorSection(section.payload)}`);
    if (section.type !== SectionType.Fds) throw new MigrationError(Code.Protocol, `the source of a local migration sent a ${section.name} section where its fds were due`);
    const record = decodeFdsSection(section, shape, fds.length);
    try {
      memory = GuestMemory.fromFd(fds[0]!, { size: shape.memoryBytes, backing: 'memfd' });
    } catch (error) {
      throw new MigrationError(Code.Protocol, `the source's guest RAM cannot be mapped: ${(error as Error).message}`, { cause: error });
    }
    const handover: LocalHandover = { memory, disks: fds.slice(1, 1 + record.disks), net: fds.slice(1 + record.disks) };
    target = await incoming.build(shape, handover);
    memory = null; // the machine's now
    for (const handed of fds) closeSync(handed);
    received = [];
    throwIfAborted(signal, what);

    // The rest of the stream (no header: the connection's was read) through the one parser.
    const stream = socketSource(connection, stallTimeoutMs);
    let arrived: Section | undefined;
    const parser = new SectionParser({ section: (section) => (arrived = section) });
    const nextSection = async (): Promise<Section> => {
      arrived = undefined;
      while (arrived === undefined) parser.push(await stream.read(parser.bytesWanted, parser.waitingFor));
      return arrived;
    };
    await writeChunks(connection, [encodeSync()]);
    const state = new StateSectionReader('the migration stream', shape.vcpus);
    const aborted = abortPromise(signal, what);
    resetPhases();
    try {
      for (;;) {
        const next = await Promise.race([nextSection(), aborted.promise]);
        if (next.type === SectionType.Config) markPhase('destination: state arriving');
        if (next.type === SectionType.End) break;
        if (next.type === SectionType.Error) throw new MigrationError(Code.Canceled, `the source gave up: ${decodeErrorSection(next.payload)}`);
        if (!state.take(next)) throw new MigrationError(Code.Format, `unexpected ${next.name} section in a local migration stream`);
      }
    } finally {
      aborted.dispose();
    }
    markPhase('destination: End parsed');
    const complete = machineStateOf(state.finish(), { memoryBytes: shape.memoryBytes, vcpus: shape.vcpus }, 'the migration stream');
    markPhase('destination: state checked');
    await target.apply(complete);
    markPhase('destination: state applied');
    // The last moment an abort counts: once End is out, the source has let go of the guest.
    throwIfAborted(signal, what);
    stream.close();
    // End before the guest runs: a source that has not read End (the write failed: it is gone)
    // may still resume its guest on the same RAM, so this side must not have run it. Written
    // straight to the socket (Node has nothing queued on it): in the kernel when this returns,
    // without waiting for a turn of the event loop.
    sendWithFds(connectedFd(connection), encodeEnd(), []);
    markPhase('destination: ack written');
    target.start(complete.running === false);
    markPhase('destination: guest started');
    connection.end();
    return target.machine;
  } catch (error) {
    const message = (error as Error)?.message ?? String(error);
    try {
      if (connection && !connection.destroyed) {
        const reply = connection;
        await Promise.race([writeChunks(reply, [encodeErrorSection(message)]), new Promise((resolve) => setTimeout(resolve, 1000))]);
      } else if (raw !== null) {
        sendWithFds(raw, encodeErrorSection(message), []);
      }
    } catch {
      // The source is gone already.
    }
    if (connection) {
      const reply = connection;
      reply.end();
      setTimeout(() => reply.destroy(), 1000).unref();
    }
    if (raw !== null) closeSync(raw);
    for (const fd of received) closeSync(fd);
    memory?.close();
    // Stopping it only unmaps RAM and closes its fds: the source's guest is untouched.
    if (target) await target.discard();
    throw error;
  }
}

/**
 * Reads the one section that carries the source's fds from `rawFd` (which nothing else
 * reads), with the fds that came on its first byte. Every fd received is returned, or closed
 * before this rejects.
 */
function receiveFdsSection(rawFd: number, stallTimeoutMs: number, signal: AbortSignal | undefined, what: string): Promise<{ section: Section; fds: number[] }> {
  return new Promise((resolve, reject) => {
    const fds: number[] = [];
    const sections: Section[] = [];
    let bytesRead = 0;
    const parser = new SectionParser({
      section: (section) => sections.push({ ...section, payload: section.payload.slice() }),
    });
    let done = false;
    const finish = (error: Error | null) => {
      if (done) return;
      done = true;
      watch.close();
      clearTimeout(timer);
      signal?.removeEventListener('abort', onAbort);
      if (error) {
        for (const fd of fds) closeSync(fd);
        reject(error);
      } else {
        resolve({ section: sections[0]!, fds });
      }
    };
    const onAbort = () => finish(abortError(what, signal));
    const onReadable = () => {
      try {
        for (;;) {
          const got = receiveWithFds(rawFd, MAX_FDS_MESSAGE_BYTES, MAX_HANDED_FDS);
          if (got === null) return;
          if (bytesRead > 0 && got.fds.length > 0) {
            for (const fd of got.fds) closeSync(fd);
            throw new MigrationError(Code.Protocol, 'the source sent file descriptors past the start of its Fds section');
          }
          fds.push(...got.fds);
          if (got.fdsDropped) throw new MigrationError(Code.Protocol, `the source sent more than ${MAX_HANDED_FDS} file descriptors`);
          if (got.bytes.length === 0) throw new MigrationError(Code.Closed, `the source closed the connection after ${bytesRead} bytes of its Fds section`);
          bytesRead += got.bytes.length;
          if (bytesRead > MAX_FDS_MESSAGE_BYTES) throw new MigrationError(Code.TooBig, `the source's Fds section is over ${MAX_FDS_MESSAGE_BYTES} bytes`);
          parser.push(got.bytes);
          if (sections.length > 0) {
            if (parser.bytesParsed !== bytesRead) throw new MigrationError(Code.Protocol, 'the source sent more after its Fds section before this side was ready');
            finish(null);
            return;
          }
          timer.refresh();
        }
      } catch (error) {
        finish(error as Error);
      }
    };
    const timer = setTimeout(() => {
      finish(new MigrationError(Code.TimedOut, `no file descriptors from the source within ${stallTimeoutMs} ms (${bytesRead} bytes of its Fds section arrived)`));
    }, Math.min(stallTimeoutMs, 0x7fffffff));
    const watch = watchFd(rawFd, onReadable);
    if (signal?.aborted) onAbort();
    else signal?.addEventListener('abort', onAbort, { once: true });
  });
}
