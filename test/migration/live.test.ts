// Live migration of the running dirtier guest between two processes (or within this one, where
// the test is about one side): the guest's count goes on at the destination with no gap or
// restart, and its own check of its memory pattern keeps passing.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import t from 'tap';
import { Machine } from '../../lib/index.js';
import type { MigrationProgress } from '../../lib/migration/types.js';
import { noKvm } from '../helpers/kvm.js';
import { isUnbrokenCount, lastPass, memoryHash, MiB, startDirtier } from '../helpers/migration.js';
import { startDestination, startLocalDestination } from '../helpers/migration-peer.js';
import { sharedPool } from '../helpers/pool.js';

const TOKEN = 'test-token-4f1c';
// vCPU threads for the machines in this process, loaded once for the file.
const pool = noKvm ? undefined : sharedPool(2);

for (const transport of ['tcp', 'unix'] as const) {
  for (const vcpus of [1, 2]) {
    t.test(`live-migrate dirtier-user with ${vcpus} vCPU${vcpus > 1 ? 's' : ''} over ${transport}`, { skip: noKvm }, async (t) => {
      const dir = mkdtempSync(path.join(tmpdir(), 'node-kvm-live-'));
      t.teardown(() => rmSync(dir, { recursive: true, force: true }));
      const address = transport === 'tcp' ? 'tcp:127.0.0.1:0' : `unix:${path.join(dir, 'migrate.sock')}`;
      const destination = startDestination(address, TOKEN);
      t.teardown(() => destination.child.kill('SIGKILL'));
      const bound = await destination.listening;

      const source = await startDirtier({ vcpus, memoryBytes: 64 * MiB, rangeBytes: 4 * MiB, config: { pool } });
      t.teardown(() => source.machine.stop());
      await source.waitForOutput('pass 2 ok\n');
      const progress: MigrationProgress[] = [];
      const stats = await source.machine.migrate(bound, { token: TOKEN, onProgress: (p) => progress.push({ ...p }) });
      const sourceExit = await source.machine.wait();
      t.equal(sourceExit.reason, 'migrated', 'the source ends as migrated');
      t.equal(stats.phase, 'completed');
      t.ok(stats.iterations >= 1, `iterations: ${stats.iterations}`);
      t.ok(stats.pagesTransferred >= 1024, `at least the 4 MiB range went over (${stats.pagesTransferred} pages)`);
      t.ok(stats.zeroPagesSkipped + stats.pagesTransferred >= 1024);
      t.ok(stats.bytesTransferred >= stats.pagesTransferred * 4096, 'bytes cover the pages');
      t.ok(stats.downtimeMs > 0 && stats.downtimeMs <= stats.totalTimeMs, `downtime ${stats.downtimeMs.toFixed(2)} ms of ${stats.totalTimeMs.toFixed(1)} ms`);
      t.equal(stats.memoryBytes, 64 * MiB);
      t.ok(progress.some((p) => p.phase === 'precopy'), 'progress events during pre-copy');

      const sourceOutput = source.output();
      const passAtMove = lastPass(sourceOutput);
      await destination.waitForOutput(`pass ${passAtMove + 3} ok\n`);
      destination.child.kill('SIGTERM');
      const result = await destination.result;
      t.equal(result.report.exit, 'stopped', `the destination ran the guest until told to stop: ${destination.stderr()}`);
      const all = sourceOutput + destination.output();
      t.ok(isUnbrokenCount(all), `one unbroken count across the move: ...${JSON.stringify(all.slice(-120))}`);
      t.notMatch(destination.output(), /BAD/, 'the guest found its memory intact');
    });
  }
}

// The destination in this process: the dirty ring is the source's business.
t.test('live-migrate with the dirty ring instead of the bitmap', { skip: noKvm }, async (t) => {
  const dir = mkdtempSync(path.join(tmpdir(), 'node-kvm-live-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const destination = startLocalDestination(t, `unix:${path.join(dir, 'migrate.sock')}`, { pool });
  const bound = await destination.listening;
  const source = await startDirtier({ memoryBytes: 32 * MiB, rangeBytes: 2 * MiB, config: { dirtyLog: 'ring', pool } });
  t.teardown(() => source.machine.stop());
  await source.waitForOutput('pass 2 ok\n');
  const stats = await source.machine.migrate(bound, { downtimeBudgetMs: 5 });
  t.equal(stats.dirtyLogMode, 'ring');
  t.equal((await source.machine.wait()).reason, 'migrated');
  const sourceOutput = source.output();
  await destination.waitForOutput(`pass ${lastPass(sourceOutput) + 3} ok\n`);
  await (await destination.arrived).stop();
  t.ok(isUnbrokenCount(sourceOutput + destination.output()), 'one unbroken count across the move');
  t.notMatch(destination.output(), /BAD/);
});

t.test('pages that became zero after they were sent arrive as zero; memory hashes equal', { skip: noKvm }, async (t) => {
  const dir = mkdtempSync(path.join(tmpdir(), 'node-kvm-live-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  let onListening!: (address: string) => void;
  const listening = new Promise<string>((resolve) => (onListening = resolve));
  const incoming = Machine.incoming(`unix:${path.join(dir, 'm.sock')}`, { onListening, serial: { output: null }, log: () => {}, pool });
  const source = await startDirtier({ memoryBytes: 32 * MiB, rangeBytes: MiB, config: { pool } });
  t.teardown(() => source.machine.stop());
  await source.waitForOutput('pass 1 ok\n');
  await source.machine.pause(); // paused, so both memories can be compared after the move
  const large = { addr: 20 * MiB, bytes: 128 * 1024 };
  const small = { addr: 24 * MiB, bytes: 4096 };
  for (const { addr, bytes } of [large, small]) source.machine.writeMemory(addr, new Uint8Array(bytes).fill(0x6b));
  let hashAtPause = '';
  const stats = await source.machine.migrate(await listening, {
    onProgress: (p) => {
      if (p.phase === 'precopy' && p.iterations === 1) {
        // Sent with data in the first round; zero before the last.
        for (const { addr, bytes } of [large, small]) source.machine.writeMemory(addr, new Uint8Array(bytes));
      }
      if (p.phase === 'stop-copy') hashAtPause = memoryHash(source.machine.memory);
    },
  });
  t.ok(stats.zeroPagesSkipped >= 33, `the 33 zeroed pages went as zero ranges (${stats.zeroPagesSkipped} zero pages)`);
  const destination = await incoming;
  t.teardown(() => destination.stop());
  t.equal(destination.state, 'paused', 'arrived paused, as it left');
  t.equal(memoryHash(destination.memory), hashAtPause, 'the destination holds exactly the memory the source had at the pause');
  t.equal(destination.memory.bytes(large.addr, large.bytes).some((byte) => byte !== 0), false, 'the large range is zero again');
  t.equal(destination.memory.bytes(small.addr, small.bytes).some((byte) => byte !== 0), false, 'the small range is zero again');
});
