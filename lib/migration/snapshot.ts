// Snapshots of a machine: its state and RAM written to a file (zero pages left as holes), or only
// the pages written since the previous snapshot, layered on it. Restoring maps the base file's
// RAM image copy-on-write, so a restore costs the same for 64 MiB as for 3 GiB; a restore into a
// machine built ahead (prepared.ts) reads the image's data into that machine's RAM instead.
import nodePath from 'node:path';
import { PAGE_SIZE } from '../kvm/constants.js';
import { GuestMemory } from '../kvm/memory.js';
import { buildMachine, machineInternals, type Machine, type MachineState } from '../vmm/machine.js';
import { populatedPageRanges, type PageRange } from '../vmm/page-ranges.js';
import { argTypeError } from '../kvm/errors.js';
import { MigrationError, MigrationErrorCode as Code, abortable, checkSignal, throwIfAborted } from './errors.js';
import { writeSnapshotFile } from './snapshot-file.js';
import { restoreIntoPrepared } from './prepared.js';
import { loadSnapshot } from './snapshot-load.js';
import type { RestoreConfig, SnapshotInfo, SnapshotOptions } from './types.js';

/** Who has a machine's dirty tracker while diff snapshots are layered on its last snapshot. */
const SNAPSHOTS = 'snapshots';

/** Each machine's last snapshot, which its next diff snapshot is layered on. */
const lastSnapshots = new WeakMap<Machine, { path: string; id: Uint8Array }>();

/**
 * Writes the guest's memory and state to `path`. With `diff`, only the pages written since this
 * machine's previous snapshot, layered on that file (which must stay where it is). A running
 * machine is paused while its state and memory are written, then runs on. Aborting
 * `options.signal` stops the write (ABORT_ERR): no file is left and the machine runs on.
 */
export async function snapshotMachine(machine: Machine, path: string, options: SnapshotOptions = {}): Promise<SnapshotInfo> {
  if (typeof path !== 'string' || path === '') throw argTypeError('path must be a file path');
  if (typeof options !== 'object' || options === null) throw argTypeError('options must be an object');
  const signal = checkSignal(options.signal, 'options.signal');
  const what = `the snapshot ${path}`;
  throwIfAborted(signal, what);
  const internals = machineInternals(machine);
  return internals.exclusive('snapshot', async () => {
    const diff = !!options.diff;
    const base = lastSnapshots.get(machine);
    // A migration that took the dirty tracker over since broke the chain.
    if (diff && (!base || internals.dirtyTrackingOwner !== SNAPSHOTS)) {
      throw new MigrationError(Code.MachineState, 'a diff snapshot needs a previous snapshot of this machine to layer on');
    }
    const started = performance.now();
    const wasRunning = machine.state === 'running';
    if (wasRunning) await machine.pause();
    const pausedAt = performance.now();
    try {
      throwIfAborted(signal, what);
      // The vCPUs' states raw (KVM's structs): a restore puts them back in one call each.
      const state = await internals.saveState();
      throwIfAborted(signal, what);
      const tracker = internals.startDirtyTracking(SNAPSHOTS);
      // A full snapshot starts tracking (the next diff needs what the guest writes after it).
      const pages = tracker.harvest();
      let result;
      try {
        result = await writeMachineSnapshot(path, { state, memory: machine.memory, pages: diff ? pages : undefined, parent: diff ? base : undefined, signal });
      } catch (error) {
        if (diff) tracker.requeue(pages);
        throw error;
      }
      lastSnapshots.set(machine, { path: result.path, id: result.id });
      const pausedMs = performance.now() - pausedAt;
      return { ...result.info, pausedMs, totalTimeMs: performance.now() - started };
    } finally {
      // Unless it ended meanwhile.
      if (wasRunning && (machine.state as string) === 'paused') machine.resume();
    }
  });
}

/**
 * A machine from a snapshot file (and the files a diff snapshot is layered on), ready to start()
 * where the guest was. RAM is mapped from the file copy-on-write, not read in. Aborting
 * `config.signal` rejects with ABORT_ERR; a machine built meanwhile is stopped.
 */
export async function restoreMachine(path: string, config: RestoreConfig = {}): Promise<Machine> {
  if (typeof path !== 'string' || path === '') throw argTypeError('path must be a snapshot file path');
  if (typeof config !== 'object' || config === null) throw argTypeError('config must be an object');
  const signal = checkSignal(config.signal, 'config.signal');
  const what = `restoring ${path}`;
  throwIfAborted(signal, what);
  if (config.prepared !== undefined) return restoreIntoPrepared(path, config.prepared, config, signal, what);
  const snapshot = await loadSnapshot(path, { verify: !!config.verify });
  throwIfAborted(signal, what);
  const machine = await abortable(buildMachine({
    shape: snapshot.state.shape,
    boot: null,
    memory: snapshot.mapMemory,
    mapMemoryOver: snapshot.mapMemoryOver,
    runtime: config,
    state: snapshot.state,
    savedDisks: snapshot.state.shape.disks ?? [],
    signal,
  }), signal, what);
  if (signal?.aborted) {
    // Aborted as the build resolved: the machine goes at once.
    await machine.stop();
    throwIfAborted(signal, what);
  }
  return machine;
}

export async function writeMachineSnapshot(
  path: string,
  options: { state: MachineState; memory: GuestMemory; pages?: PageRange[]; parent?: { path: string; id: Uint8Array }; signal?: AbortSignal },
): Promise<{ path: string; id: Uint8Array; info: Omit<SnapshotInfo, 'pausedMs' | 'totalTimeMs'> }> {
  const { state, memory, pages, parent, signal } = options;
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
    populated: diff ? undefined : populatedPageRanges(memory).map((range) => [range.firstPage * PAGE_SIZE, range.pageCount * PAGE_SIZE] as const),
    signal,
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
