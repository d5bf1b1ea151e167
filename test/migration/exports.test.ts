// The public names of lib/migration, from the package root, and its one error class: every error
// it throws carries a code.
import { readdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import t from 'tap';
import * as root from '../../lib/index.js';
import { MigrationError, MigrationErrorCode, NodeKvmError } from '../../lib/index.js';
import { repoRoot } from '../helpers/kvm.js';

t.test('the package root exports the free functions, the error class and its codes, and the snapshot file API', async (t) => {
  for (const name of [
    'snapshotMachine', 'restoreMachine', 'migrateMachine', 'receiveMachine', 'parseMigrationAddress', 'formatMigrationAddress',
    'writeSnapshotFile', 'readSnapshotFile', 'verifyRamImage', 'openSnapshotChain', 'loadSnapshotMemory',
  ]) {
    t.equal(typeof (root as Record<string, unknown>)[name], 'function', name);
  }
  t.equal(root.STREAM_VERSION, 4);
  t.equal(root.MAX_SNAPSHOT_CHAIN, 64);
  t.equal(typeof root.Machine.prototype.migrate, 'function', 'the methods are attached');
  t.equal(typeof root.Machine.incoming, 'function');
});

t.test('MigrationError: a code always, a phase and a cause where they apply', async (t) => {
  const cause = new Error('ECONNRESET');
  const error = new MigrationError(MigrationErrorCode.Closed, 'the destination closed the connection', { phase: 'precopy', cause });
  t.type(error, NodeKvmError);
  t.type(error, Error);
  t.equal(error.name, 'MigrationError');
  t.equal(error.code, 'ECLOSED');
  t.equal(error.phase, 'precopy');
  t.equal(error.cause, cause);
  const bare = new MigrationError('EFORMAT', 'bad');
  t.equal(bare.phase, undefined);
  t.notOk('cause' in bare);
  t.same(Object.values(MigrationErrorCode).sort(), [
    'ABORT_ERR', 'ECANCELED', 'ECHECKSUM', 'ECLOSED', 'ECONNECT', 'EDISKLOCKED', 'EFORMAT', 'EMAGIC', 'EMISMATCH', 'ENOTCONVERGED',
    'ENOTREG', 'EPOSTCOPY', 'EPROTO', 'EREFUSED', 'ERR_INTERNAL', 'ERR_INVALID_STATE', 'ERR_MACHINE_STATE', 'ETIMEDOUT', 'ETOOBIG', 'ETRUNCATED',
    'EUNCONFIRMED', 'EVERSION',
  ]);
});

t.test('lib/migration throws no error without a code: no bare Error, TypeError or RangeError', async (t) => {
  const dir = path.join(repoRoot, 'lib', 'migration');
  for (const file of readdirSync(dir).filter((name) => name.endsWith('.ts'))) {
    const source = readFileSync(path.join(dir, file), 'utf8');
    t.notMatch(source, /new (Error|TypeError|RangeError)\(/, file);
  }
});
