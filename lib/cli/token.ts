// The migration token of `run --incoming` and `migrate`: from --token or the environment. Apart
// from migrate.ts so that `run` loads no migration code unless it migrates.
import { argValueError } from '../kvm/errors.js';

/** The environment variable the migration token may come from instead of --token. */
export const TOKEN_ENV = 'NODE_KVM_MIGRATION_TOKEN';

export function migrationToken(option: string | undefined): string | undefined {
  const token = option ?? process.env[TOKEN_ENV];
  if (token === '') throw argValueError(option === undefined ? `${TOKEN_ENV} is empty` : '--token must not be empty');
  return token;
}
