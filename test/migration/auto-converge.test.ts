// Auto-converge: pre-copy of a guest that dirties memory faster than rounds can leave nothing
// throttles its vCPUs (each sleeps a rising share of every 10 ms) until a round does, and the
// throttle ends with the migration however it ends.
import t from 'tap';
import { machineInternals } from '../../lib/vmm/machine.js';
import type { Machine, MigrationProgress } from '../../lib/index.js';
import { noKvm } from '../helpers/kvm.js';
import { isUnbrokenCount, lastPass, MiB, startDirtier } from '../helpers/migration.js';
import { startLocalDestination } from '../helpers/migration-peer.js';
import { sharedPool } from '../helpers/pool.js';

const pool = noKvm ? undefined : sharedPool(2);

const TOKEN = 'auto-converge-token';
/** Only a round that leaves nothing at all meets it. */
const TIGHT_BUDGET_MS = 0.0001;
const GUEST = { memoryBytes: 32 * MiB, rangeBytes: 4 * MiB };
/** Outside the dirtier's range: pages the VMM dirties in a round, whatever the guest does. */
const SCRATCH_ADDR = 16 * MiB;
/** Where the dirtier's range starts (guests/dirtier.S). */
const RANGE_START = 2 * MiB;
const scratch = new Uint8Array(64 * 1024).fill(0x5a);
/** How long the time-capped migrations pre-copy: long enough to measure the guest's pace. */
const PRECOPY_MS = 800;

/**
 * Starts the throttle's ticker thread and waits for it: under the test's TypeScript loader a new
 * thread takes a second or more to load (built, some 20 ms), longer than these pre-copies last.
 */
async function tickerLoaded(throttle: ReturnType<typeof machineInternals>['vcpuThrottle']): Promise<void> {
  throttle.prepare();
  while (!throttle.ticking) await new Promise((resolve) => setTimeout(resolve, 10));
}

/**
 * The pass the dirtier is in, read from its range's first quadword ((pass << 40) | address): its
 * console lags while the main thread is busy with a migration, its memory does not.
 */
function guestPass(machine: Machine): number {
  const ram = machine.memory.bytes();
  return Number(new DataView(ram.buffer, ram.byteOffset + RANGE_START, 8).getBigUint64(0, true) >> 40n);
}

/** Passes per second the guest makes over `windowMs`. */
async function passRate(machine: Machine, windowMs: number): Promise<number> {
  const firstPass = guestPass(machine);
  const started = performance.now();
  await new Promise((resolve) => setTimeout(resolve, windowMs));
  return ((guestPass(machine) - firstPass) * 1000) / (performance.now() - started);
}

t.test('a guest that outpaces pre-copy is throttled, more and more, until a round leaves nothing; then it completes', { skip: noKvm }, async (t) => {
  const destination = startLocalDestination(t, 'tcp:127.0.0.1:0', { token: TOKEN, pool });
  const source = await startDirtier({ ...GUEST, config: { pool } });
  t.teardown(() => source.machine.stop());
  await source.waitForOutput('pass 1 ok\n');
  const throttle = machineInternals(source.machine).vcpuThrottle;
  await tickerLoaded(throttle);
  const rounds: MigrationProgress[] = [];
  const stats = await source.machine.migrate(await destination.listening, {
    token: TOKEN, downtimeBudgetMs: TIGHT_BUDGET_MS, maxIterations: 200, onNonConvergence: 'abort', autoConverge: true,
    onProgress: (p) => {
      // Until the throttle is well up, the VMM dirties pages too: a round the guest's vCPU did
      // not get to run in (a busy host) must not end pre-copy before the throttle shows.
      if ((p.phase === 'setup' || p.phase === 'precopy') && p.cpuThrottlePercentage < 90) source.machine.writeMemory(SCRATCH_ADDR, scratch);
      if (p.phase === 'precopy') rounds.push(p);
    },
  });
  t.equal(stats.phase, 'completed', 'it converged under a budget only an empty round meets');
  const shares = rounds.map((p) => p.cpuThrottlePercentage);
  t.equal(shares[0], 0, 'the first round runs unthrottled');
  t.ok(shares.every((share, i) => i === 0 || share >= shares[i - 1]!), `the share only rises (${[...new Set(shares)].join(', ')})`);
  t.ok([...new Set(shares)].every((share) => share === 0 || (share >= 20 && share <= 99 && (share === 99 || share % 10 === 0))), 'from 20 % in steps of 10 % up to 99 %');
  t.ok(stats.cpuThrottlePercentage >= 90, `the guest paused at a share of ${stats.cpuThrottlePercentage} %`);
  t.ok(stats.throttledMs > 0, `throttled for ${stats.throttledMs.toFixed(1)} ms`);
  t.equal((await source.machine.wait()).reason, 'migrated');
  t.equal(throttle.percent, 0, 'the throttle ended with the source machine');
  const sourceOutput = source.output();
  await destination.arrived;
  await destination.waitForOutput(`pass ${lastPass(sourceOutput) + 2} ok\n`);
  const output = sourceOutput + destination.output();
  t.notMatch(output, /BAD/, 'the guest found no page lost');
  t.ok(isUnbrokenCount(output), 'one unbroken count across the move');
});

