// The destination side of a live migration: accept one authenticated connection, check the
// stream against this host's expectations, write the pages into a fresh machine's RAM as they
// come, and only once the whole stream has arrived intact apply the state and run the guest.
import { writeSync } from 'node:fs';
import type { Socket } from 'node:net';
import type { GuestMemory } from '../kvm/memory.js';
import type { IncomingConfig, Machine, MachineShape, MachineState } from '../vmm/machine.js';
import { MachineStateCollector, checkShape, encodeShape } from './machine-state.js';
import { decodeStateSection } from './state-codec.js';
import {
  SectionReader, SectionType, StreamError, checkHeader, decodeErrorSection, decodePages, encodeEnd, encodeErrorSection, encodeSection,
  encodeHeader, socketSource, writeChunks,
} from './stream.js';
import { enlargeSocketBuffers } from './socket-buffers.js';
import { formatMigrationAddress, listenForMigration, parseMigrationAddress } from './transport.js';
import { DEFAULT_MIGRATION_TIMEOUT_MS } from './send.js';

/** What the machine builder hands back for an incoming guest. */
export interface IncomingTarget {
  memory: GuestMemory;
  apply(state: MachineState): Promise<void>;
  /** Runs the guest, or sets it up paused (the source's owner had paused it). */
  start(paused: boolean): void;
  discard(): Promise<void>;
  machine: Machine;
}

export async function receiveMigration(
  addressText: string,
  config: IncomingConfig,
  build: (shape: MachineShape) => Promise<IncomingTarget>,
): Promise<Machine> {
  const address = parseMigrationAddress(addressText);
  const stallTimeoutMs = config.timeoutMs ?? DEFAULT_MIGRATION_TIMEOUT_MS;
  const socket: Socket = await listenForMigration(address, {
    token: config.token,
    timeoutMs: config.timeoutMs,
    onListening: (bound) => config.onListening?.(formatMigrationAddress(bound)),
    onRejected: (reason, peer) => config.log?.(`refused a migration connection from ${peer}: ${reason}`),
  });
  socket.on('error', () => {}); // failures surface through the reads below
  enlargeSocketBuffers(socket);
  // Each section is used up before the next is read: one reused buffer assembles them.
  const source = socketSource(socket, stallTimeoutMs).reuseBuffers();
  const reader = new SectionReader(source);
  let target: IncomingTarget | undefined;
  let replyHeaderSent = false;
  const reply = async (chunks: Uint8Array[], shape?: { memoryBytes: number; vcpus: number }) => {
    if (!replyHeaderSent) {
      chunks = [encodeHeader({ kind: 'migration', memoryBytes: shape?.memoryBytes ?? 4096, vcpuCount: shape?.vcpus ?? 1 }), ...chunks];
      replyHeaderSent = true;
    }
    await writeChunks(socket, chunks);
  };
  try {
    const header = await reader.readHeader();
    checkHeader(header, { kind: 'migration', memoryBytes: config.memoryBytes, vcpuCount: config.vcpus });
    const first = await reader.next();
    if (first.type !== SectionType.Config) throw new StreamError('EFORMAT', `the migration stream starts with a ${first.name} section, not its configuration`);
    const shape = checkShape(decodeStateSection(first), 'migration stream');
    if (shape.memoryBytes !== header.memoryBytes || shape.vcpus !== header.vcpuCount) {
      throw new StreamError('EMISMATCH', 'the migration stream\'s configuration contradicts its header');
    }
    target = await build(shape);
    await reply([encodeShape(shape)], shape);

    const ram = target.memory.bytes();
    const state = new MachineStateCollector('migration stream');
    for (;;) {
      const section = await reader.next();
      if (section.type === SectionType.Pages) writePages(section.payload, target.memory, ram);
      else if (section.type === SectionType.End) break;
      else if (section.type === SectionType.Sync) await reply([encodeSection(SectionType.Sync, new Uint8Array(0))]);
      else if (section.type === SectionType.Error) throw new Error(`the source gave up: ${decodeErrorSection(section.payload)}`);
      else if (!state.take(section)) throw new StreamError('EFORMAT', `unexpected ${section.name} section in a migration stream`);
    }
    const complete = state.finish({ memoryBytes: header.memoryBytes, vcpus: header.vcpuCount });
    await target.apply(complete);
    target.start(complete.running === false);
    await reply([encodeEnd()]);
    socket.end();
    source.close();
    return target.machine;
  } catch (error) {
    const message = (error as Error)?.message ?? String(error);
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

/**
 * A Pages section into guest RAM (checked in full first). Into a memfd, pwrite: the kernel
 * allocates and fills each page in one step, a third faster here than a page fault per fresh page
 * followed by a copy. Zero ranges go back to the kernel as holes when large.
 */
function writePages(payload: Uint8Array, memory: GuestMemory, ram: Uint8Array): void {
  const fd = memory.fd;
  decodePages(payload, ram.length, (guestPhysAddr, byteLength, data) => {
    if (data) {
      if (fd < 0) {
        ram.set(data, guestPhysAddr);
        return;
      }
      for (let written = 0; written < byteLength;) {
        written += writeSync(fd, data, written, byteLength - written, guestPhysAddr + written);
      }
    } else if (byteLength >= 64 * 1024) {
      memory.dontneed(guestPhysAddr, byteLength);
    } else {
      ram.fill(0, guestPhysAddr, guestPhysAddr + byteLength);
    }
  });
}
