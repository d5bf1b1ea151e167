// A snapshot chain opened for a restore: the machine's state, and guest RAM either mapped from the
// base file copy-on-write (a restore that builds its machine) or written into a machine's fresh
// RAM (a restore into a prepared machine), each diff's pages over it.
import { closeSync, readSync, writeSync } from 'node:fs';
import { fileDataRanges } from '../kvm/host.js';
import { GuestMemory } from '../kvm/memory.js';
import type { MachineState } from '../vmm/machine.js';
import { MigrationError, MigrationErrorCode as Code } from './errors.js';
import { openSameSnapshotFile, openSnapshotChain, verifyRamImage, type SnapshotContents } from './snapshot-file.js';
import { machineStateOf } from './state-sections.js';

/** Bytes read from a snapshot file at a time while filling a prepared machine's RAM. */
const FILL_CHUNK_BYTES = 4 * 1024 * 1024;

export interface LoadedSnapshot {
  state: MachineState;
  /** Guest RAM: the base image mapped copy-on-write, with each diff's pages written over it. */
  mapMemory(size: number): Promise<GuestMemory>;
  /** Guest RAM mapped as mapMemory() maps it, over `memory` (a spare VM's placeholder RAM, GuestMemory.mapFileOver()). */
  mapMemoryOver(memory: GuestMemory): void;
  /** Writes guest RAM into `memory` (all zeros, as a new machine's): the base image's data, then each diff's pages. */
  fillMemory(memory: GuestMemory): void;
}

export async function loadSnapshot(path: string, options: { verify: boolean }): Promise<LoadedSnapshot> {
  const chain = await openSnapshotChain(path);
  const base = chain[0]!;
  const newest = chain[chain.length - 1]!;
  const state = machineStateOf(
    { machine: newest.config, vm: newest.vm, vcpus: newest.vcpus, devices: newest.devices },
    { memoryBytes: newest.header.memoryBytes, vcpus: newest.header.vcpuCount },
    newest.path,
  );
  if (options.verify) await verifyRamImage(base.path, base);
  return {
    state,
    async mapMemory(size: number): Promise<GuestMemory> {
      const image = base.ramImage!;
      if (size !== image.sizeBytes) throw new MigrationError(Code.Mismatch, `${base.path}: its RAM image holds ${image.sizeBytes} bytes, the machine needs ${size}`);
      const memory = withSameFile(base, (fd) => GuestMemory.mapFile(fd, { offset: image.fileOffset, size }));
      try {
        applyDiffs(chain, memory);
      } catch (error) {
        memory.close();
        throw error;
      }
      return memory;
    },
    mapMemoryOver(memory: GuestMemory): void {
      const image = base.ramImage!;
      if (memory.size !== image.sizeBytes) throw new MigrationError(Code.Mismatch, `${base.path}: its RAM image holds ${image.sizeBytes} bytes, the machine needs ${memory.size}`);
      withSameFile(base, (fd) => memory.mapFileOver(fd, image.fileOffset));
      applyDiffs(chain, memory);
    },
    fillMemory(memory: GuestMemory): void {
      fillFromImage(base, memory);
      applyDiffs(chain, memory);
    },
  };
}

/** `use(fd)` of the base snapshot file, the one its state came from (see openSameSnapshotFile()). */
function withSameFile<T>(base: SnapshotContents, use: (fd: number) => T): T {
  const fd = openSameSnapshotFile(base);
  try {
    return use(fd);
  } finally {
    closeSync(fd);
  }
}

function applyDiffs(chain: readonly SnapshotContents[], memory: GuestMemory): void {
  // Only diffs need guest RAM as an ArrayBuffer (making one costs a garbage collection).
  if (chain.length < 2) return;
  const bytes = memory.bytes();
  for (const diff of chain.slice(1)) diff.applyPages!(bytes);
}

/**
 * Copies a full snapshot's RAM image into fresh (all-zero) guest RAM: only the file's data, found
 * with SEEK_DATA (a snapshot leaves zero pages as holes), so the cost follows the pages the guest
 * had, not its RAM size.
 */
export function fillFromImage(base: SnapshotContents, memory: GuestMemory): void {
  const image = base.ramImage!;
  if (image.sizeBytes !== memory.size) throw new MigrationError(Code.Mismatch, `${base.path}: its RAM image holds ${image.sizeBytes} bytes, the machine has ${memory.size}`);
  const fd = openSameSnapshotFile(base);
  try {
    const ranges = fileDataRanges(fd, image.fileOffset, image.fileOffset + image.sizeBytes);
    if (ranges.length === 0) return;
    // (A reduce, not Math.max(...): a fragmented file may have more ranges than a call takes arguments.)
    const chunk = Buffer.allocUnsafe(Math.min(FILL_CHUNK_BYTES, ranges.reduce((most, [, length]) => Math.max(most, length), 0)));
    for (const [start, length] of ranges) {
      for (let done = 0; done < length;) {
        const got = readSync(fd, chunk, 0, Math.min(chunk.length, length - done), start + done);
        if (got === 0) throw new MigrationError(Code.Truncated, `${base.path}: snapshot file truncated in its RAM image at offset ${start + done}`);
        const at = start - image.fileOffset + done;
        // Into a memfd, pwrite: the kernel allocates and fills each page in one step, no page faults.
        if (memory.fd >= 0) for (let written = 0; written < got;) written += writeSync(memory.fd, chunk, written, got - written, at + written);
        else memory.write(at, chunk.subarray(0, got));
        done += got;
      }
    }
  } finally {
    closeSync(fd);
  }
}
