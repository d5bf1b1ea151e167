// Snapshots and live migration over a Machine: free functions, also attached to Machine as
// methods (machine-methods.ts).
import './machine-methods.js';

export { snapshotMachine, restoreMachine } from './snapshot.js';
export { migrateMachine, MigrationError } from './send.js';
export { receiveMachine } from './receive.js';
export type {
  IncomingConfig, MigrateOptions, MigrationPhase, MigrationProgress, MigrationStats, NonConvergence, RestoreConfig, SnapshotInfo,
  SnapshotOptions,
} from './types.js';