t.test('without auto-converge it does not converge; with it the guest slows down while throttled and runs at full speed after the failure', { skip: noKvm }, async (t) => {
  const source = await startDirtier({ ...GUEST, config: { pool } });
  t.teardown(() => source.machine.stop());
  await source.waitForOutput('pass 2 ok\n');
  const throttle = machineInternals(source.machine).vcpuThrottle;
  const before = await passRate(source.machine, 200);

  /** A migration capped at PRECOPY_MS that cannot converge (the VMM dirties pages every round); the guest's pace while throttled at 99 % (or all along, without). */
  const failedMigration = async (autoConverge: boolean) => {
    const destination = startLocalDestination(t, 'tcp:127.0.0.1:0', { token: TOKEN, pool });
    if (autoConverge) await tickerLoaded(throttle);
    // From the first round at 99 % (or the first round) to the last: after it, the guest runs
    // unthrottled while the failure is reported.
    let measureFrom: { at: number; pass: number } | null = null;
    let measureTo: { at: number; pass: number } | null = null;
    let last: MigrationProgress | null = null;
    const error = await source.machine.migrate(await destination.listening, {
      token: TOKEN, downtimeBudgetMs: TIGHT_BUDGET_MS, maxIterations: 1_000_000, maxPrecopyMs: PRECOPY_MS, onNonConvergence: 'abort', autoConverge,
      onProgress: (p) => {
        if (p.phase === 'setup' || p.phase === 'precopy') source.machine.writeMemory(SCRATCH_ADDR, scratch);
        if (p.phase === 'precopy' && (measureFrom || !autoConverge || p.cpuThrottlePercentage === 99)) {
          const sample = { at: performance.now(), pass: guestPass(source.machine) };
          measureFrom ??= sample;
          measureTo = sample;
        }
        last = p;
      },
    }).then(() => null, (e: Error & { code?: string }) => e);
    t.equal(error?.code, 'ENOTCONVERGED', `${autoConverge ? 'with' : 'without'} auto-converge: ENOTCONVERGED at the time cap`);
    const from = measureFrom as { at: number; pass: number } | null;
    const to = measureTo as { at: number; pass: number } | null;
    t.ok(from && to && to.at - from.at > PRECOPY_MS / 2, 'the rate was measured over most of the pre-copy');
    const rate = from && to ? ((to.pass - from.pass) * 1000) / (to.at - from.at) : NaN;
    await t.rejects(destination.arrived, /gave up|dirties memory faster/, 'the destination was told');
    return { rate, last: last as MigrationProgress | null };
  };

  const unthrottled = await failedMigration(false);
  t.equal(unthrottled.last?.throttledMs, 0, 'without auto-converge nothing is throttled');
  const throttled = await failedMigration(true);
  t.equal(throttled.last?.phase, 'failed');
  t.equal(throttled.last?.cpuThrottlePercentage, 99, 'the failed migration had reached 99 %');
  t.ok(throttled.rate < unthrottled.rate * 0.25, `at 99 % the guest dirties far less: ${throttled.rate.toFixed(1)} passes/s against ${unthrottled.rate.toFixed(1)} unthrottled during pre-copy`);
  t.equal(throttle.percent, 0, 'the throttle ended with the migration');
  t.equal(source.machine.state, 'running', 'the guest runs on here');
  const after = await passRate(source.machine, 200);
  t.ok(after > before * 0.5, `its pace recovers: ${after.toFixed(1)} passes/s, ${before.toFixed(1)} before the migrations`);
  t.notMatch(source.output(), /BAD/);
  t.ok(isUnbrokenCount(source.output()), 'the guest goes on here unharmed');
});

t.test('migrate() refuses bad auto-converge options before connecting', { skip: noKvm }, async (t) => {
  const source = await startDirtier({ config: { pool } });
  t.teardown(() => source.machine.stop());
  const refused = async (autoConverge: unknown, error: RegExp, type: typeof RangeError | typeof TypeError = RangeError) => {
    await t.rejects(source.machine.migrate('tcp:127.0.0.1:1', { token: TOKEN, autoConverge: autoConverge as boolean }), error);
    await t.rejects(source.machine.migrate('tcp:127.0.0.1:1', { token: TOKEN, autoConverge: autoConverge as boolean }), type);
  };
  await refused({ throttleInitial: 0 }, /throttleInitial must be an integer percentage 1\.\.99, got 0/);
  await refused({ throttleIncrement: 100 }, /throttleIncrement must be an integer percentage 1\.\.99, got 100/);
  await refused({ throttleMax: 12.5 }, /throttleMax must be an integer percentage 1\.\.99, got 12\.5/);
  await refused({ throttleInitial: 50, throttleMax: 40 }, /throttleMax \(40\) must be at least throttleInitial \(50\)/);
  await refused({ throttleStep: 5 }, /unknown option 'throttleStep'/);
  await refused('yes', /autoConverge must be a boolean or an object/, TypeError);
  t.equal(machineInternals(source.machine).vcpuThrottle.percent, 0);
  t.equal(source.machine.state, 'running');
});
