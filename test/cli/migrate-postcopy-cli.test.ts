// `node-kvm migrate --postcopy` (and --postcopy-after-rounds) through a machine's control API:
// the options are checked, and a real guest moves to `run --incoming` by post-copy.
import path from 'node:path';
import t from 'tap';
import { callApi } from '../../lib/cli/api-client.js';
import { nodeKvmInProcess } from '../helpers/cli.js';
import { countGoesOn, destinationListening, socketDir, startRunPair } from '../helpers/cli-migration.js';
import { noKvm } from '../helpers/kvm.js';

t.test('--postcopy options are checked', async (t) => {
  const missing = path.join(socketDir(t), 'nobody.sock');
  const both = await nodeKvmInProcess(['migrate', '--api-socket', missing, 'unix:/x.sock', '--postcopy', '--postcopy-after-rounds']);
  t.equal(both.status, 1);
  t.equal(both.stderr, 'node-kvm: --postcopy and --postcopy-after-rounds exclude each other\n');
  const recovery = await nodeKvmInProcess(['migrate', '--api-socket', missing, 'unix:/x.sock', '--postcopy', '--postcopy-recovery-ms', 'never']);
  t.equal(recovery.stderr, "node-kvm: --postcopy-recovery-ms must be a positive integer, got 'never'\n");
  const help = await nodeKvmInProcess(['migrate', '--help']);
  t.match(help.stdout, /--postcopy {2,}post-copy at once.*can no longer resume here/s);
});

t.test('migrate --postcopy moves a real guest to run --incoming', { skip: noKvm }, async (t) => {
  const pair = await startRunPair(t, '32M');
  const { apiSocket, destinationSocket, source, destination } = pair;
  await t.rejects(callApi(apiSocket, 'migrate', { address: `unix:${destinationSocket}`, postcopy: 'x' as never }), {
    code: 'ERR_INVALID_ARG_VALUE', message: "migrate: params.postcopy must be true, false or 'after-rounds'",
  }, 'the API refuses a bad mode');
  await destinationListening(pair);
  const migrate = await nodeKvmInProcess(['migrate', '--api-socket', apiSocket, '--postcopy', `unix:${destinationSocket}`]);
  t.equal(migrate.status, 0, migrate.stderr);
  t.match(migrate.stdout, /^status +completed\n/);
  t.match(migrate.stdout, /^iterations +0\n/m, 'no pre-copy round');
  t.match(migrate.stdout, /^post-copy +[\d.]+ ms, \d+ pages missing at the switch\n {2}on demand +\d+ pages for \d+ requests \(\d+ faults\)\n {2}background +\d+ pages\n {2}fault latency +p50 [\d.]+ ms, p90 [\d.]+ ms, p99 [\d.]+ ms\n/m);
  const sourceEnd = await source.result;
  t.equal(sourceEnd.status, 0, 'the source exits 0 once the destination has every page');
  await countGoesOn(t, sourceEnd, destination);
});
