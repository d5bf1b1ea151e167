// `node-kvm migrate`: live-migrates the guest of a running machine through its control API.
import path from 'node:path';
import { formatMigrationAddress, parseMigrationAddress } from '../migration/transport.js';
import { argValueError } from '../kvm/errors.js';
import { callApi, parseApiCommandArgs, requireApiSocket } from './api-client.js';
import type { ApiMigrateParams } from './api-server.js';
import { formatMigrationStats, progressDisplay } from './progress.js';
import { TOKEN_ENV, migrationToken } from './token.js';

export const MIGRATE_USAGE = `usage: node-kvm migrate --api-socket PATH [options] tcp:HOST:PORT|unix:PATH

Live-migrates the guest of a running \`node-kvm run --api-socket PATH\` to a destination waiting
with \`node-kvm run --incoming ADDRESS\`. The guest keeps running while its memory is copied and
pauses only for the last pass; then the source exits 0 and the destination runs the guest. On
any failure the guest keeps running at the source. Progress goes to stderr (a bar on a
terminal), the final figures to stdout.

With --local (a unix:PATH destination on this host) nothing is copied: guest RAM, the disk
images and the TAPs are handed to the destination process as they are, and the guest pauses only
while its CPU and device state goes over, whatever its RAM size. This is how to upgrade node-kvm
under a running guest.

options:
  --api-socket PATH            the source machine's control socket (required)
  --token T                    the destination's token (required for tcp); or set
                               ${TOKEN_ENV}, which other users cannot see in ps
  --downtime-ms N              longest pause of the guest to aim for (default 50)
  --max-iterations N           pre-copy rounds at most (default 30)
  --max-precopy-ms N           pre-copy time at most before the last pass (default 60000)
  --on-non-convergence finish|abort
                               at a cap: pause and finish anyway (default), or give up and
                               keep running here
  --timeout-ms N               give up when connecting or a transfer stalls this long (default 10000);
                               given up (or cut off) once the whole stream is out, the guest stays
                               paused here, as it may run there: resume it only once it does not
  --auto-converge              throttle the guest's vCPUs while it dirties memory faster than
                               the link carries it (each sleeps 20%, then 30%, ... up to 99% of
                               every 10 ms), until the rest fits the downtime; ends with the
                               migration, however it ends
  --postcopy                   post-copy at once: the guest moves to the destination right after
                               the handshake and fetches its pages from here as it touches them
                               (userfaultfd), the rest following in the background. Once the
                               guest runs there it can no longer resume here: a broken connection
                               leaves it paused there until this side reconnects and resumes
  --postcopy-after-rounds      pre-copy as usual, post-copy only where it does not converge
  --postcopy-recovery-ms N     post-copy: keep trying to reconnect this long (default 60000)
  --local                      hand RAM, disks and TAPs to a destination on this host (unix:PATH)
                               instead of copying them
  --json                       print the final figures as JSON
  -h, --help                   show this help`;

/** --token, else the environment's token, else undefined. */

/** A positive decimal integer option, or undefined when not given. */
export function positiveIntegerOption(value: string | undefined, option: string): number | undefined {
  if (value === undefined) return undefined;
  const number = /^\d+$/.test(value) ? Number(value) : NaN;
  if (!Number.isSafeInteger(number) || number < 1) throw argValueError(`${option} must be a positive integer, got '${value}'`);
  return number;
}

export async function migrateCommand(args: string[]): Promise<number> {
  const parsed = parseApiCommandArgs(args, {
    token: { type: 'string' },
    'downtime-ms': { type: 'string' },
    'max-iterations': { type: 'string' },
    'max-precopy-ms': { type: 'string' },
    'on-non-convergence': { type: 'string' },
    'timeout-ms': { type: 'string' },
    'auto-converge': { type: 'boolean' },
    postcopy: { type: 'boolean' },
    'postcopy-after-rounds': { type: 'boolean' },
    'postcopy-recovery-ms': { type: 'string' },
    local: { type: 'boolean' },
    json: { type: 'boolean' },
  }, MIGRATE_USAGE);
  if (!parsed) return 0;
  const { values, positionals } = parsed;
  if (positionals.length !== 1) throw argValueError(`migrate takes one destination ADDRESS, got ${positionals.length} (see node-kvm migrate --help)`);
  const apiSocket = requireApiSocket(values['api-socket'], 'migrate');
  const address = parseMigrationAddress(positionals[0]!);
  const token = migrationToken(values.token);
  if (values.local && address.kind !== 'unix') throw argValueError('--local needs a unix:PATH destination: it hands file descriptors to a process on this host');
  if (address.kind === 'tcp' && token === undefined) throw argValueError(`migrating over tcp needs --token (or ${TOKEN_ENV})`);
  const onNonConvergence = values['on-non-convergence'];
  if (onNonConvergence !== undefined && onNonConvergence !== 'finish' && onNonConvergence !== 'abort') {
    throw argValueError(`--on-non-convergence must be finish or abort, got '${onNonConvergence}'`);
  }
  if (values.postcopy && values['postcopy-after-rounds']) throw argValueError('--postcopy and --postcopy-after-rounds exclude each other');
  const params: ApiMigrateParams = {
    // The machine resolves paths from its own working directory, not ours.
    address: address.kind === 'unix' ? formatMigrationAddress({ kind: 'unix', path: path.resolve(address.path) }) : positionals[0]!,
    token,
    downtimeBudgetMs: positiveIntegerOption(values['downtime-ms'], '--downtime-ms'),
    maxIterations: positiveIntegerOption(values['max-iterations'], '--max-iterations'),
    maxPrecopyMs: positiveIntegerOption(values['max-precopy-ms'], '--max-precopy-ms'),
    onNonConvergence,
    timeoutMs: positiveIntegerOption(values['timeout-ms'], '--timeout-ms'),
    ...(values['auto-converge'] ? { autoConverge: true } : {}),
    postcopy: values.postcopy ? true : values['postcopy-after-rounds'] ? 'after-rounds' : undefined,
    postcopyRecoveryMs: positiveIntegerOption(values['postcopy-recovery-ms'], '--postcopy-recovery-ms'),
    ...(values.local ? { local: true } : {}),
  };
  const display = progressDisplay(process.stderr);
  let stats;
  try {
    stats = await callApi(path.resolve(apiSocket), 'migrate', params, (progress) => display.update(progress));
  } finally {
    display.finish();
  }
  if (values.json) console.log(JSON.stringify(stats, null, 2));
  else process.stdout.write(formatMigrationStats(stats));
  if (stats.phase !== 'completed') {
    console.error(`node-kvm: the migration ended ${stats.phase}`);
    return 1;
  }
  return 0;
}
