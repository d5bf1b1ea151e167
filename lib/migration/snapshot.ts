// Snapshots of a machine: its state and RAM written to a file (zero pages left as holes), or only
// the pages written since the previous snapshot, layered on it. Restoring maps the base file's
// RAM image copy-on-write, so a restore costs the same for 64 MiB as for 3 GiB.
import nodePath from 'node:path';
import { GuestMemory } from '../kvm/memory.js';
import type { MachineState } from '../vmm/machine.js';
import { assembleMachineState, checkShape } from './machine-state.js';
import { populatedPageRanges } from './page-ranges.js';
import { loadSnapshotMemory, openSnapshotChain, verifyRamImage, writeSnapshotFile, type SnapshotContents } from './snapshot-file.js';
import type { PageRange, SnapshotInfo } from './types.js';

const PAGE_BYTES = 4096;

export async function writeMachineSnapshot(
  path: string,
  options: { state: MachineState; memory: GuestMemory; pages?: PageRange[]; parent?: { path: string; id: Uint8Array } },
): Promise<{ path: string; id: Uint8Array; info: Omit<SnapshotInfo, 'pausedMs' | 'totalTimeMs'> }> {
  const { state, memory, pages, parent } = options;
  const diff = pages !== undefined;
  const result = await writeSnapshotFile(path, {
    kind: diff ? 'diff-snapshot' : 'snapshot',
    memoryBytes: memory.size,
    vcpuCount: state.vcpus.length,
    parent,
    config: state.shape,
    vcpus: state.vcpus,
    vm: state.vm,
    devices: state.devices,
    memory: memory.bytes(),
    pages,
    populated: diff ? undefined : populatedPageRanges(memory).map((range) => [range.firstPage * PAGE_BYTES, range.pageCount * PAGE_BYTES] as const),
  });
  const absolute = nodePath.resolve(path);
  return {
    path: absolute,
    id: result.id,
    info: {
      path: absolute,
      kind: diff ? 'diff' : 'full',
      ...(parent ? { parent: parent.path } : {}),
      bytesWritten: result.bytesWritten,
      pagesWritten: result.pagesWritten,
      zeroPagesSkipped: result.zeroPagesSkipped,
    },
  };
}

export interface LoadedSnapshot {
  state: MachineState;
  /** Guest RAM: the base image mapped copy-on-write, with each diff's pages written over it. */
  mapMemory(size: number): Promise<GuestMemory>;
}

export async function loadSnapshot(path: string, options: { verify: boolean }): Promise<LoadedSnapshot> {
  const chain = await openSnapshotChain(path);
  const base = chain[0]!;
  const newest = chain[chain.length - 1]!;
  const where = newest.path;
  const shape = checkShape(newest.config, where);
  const state = assembleMachineState(
    { shape, vm: newest.vm, vcpus: newest.vcpus, devices: newest.devices },
    { memoryBytes: newest.header.memoryBytes, vcpus: newest.header.vcpuCount },
    where,
  );
  if (options.verify) await verifyRamImage(base.path, base);
  return {
    state,
    async mapMemory(size: number): Promise<GuestMemory> {
      const image = base.ramImage!;
      if (size !== image.sizeBytes) throw new Error(`${base.path}: its RAM image holds ${image.sizeBytes} bytes, the machine needs ${size}`);
      const mapFile = (GuestMemory as unknown as { mapFile?: (file: string, options: { offset: number; size: number }) => GuestMemory }).mapFile;
      if (typeof mapFile === 'function') {
        const memory = mapFile.call(GuestMemory, base.path, { offset: image.fileOffset, size });
        try {
          applyDiffs(chain, memory);
        } catch (error) {
          memory.close();
          throw error;
        }
        return memory;
      }
      const memory = GuestMemory.create(size, { backing: 'memfd' });
      try {
        await loadSnapshotMemory(chain, memory.bytes(), { memoryIsZeroed: true });
      } catch (error) {
        memory.close();
        throw error;
      }
      return memory;
    },
  };
}

function applyDiffs(chain: readonly SnapshotContents[], memory: GuestMemory): void {
  // Only diffs need guest RAM as an ArrayBuffer (making one costs a garbage collection).
  if (chain.length < 2) return;
  const bytes = memory.bytes();
  for (const diff of chain.slice(1)) diff.applyPages!(bytes);
}
