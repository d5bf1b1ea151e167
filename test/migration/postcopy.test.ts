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
  t.ok(postcopy.faults >= 1, `the guest faulted (${postcopy.faults} faults, ${postcopy.requests} requests)`);
  t.ok(postcopy.faultLatencyMs.p50 <= postcopy.faultLatencyMs.p90 && postcopy.faultLatencyMs.p90 <= postcopy.faultLatencyMs.p99, 'percentiles in order');
  t.ok(postcopy.durationMs > 0, `post-copy took ${postcopy.durationMs.toFixed(1)} ms`);
  t.ok(stats.downtimeMs > 0 && stats.downtimeMs < stats.totalTimeMs, `downtime ${stats.downtimeMs.toFixed(2)} ms`);

  const machine = await destination.arrived;
  const sourceOutput = source.output();
  await destination.waitForOutput(`pass ${lastPass(sourceOutput) + 2} ok\n`);
  t.ok(isUnbrokenCount(sourceOutput + destination.output()), 'one unbroken count across the move');
  t.notMatch(destination.output(), /BAD/);
  t.same(Buffer.from(machine.memory.bytes(filled.addr, filled.bytes.length)).equals(filled.bytes), true, 'the filled region arrived byte for byte');
  void memoryHash;
});
