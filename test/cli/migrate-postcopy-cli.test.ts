// `node-kvm migrate --postcopy` (and --postcopy-after-rounds) through a machine's control API:
// the options are checked, and a real guest moves to `run --incoming` by post-copy.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import t, { type Test } from 'tap';
import { callApi } from '../../lib/cli/api-client.js';
import { nodeKvmInProcess, startNodeKvm, type NodeKvmProcess } from '../helpers/cli.js';
import { noKvm, repoRoot } from '../helpers/kvm.js';
import { lastPass } from '../helpers/migration.js';

function socketDir(t: Test): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nkvm-pc-cli-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

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
  const dir = socketDir(t);
  const apiSocket = path.join(dir, 'source.sock');
  const destinationSocket = path.join(dir, 'dest.sock');
  const children: NodeKvmProcess[] = [];
  t.teardown(() => {
    for (const child of children) child.kill('SIGKILL');
  });
  const source = startNodeKvm(['run', path.join(repoRoot, 'guests', 'build', 'dirtier-user.elf'), '--memory', '32M', '--api-socket', apiSocket]);
  children.push(source);
  const destination = startNodeKvm(['run', '--incoming', `unix:${destinationSocket}`]);
  children.push(destination);
  await source.waitFor(/^pass 1 ok$/m);
  await t.rejects(callApi(apiSocket, 'migrate', { address: `unix:${destinationSocket}`, postcopy: 'x' as never }), {
    code: 'ERR_INVALID_ARG_VALUE', message: "migrate: params.postcopy must be true, false or 'after-rounds'",
  }, 'the API refuses a bad mode');
  await destination.waitFor(/^node-kvm: listening for a migration on unix:.*dest\.sock$/m, 'stderr');
  const migrate = await nodeKvmInProcess(['migrate', '--api-socket', apiSocket, '--postcopy', `unix:${destinationSocket}`]);
  t.equal(migrate.status, 0, migrate.stderr);
  t.match(migrate.stdout, /^status +completed\n/);
  t.match(migrate.stdout, /^iterations +0\n/m, 'no pre-copy round');
  t.match(migrate.stdout, /^post-copy +[\d.]+ ms, \d+ pages missing at the switch\n {2}on demand +\d+ pages for \d+ requests \(\d+ faults\)\n {2}background +\d+ pages\n {2}fault latency +p50 [\d.]+ ms, p90 [\d.]+ ms, p99 [\d.]+ ms\n/m);
  const sourceEnd = await source.result;
  t.equal(sourceEnd.status, 0, 'the source exits 0 once the destination has every page');
  const lastAtSource = lastPass(sourceEnd.stdout);
  await destination.waitFor(new RegExp(`^pass ${lastAtSource + 2} ok$`, 'm'));
  t.match(sourceEnd.stdout + destination.stdout(), new RegExp(`pass ${lastAtSource} ok\npass ${lastAtSource + 1} ok\npass ${lastAtSource + 2} ok\n`), 'the count goes on');
  t.notMatch(destination.stdout(), /BAD/);
  destination.kill('SIGTERM');
  await destination.result;
});
