// A machine built ahead of a restore (Machine.prepare()): the VM, its memory slot, the in-kernel
// interrupt controllers and PIT, the devices and every vCPU, created on its thread, are made
// before the snapshot is wanted, so that a restore into it (restoreMachine(path, { prepared }))
// only reads the snapshot and puts its state and RAM in: no kernel object is created then, and
// none of the grace periods their creation waits for falls into the restore.
import { argTypeError, argValueError } from '../kvm/errors.js';
import { GuestMemory } from '../kvm/memory.js';
import { shapeMismatch } from '../vmm/builder.js';
import { describeShape } from '../vmm/config.js';
import { buildMachine, machineInternals, type Machine, type MachineShape } from '../vmm/machine.js';
import { MigrationError, MigrationErrorCode as Code, abortable, checkSignal, throwIfAborted } from './errors.js';
import { loadSnapshot, type LoadedSnapshot } from './snapshot-load.js';
import { rehearseRestore } from './warm-up.js';
import type { PrepareConfig, PreparedMachine, PreparedMachineState, RestoreConfig } from './types.js';

/** Dry runs of a restore's state at the end of Machine.prepare(), so that the restore runs warm code. */
const WARM_UP_ROUNDS = 4;

/** A prepared machine's built machine and its state, kept off the object, which shows only what a user needs. */
interface Prepared {
  machine: Machine | null;
  state: PreparedMachineState;
  /** close() called while a restore held it: settles once that restore has used or released it. */
  closing: Promise<void> | null;
  settle: (() => void) | null;
}
const records = new WeakMap<PreparedMachine, Prepared>();
let wrap!: (machine: Machine) => PreparedMachine;

/** Machine.prepare()'s result (PreparedMachine in types.ts). */
class PreparedMachineHandle implements PreparedMachine {
  readonly shape: MachineShape;

  static {
    wrap = (machine) => new PreparedMachineHandle(machine);
  }

  private constructor(machine: Machine) {
    this.shape = machine.shape;
    records.set(this, { machine, state: 'ready', closing: null, settle: null });
  }

  get state(): PreparedMachineState {
    return records.get(this)!.state;
  }

  async close(): Promise<void> {
    const record = records.get(this)!;
    if (record.state === 'restoring') {
      record.closing ??= new Promise((resolve) => (record.settle = resolve));
      return record.closing;
    }
    if (record.state !== 'ready') return;
    const machine = record.machine!;
    record.state = 'closed';
    record.machine = null;
    await machine.stop();
  }
}

/**
 * Takes `prepared` for a restore: its machine, with release() (the snapshot did not fit: ready
 * again, nothing lost) and consume() (the machine is the restore's from now on).
 */
export function claimPrepared(prepared: PreparedMachine): { machine: Machine; release(): void; consume(): void } {
  const record = typeof prepared === 'object' && prepared !== null ? records.get(prepared) : undefined;
  if (!record) throw argTypeError('prepared must be a PreparedMachine (from Machine.prepare())');
  if (record.state !== 'ready') {
    const why = { restoring: 'a restore into it is under way', used: 'a restore has used it already', closed: 'it was closed' }[record.state];
    throw new MigrationError(Code.MachineState, `this prepared machine cannot take a restore: ${why}`);
  }
  record.state = 'restoring';
  const settle = () => {
    record.settle?.();
    record.closing = null;
    record.settle = null;
  };
  return {
    machine: record.machine!,
    release: () => {
      record.state = 'ready';
      if (!record.closing) return;
      // close() was called meanwhile: it resolves once the machine is stopped.
      const done = settle;
      void prepared.close().finally(done);
    },
    consume: () => {
      record.state = 'used';
      record.machine = null;
      settle();
    },
  };
}

/**
 * Builds a machine of the shape of the snapshot at `path` (RAM size, vCPUs, irqchip, disks and
 * other devices, opened where `config` says, as for a restore), ready for
 * `Machine.restore(snapshot, { prepared })` of that snapshot or any other of the same shape.
 * The runtime options (serial output, pool, log, disks, ...) are given here, not to the restore.
 */
export async function prepareRestore(path: string, config: PrepareConfig = {}): Promise<PreparedMachine> {
  if (typeof path !== 'string' || path === '') throw argTypeError('path must be a snapshot file path');
  if (typeof config !== 'object' || config === null) throw argTypeError('config must be an object');
  const signal = checkSignal(config.signal, 'config.signal');
  const what = `preparing a machine for ${path}`;
  throwIfAborted(signal, what);
  // Only the shape: which snapshot is restored is the restore's business.
  const snapshot = await loadSnapshot(path, { verify: false });
  throwIfAborted(signal, what);
  const shape = snapshot.state.shape;
  const machine = await abortable(buildMachine({
    shape,
    boot: null,
    // Fresh RAM (a memfd): a restore writes only the pages the snapshot holds.
    memory: (size) => GuestMemory.create(size, { backing: 'memfd' }),
    runtime: config,
    savedDisks: shape.disks ?? [],
    signal,
  }), signal, what);
  try {
    throwIfAborted(signal, what);
    await rehearseRestore(machine, WARM_UP_ROUNDS);
  } catch (error) {
    await machine.stop();
    throw error;
  }
  return wrap(machine);
}

/** What a restore into a prepared machine may be given: the rest went to Machine.prepare(). */
const PREPARED_RESTORE_OPTIONS = new Set(['prepared', 'verify', 'signal']);

/**
 * restoreMachine(path, { prepared }): the snapshot checked against the prepared machine (which
 * it leaves ready if it does not fit), its RAM written in and its state put on; the machine,
 * created, not yet started.
 */
export async function restoreIntoPrepared(path: string, prepared: PreparedMachine, config: RestoreConfig, signal: AbortSignal | undefined, what: string): Promise<Machine> {
  const extra = Object.keys(config).filter((key) => !PREPARED_RESTORE_OPTIONS.has(key) && config[key as keyof RestoreConfig] !== undefined);
  if (extra.length > 0) throw argValueError(`a restore into a prepared machine takes its runtime options from Machine.prepare(): ${extra.join(', ')} given here`);
  const claim = claimPrepared(prepared);
  let snapshot: LoadedSnapshot;
  try {
    snapshot = await loadSnapshot(path, { verify: !!config.verify });
    throwIfAborted(signal, what);
    const unfit = preparedMismatch(prepared.shape, snapshot.state.shape);
    if (unfit) throw new MigrationError(Code.Mismatch, `${path}: ${unfit}`);
  } catch (error) {
    // Nothing of it was touched: ready for another snapshot.
    claim.release();
    throw error;
  }
  claim.consume();
  const machine = claim.machine;
  try {
    snapshot.fillMemory(machine.memory);
    await machineInternals(machine).applyState(snapshot.state);
    throwIfAborted(signal, what);
  } catch (error) {
    await machine.stop();
    throw error;
  }
  return machine;
}

/** Why `prepared` cannot take a snapshot of `shape`, or null if it can. */
export function preparedMismatch(prepared: MachineShape, shape: MachineShape): string | null {
  const why = shapeMismatch(shape, prepared);
  if (why === null) return null;
  if (why === 'different hardware') return `the snapshot is of a machine with ${describeShape(shape)}, the prepared one has ${describeShape(prepared)}`;
  return `the snapshot's devices do not fit the prepared machine: ${why}`;
}
