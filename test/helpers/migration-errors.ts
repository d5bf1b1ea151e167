// Expecting a MigrationError from the stream and snapshot readers, the transports and the rest of
// lib/migration.
import type { Test } from 'tap';
import { MigrationError } from '../../lib/migration/errors.js';

/** Runs `action` and returns the MigrationError it throws or rejects with; fails the test otherwise. */
export async function migrationError(t: Test, action: () => unknown): Promise<MigrationError> {
  try {
    await action();
  } catch (error) {
    if (error instanceof MigrationError) return error;
    t.fail(`expected a MigrationError, got ${String(error)}`);
    throw error;
  }
  t.fail('expected a MigrationError, nothing was thrown');
  throw new Error('no error');
}

export async function expectMigrationError(t: Test, action: () => unknown, code: string, message: string | RegExp): Promise<void> {
  const error = await migrationError(t, action);
  t.equal(error.code, code, `code ${code}`);
  if (typeof message === 'string') t.equal(error.message, message);
  else t.match(error.message, message);
}
