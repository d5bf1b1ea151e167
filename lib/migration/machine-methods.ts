// Snapshots and migrations as methods of Machine (machine.snapshot(), machine.migrate(),
// Machine.restore(), Machine.prepare(), Machine.incoming()), attached here, above the VMM, as
// better-sqlite3 attaches its capabilities to Database: the VMM never imports persistence, and the package's entry
// (lib/index.ts) loads this module, so that a Machine from the package has them all.
import { Machine, afterNextMachineStart } from '../vmm/machine.js';
import { receiveMachine } from './receive.js';
import { migrateMachine } from './send.js';
import { prepareRestore } from './prepared.js';
import { restoreMachine, snapshotMachine } from './snapshot.js';
import { cutSourceWarmUpShort, warmUpMigrationSource, warmUpStateSaving } from './source-warm-up.js';
import type { IncomingConfig, MigrateOptions, MigrationProgress, MigrationStats, PrepareConfig, PreparedMachine, RestoreConfig, SnapshotInfo, SnapshotOptions } from './types.js';

declare module '../vmm/machine.js' {
  interface Machine {
    /** During machine.migrate(): the statistics after every round and at each phase change (as onProgress). */
    on(event: 'progress', listener: (progress: MigrationProgress) => void): this;
    /** As on('progress'), for the next statistics only. */
    once(event: 'progress', listener: (progress: MigrationProgress) => void): this;
    /** Removes a listener on('progress') added. */
    off(event: 'progress', listener: (progress: MigrationProgress) => void): this;
    /** snapshotMachine(this, path, options). */
    snapshot(path: string, options?: SnapshotOptions): Promise<SnapshotInfo>;
    /** migrateMachine(this, address, options). */
    migrate(address: string, options?: MigrateOptions): Promise<MigrationStats>;
  }
  // eslint-disable-next-line @typescript-eslint/no-namespace
  namespace Machine {
    /** restoreMachine(path, config). */
    function restore(path: string, config?: RestoreConfig): Promise<Machine>;
    /** prepareRestore(path, config). */
    function prepare(path: string, config?: PrepareConfig): Promise<PreparedMachine>;
    /** receiveMachine(address, config). */
    function incoming(address: string, config?: IncomingConfig): Promise<Machine>;
  }
}

Object.defineProperties(Machine.prototype, {
  snapshot: {
    value: function snapshot(this: Machine, path: string, options?: SnapshotOptions) {
      return snapshotMachine(this, path, options);
    },
    writable: true,
    configurable: true,
  },
  migrate: {
    value: function migrate(this: Machine, address: string, options?: MigrateOptions) {
      // The rehearsal of the first machine's start may still be under way: it would compete.
      cutSourceWarmUpShort();
      return migrateMachine(this, address, options);
    },
    writable: true,
    configurable: true,
  },
});
Object.defineProperties(Machine, {
  restore: { value: restoreMachine, writable: true, configurable: true },
  prepare: { value: prepareRestore, writable: true, configurable: true },
  incoming: { value: receiveMachine, writable: true, configurable: true },
});
// A machine booted here may be migrated: its process rehearses the source's code while it runs.
afterNextMachineStart((machine) => {
  void warmUpMigrationSource();
  void warmUpStateSaving(machine);
});
