// Expecting a StreamError from the migration stream and snapshot readers.
import type { Test } from 'tap';
import { StreamError } from '../../lib/migration/stream.js';

/** Runs `action` and returns the StreamError it throws or rejects with; fails the test otherwise. */
export async function streamError(t: Test, action: () => unknown): Promise<StreamError> {
  try {
    await action();
  } catch (error) {
    if (error instanceof StreamError) return error;
    t.fail(`expected a StreamError, got ${String(error)}`);
    throw error;
  }
  t.fail('expected a StreamError, nothing was thrown');
  throw new Error('no error');
}

export async function expectStreamError(t: Test, action: () => unknown, code: string, message: string | RegExp): Promise<void> {
  const error = await streamError(t, action);
  t.equal(error.code, code, `code ${code}`);
  if (typeof message === 'string') t.equal(error.message, message);
  else t.match(error.message, message);
}
