// Post-copy: the guest runs at the destination before its pages have all arrived; those it
// touches are fetched on demand through userfaultfd, the rest stream in the background. The
// dirtier's own check (each pass checks the previous pass's pattern) catches a lost or stale page.
import { mkdtempSync, rmSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { tmpdir } from 'node:os';
import path from 'node:path';
import t from 'tap';
import type { MigrationProgress } from '../../lib/migration/types.js';
import { noKvm } from '../helpers/kvm.js';
import { isUnbrokenCount, lastPass, memoryHash, MiB, startDirtier } from '../helpers/migration.js';
import { startLocalDestination } from '../helpers/migration-peer.js';
import { sharedPool } from '../helpers/pool.js';

const pool = noKvm ? undefined : sharedPool(2);

const socketPath = (t: { teardown(fn: () => void): void }) => {
  const dir = mkdtempSync(path.join(tmpdir(), 'node-kvm-postcopy-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  return `unix:${path.join(dir, 'migrate.sock')}`;
};

t.test('postcopy: true moves the dirtier at once; its count goes on without BAD; a filled region arrives intact', { skip: noKvm }, async (t) => {
  const destination = startLocalDestination(t, socketPath(t), { pool });
  const source = await startDirtier({ memoryBytes: 64 * MiB, rangeBytes: 4 * MiB, config: { pool } });
  t.teardown(() => source.machine.stop());
  // Random bytes the guest never touches: they arrive only through faults or the background stream.
  const filled = { addr: 32 * MiB, bytes: randomBytes(8 * MiB) };
  source.machine.writeMemory(filled.addr, filled.bytes);
  await source.waitForOutput('pass 2 ok\n');
  const phases: string[] = [];
  const stats = await source.machine.migrate(await destination.listening, { postcopy: true, onProgress: (p: MigrationProgress) => phases.push(p.phase) });
  t.equal((await source.machine.wait()).reason, 'migrated', 'the source ends as migrated once the destination has every page');
  t.equal(stats.phase, 'completed');
  t.equal(stats.iterations, 0, 'no pre-copy round');
  t.ok(phases.includes('postcopy'), `a postcopy phase (${[...new Set(phases)].join(', ')})`);
  const postcopy = stats.postcopy!;
  t.ok(postcopy, 'post-copy figures');
  t.ok(postcopy.missingPages >= 1024 + 2048, `the range and the filled region were missing (${postcopy.missingPages} pages)`);
  t.equal(postcopy.pagesOnDemand + postcopy.pagesBackground, postcopy.missingPages, 'every missing page went once');
  // Faults depend on scheduling (the background stream may outrun a vCPU that waits for a CPU);
  // postcopy-recovery.test.ts holds the stream back to make one certain.
  t.ok(postcopy.pagesOnDemand <= postcopy.missingPages, `${postcopy.faults} faults, ${postcopy.requests} requests, ${postcopy.pagesOnDemand} pages on demand`);
  t.ok(postcopy.faultLatencyMs.p50 <= postcopy.faultLatencyMs.p90 && postcopy.faultLatencyMs.p90 <= postcopy.faultLatencyMs.p99, 'percentiles in order');
  t.ok(postcopy.durationMs > 0, `post-copy took ${postcopy.durationMs.toFixed(1)} ms`);
  t.ok(stats.downtimeMs > 0 && stats.downtimeMs < stats.totalTimeMs, `downtime ${stats.downtimeMs.toFixed(2)} ms`);

  const machine = await destination.arrived;
  const sourceOutput = source.output();
  await destination.waitForOutput(`pass ${lastPass(sourceOutput) + 2} ok\n`);
  t.ok(isUnbrokenCount(sourceOutput + destination.output()), 'one unbroken count across the move');
  t.notMatch(destination.output(), /BAD/);
  t.same(Buffer.from(machine.memory.bytes(filled.addr, filled.bytes.length)).equals(filled.bytes), true, 'the filled region arrived byte for byte');
});

/** Outside the dirtier's range: what the VMM writes there is dirty in every round, so no round is the last. */
const SCRATCH_ADDR = 16 * MiB;
const scratch = new Uint8Array(64 * 1024).fill(0x5a);

t.test("postcopy: 'after-rounds' switches to post-copy where pre-copy does not converge", { skip: noKvm }, async (t) => {
  const destination = startLocalDestination(t, socketPath(t), { pool });
  const source = await startDirtier({ memoryBytes: 32 * MiB, rangeBytes: 4 * MiB, config: { pool } });
  t.teardown(() => source.machine.stop());
  await source.waitForOutput('pass 1 ok\n');
  const stats = await source.machine.migrate(await destination.listening, {
    postcopy: 'after-rounds', downtimeBudgetMs: 0.0001, maxIterations: 3,
    onProgress: (p) => (p.phase === 'setup' || p.phase === 'precopy') && source.machine.writeMemory(SCRATCH_ADDR, scratch),
  });
  t.equal(stats.iterations, 3, 'three pre-copy rounds, then the cap');
  t.ok(stats.postcopy, 'then post-copy');
  const postcopy = stats.postcopy!;
  t.ok(postcopy.missingPages >= 16, `what was dirtied since it was sent was missing (${postcopy.missingPages} pages, the scratch's 16 among them)`);
  t.ok(postcopy.missingPages < 32 * 256, 'not the whole RAM');
  t.equal(postcopy.pagesOnDemand + postcopy.pagesBackground, postcopy.missingPages);
  t.equal((await source.machine.wait()).reason, 'migrated');
  const machine = await destination.arrived;
  const sourceOutput = source.output();
  await destination.waitForOutput(`pass ${lastPass(sourceOutput) + 2} ok\n`);
  t.ok(isUnbrokenCount(sourceOutput + destination.output()), 'one unbroken count across the move');
  t.notMatch(destination.output(), /BAD/);
  t.same(machine.memory.bytes(SCRATCH_ADDR, scratch.length), scratch, 'the last write of the scratch arrived');
});

t.test("postcopy: 'after-rounds' where pre-copy converges finishes as pre-copy", { skip: noKvm }, async (t) => {
  const destination = startLocalDestination(t, socketPath(t), { pool });
  const source = await startDirtier({ memoryBytes: 32 * MiB, rangeBytes: 64 * 1024, config: { pool } });
  t.teardown(() => source.machine.stop());
  await source.waitForOutput('pass 1 ok\n');
  const stats = await source.machine.migrate(await destination.listening, { postcopy: 'after-rounds' });
  t.equal(stats.postcopy, undefined, 'no post-copy');
  t.equal((await source.machine.wait()).reason, 'migrated');
  const sourceOutput = source.output();
  await destination.waitForOutput(`pass ${lastPass(sourceOutput) + 2} ok\n`);
  t.ok(isUnbrokenCount(sourceOutput + destination.output()));
});

t.test('a paused guest moved by post-copy arrives paused with the same memory, every page', { skip: noKvm }, async (t) => {
  const destination = startLocalDestination(t, socketPath(t), { pool });
  const source = await startDirtier({ memoryBytes: 32 * MiB, rangeBytes: MiB, config: { pool } });
  t.teardown(() => source.machine.stop());
  await source.waitForOutput('pass 1 ok\n');
  await source.machine.pause();
  source.machine.writeMemory(20 * MiB, randomBytes(2 * MiB));
  const hash = memoryHash(source.machine.memory);
  const stats = await source.machine.migrate(await destination.listening, { postcopy: true });
  t.equal(stats.postcopy!.faults, 0, 'a paused guest takes no faults: all came in the background');
  t.equal(stats.postcopy!.pagesBackground, stats.postcopy!.missingPages);
  const machine = await destination.arrived;
  t.equal(machine.state, 'paused');
  t.equal(memoryHash(machine.memory), hash, 'SHA-256 of the whole RAM equal');
});

t.test('bad post-copy options are refused before connecting; the guest runs on', { skip: noKvm }, async (t) => {
  const source = await startDirtier({ config: { pool } });
  t.teardown(() => source.machine.stop());
  await t.rejects(source.machine.migrate('unix:/nonexistent/x', { postcopy: 'x' as 'after-rounds' }), {
    name: 'RangeError', code: 'ERR_INVALID_ARG_VALUE', message: "postcopy must be true, false or 'after-rounds', got 'x'",
  });
  await t.rejects(source.machine.migrate('unix:/nonexistent/x', { postcopy: 1 as unknown as boolean }), { code: 'ERR_INVALID_ARG_VALUE', message: /got 1$/ });
  await t.rejects(source.machine.migrate('unix:/nonexistent/x', { postcopy: true, postcopyRecoveryMs: -5 }), { code: 'ERR_OUT_OF_RANGE' });
  t.equal(source.machine.state, 'running');
});
