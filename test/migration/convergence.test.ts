// Pre-copy that cannot converge (a downtime budget no round can meet): at the iteration cap it
// either finishes anyway or gives up, as configured.
import t from 'tap';
import { noKvm } from '../helpers/kvm.js';
import { isUnbrokenCount, lastPass, MiB, startDirtier } from '../helpers/migration.js';
import { startDestination } from '../helpers/migration-peer.js';

const TOKEN = 'convergence-token';
const UNREACHABLE_BUDGET = { downtimeBudgetMs: 0.0001, maxIterations: 3 };
/** Outside the dirtier's range: what the VMM writes there is dirty in every round, so no round is the last. */
const SCRATCH_ADDR = 16 * MiB;
const scratch = new Uint8Array(64 * 1024).fill(0x5a);

t.test('onNonConvergence "abort": the migration gives up at the cap, the guest runs on here', { skip: noKvm }, async (t) => {
  const destination = startDestination('tcp:127.0.0.1:0', TOKEN);
  t.teardown(() => destination.child.kill('SIGKILL'));
  const source = await startDirtier({ memoryBytes: 32 * MiB, rangeBytes: 4 * MiB });
  t.teardown(() => source.machine.stop());
  await source.waitForOutput('pass 1 ok\n');
  const rounds: number[] = [];
  const error = await source.machine.migrate(await destination.listening, {
    token: TOKEN, ...UNREACHABLE_BUDGET, onNonConvergence: 'abort',
    onProgress: (p) => {
      // From setup on (its progress comes after the tracker's first harvest), so that even a
      // round in which the guest's vCPU did not get to run leaves pages to send.
      if (p.phase === 'setup' || p.phase === 'precopy') source.machine.writeMemory(SCRATCH_ADDR, scratch);
      if (p.phase === 'precopy') rounds.push(p.iterations);
    },
  }).then(() => null, (e: Error & { code?: string }) => e);
  t.equal(error?.code, 'ENOTCONVERGED', 'a MigrationError with code ENOTCONVERGED');
  t.match(error?.message, /dirties memory faster than it can be sent: \d+ pages left after 3 rounds .* the guest runs on here/);
  t.same(rounds, [1, 2, 3], 'three rounds, then the cap');
  t.equal(source.machine.state, 'running');
  if (source.machine.state !== 'running') return;
  const pass = lastPass(source.output());
  await source.waitForOutput(`pass ${pass + 2} ok\n`);
  t.ok(isUnbrokenCount(source.output()), 'the guest goes on here unharmed');
  const result = await destination.result;
  t.match(result.report.error, /the source gave up: .*dirties memory faster/, 'the destination was told why');
  t.equal(result.status, 1);
});

t.test('onNonConvergence "finish" (the default): it pauses at the cap and completes', { skip: noKvm }, async (t) => {
  const destination = startDestination('tcp:127.0.0.1:0', TOKEN);
  t.teardown(() => destination.child.kill('SIGKILL'));
  const source = await startDirtier({ memoryBytes: 32 * MiB, rangeBytes: 4 * MiB });
  t.teardown(() => source.machine.stop());
  await source.waitForOutput('pass 1 ok\n');
  const stats = await source.machine.migrate(await destination.listening, {
    token: TOKEN, ...UNREACHABLE_BUDGET,
    onProgress: (p) => (p.phase === 'setup' || p.phase === 'precopy') && source.machine.writeMemory(SCRATCH_ADDR, scratch),
  });
  t.equal(stats.phase, 'completed');
  t.equal(stats.iterations, 3);
  t.ok(stats.pagesResent >= 32, `pages written after they were sent went again (${stats.pagesResent})`);
  t.equal((await source.machine.wait()).reason, 'migrated');
  const sourceOutput = source.output();
  await destination.waitForOutput(`pass ${lastPass(sourceOutput) + 2} ok\n`);
  destination.child.kill('SIGTERM');
  await destination.result;
  t.ok(isUnbrokenCount(sourceOutput + destination.output()), 'one unbroken count across the move');
});

t.test('migrate() checks its options before connecting', { skip: noKvm }, async (t) => {
  const source = await startDirtier();
  t.teardown(() => source.machine.stop());
  await t.rejects(source.machine.migrate('tcp:127.0.0.1:1', { downtimeBudgetMs: -1 }), RangeError);
  await t.rejects(source.machine.migrate('tcp:127.0.0.1:1', { maxIterations: 1.5 }), RangeError);
  await t.rejects(source.machine.migrate('tcp:127.0.0.1:1', { onNonConvergence: 'maybe' as 'abort' }), RangeError);
  await t.rejects(source.machine.migrate('ftp:somewhere'), /tcp:HOST:PORT|unix:PATH/);
  await t.rejects(source.machine.migrate('tcp:127.0.0.1:1'), /token/, 'tcp without a token');
  t.equal(source.machine.state, 'running');
});
