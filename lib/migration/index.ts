// Snapshots and live migration over a Machine: free functions, also attached to Machine as
// methods (machine-methods.ts), the one error class of this layer, and the snapshot file API.
import './machine-methods.js';

export { snapshotMachine, restoreMachine } from './snapshot.js';
export { prepareRestore } from './prepared.js';
export { migrateMachine } from './send.js';
export { receiveMachine } from './receive.js';
export { MigrationError, MigrationErrorCode, type MigrationErrorOptions } from './errors.js';
export { STREAM_VERSION } from './format.js';
export { formatMigrationAddress, parseMigrationAddress, type MigrationAddress } from './addresses.js';
export {
  MAX_SNAPSHOT_CHAIN, loadSnapshotMemory, openSnapshotChain, readSnapshotFile, verifyRamImage, writeSnapshotFile,
  type FileIdentity, type LoadSnapshotMemoryOptions, type SnapshotContents, type SnapshotKind, type SnapshotParent, type WriteSnapshotOptions,
  type WriteSnapshotResult,
} from './snapshot-file.js';
export type { DecodedPages } from './pages.js';
export type { RamImage, StreamHeader, StreamKind } from './format.js';
export type {
  AutoConvergeOptions, DirtyLogMode, IncomingConfig, MigrateOptions, MigrationPhase, MigrationProgress, MigrationStats, NonConvergence, PageRange,
  PrepareConfig, PreparedMachine, PreparedMachineState, RestoreConfig, SnapshotInfo, SnapshotOptions, PostcopyMode, PostcopyStats,
} from './types.js';
export { PostcopyPausedError } from './postcopy-destination.js';
