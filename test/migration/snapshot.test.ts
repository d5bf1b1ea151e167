// machine.snapshot() and Machine.restore(): the restored guest continues where it was, with the
// memory it had, and diff snapshots layer on the previous one.
import { mkdtempSync, renameSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import t, { type Test } from 'tap';
import { GuestMemory, Machine } from '../../lib/index.js';
import { loadSnapshot } from '../../lib/migration/snapshot-load.js';
import { noKvm } from '../helpers/kvm.js';
import { serialCollector } from '../helpers/serial-collector.js';
import { isUnbrokenCount, lastPass, memoryHash, MiB, startDirtier } from '../helpers/migration.js';

function scratchDir(t: Test): string {
  const dir = mkdtempSync(path.join(tmpdir(), 'node-kvm-snapshot-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** Restores `file` with its console collected; resolves the machine and an output getter. */
async function restoreCollecting(file: string) {
  const serial = serialCollector();
  const machine = await Machine.restore(file, { serial: { output: serial.sink }, log: () => {} });
  return { machine, output: serial.output, waitForPass: serial.waitForPass };
}

for (const vcpus of [1, 2]) {
  t.test(`snapshot a running dirtier (${vcpus} vCPU${vcpus > 1 ? 's' : ''}), restore it: same memory, the count goes on`, { skip: noKvm }, async (t) => {
    const dir = scratchDir(t);
    const file = path.join(dir, 'full.snap');
    const source = await startDirtier({ vcpus, memoryBytes: 32 * MiB });
    t.teardown(() => source.machine.stop());
    await source.waitForOutput('pass 3 ok\n');
    await source.machine.pause();
    const hashAtSnapshot = memoryHash(source.machine.memory);
    const info = await source.machine.snapshot(file);
    t.equal(info.kind, 'full');
    t.equal(source.machine.state, 'paused', 'a paused machine stays paused');
    t.ok(info.zeroPagesSkipped > 4096, `zero pages are not written (${info.zeroPagesSkipped} skipped)`);
    t.ok(statSync(file).blocks * 512 < 8 * MiB, 'the file is sparse: an idle 32 MiB guest with a 1 MiB range takes a few MiB on disk');
    const outputBefore = source.output();
    await source.machine.stop();

    const restored = await restoreCollecting(file);
    t.teardown(() => restored.machine.stop());
    t.equal(restored.machine.state, 'created');
    t.equal(memoryHash(restored.machine.memory), hashAtSnapshot, 'restored memory hashes the same as at the snapshot');
    restored.machine.start();
    const passAtSnapshot = lastPass(outputBefore);
    await restored.waitForPass(passAtSnapshot + 2);
    const all = outputBefore + restored.output();
    t.ok(isUnbrokenCount(all), `the count continues with no gap, restart or BAD: ${JSON.stringify(all.slice(-80))}`);
    t.notMatch(restored.output(), /pass 1 ok/, 'the guest did not start over');
  });
}

t.test('a running machine runs on after a snapshot; diff snapshots layer on it', { skip: noKvm }, async (t) => {
  const dir = scratchDir(t);
  const source = await startDirtier({ memoryBytes: 32 * MiB });
  t.teardown(() => source.machine.stop());
  await source.waitForOutput('pass 2 ok\n');
  const full = await source.machine.snapshot(path.join(dir, 'base.snap'));
  t.equal(source.machine.state, 'running', 'running again after the snapshot');
  t.ok(full.pausedMs >= 0 && full.pausedMs <= full.totalTimeMs);
  const passAfterFull = lastPass(source.output());
  await source.waitForOutput(`pass ${passAfterFull + 2} ok\n`);

  await source.machine.pause();
  const hash = memoryHash(source.machine.memory);
  const diff = await source.machine.snapshot(path.join(dir, 'diff1.snap'), { diff: true });
  t.equal(diff.kind, 'diff');
  t.equal(diff.parent, path.join(dir, 'base.snap'));
  // The guest rewrote its 1 MiB range (256 pages) and little else since the base.
  t.ok(diff.pagesWritten >= 256 && diff.pagesWritten < 400, `only the dirtied pages (${diff.pagesWritten})`);
  const outputBefore = source.output();
  await source.machine.stop();

  const restored = await restoreCollecting(path.join(dir, 'diff1.snap'));
  t.teardown(() => restored.machine.stop());
  t.equal(memoryHash(restored.machine.memory), hash, 'base + diff = the memory at the diff snapshot');
  restored.machine.start();
  await restored.waitForPass(lastPass(outputBefore) + 2);
  t.ok(isUnbrokenCount(outputBefore + restored.output()), 'the count continues from the diff snapshot');
});

t.test('a diff snapshot without a base is refused; bad paths fail cleanly', { skip: noKvm }, async (t) => {
  const dir = scratchDir(t);
  const source = await startDirtier();
  t.teardown(() => source.machine.stop());
  await t.rejects(source.machine.snapshot(path.join(dir, 'x.snap'), { diff: true }), { message: /needs a previous snapshot/ });
  await t.rejects(source.machine.snapshot(path.join(dir, 'missing-dir', 'x.snap')), { code: 'ENOENT' });
  t.equal(source.machine.state, 'running', 'the guest keeps running after a failed snapshot');
  await t.rejects(Machine.restore(path.join(dir, 'nope.snap')), { code: 'ENOENT' });
  await t.rejects(source.machine.snapshot(''), TypeError);
});

t.test('what the VMM writes into guest RAM is tracked: a diff snapshot holds exactly those pages', { skip: noKvm }, async (t) => {
  const dir = scratchDir(t);
  const source = await startDirtier({ memoryBytes: 32 * MiB });
  t.teardown(() => source.machine.stop());
  await source.waitForOutput('pass 1 ok\n');
  await source.machine.pause(); // the guest writes nothing from here on: only the VMM does
  await source.machine.snapshot(path.join(dir, 'base.snap'));
  const written = [20 * MiB, 20 * MiB + 4096, 24 * MiB + 100]; // three pages above the guest's range
  for (const [i, addr] of written.entries()) source.machine.writeMemory(addr, new Uint8Array([0xa0 + i, 0xb0 + i]));
  const diff = await source.machine.snapshot(path.join(dir, 'diff.snap'), { diff: true });
  t.equal(diff.pagesWritten, 3, 'exactly the three pages the VMM wrote');
  t.equal(diff.zeroPagesSkipped, 0);
  const hash = memoryHash(source.machine.memory);
  await source.machine.stop();
  const restored = await restoreCollecting(path.join(dir, 'diff.snap'));
  t.teardown(() => restored.machine.stop());
  t.equal(memoryHash(restored.machine.memory), hash, 'base + diff = memory at the diff');
  t.same(written.map((addr) => [...restored.machine.memory.bytes(addr, 2)]), [[0xa0, 0xb0], [0xa1, 0xb1], [0xa2, 0xb2]]);
});

t.test('a snapshot renamed over the path while it is restored: its RAM image never goes with the first one\'s state', { skip: noKvm }, async (t) => {
  const dir = scratchDir(t);
  const file = path.join(dir, 'a.snap');
  const later = path.join(dir, 'b.snap');
  const source = await startDirtier({ memoryBytes: 32 * MiB });
  t.teardown(() => source.machine.stop());
  await source.waitForOutput('pass 2 ok\n');
  await source.machine.pause();
  await source.machine.snapshot(file);
  source.machine.resume();
  await source.waitForOutput(`pass ${lastPass(source.output()) + 2} ok\n`);
  await source.machine.pause();
  const laterHash = memoryHash(source.machine.memory);
  await source.machine.snapshot(later);

  // The state read, then another snapshot renamed over the path, as a writer replacing it does.
  const loaded = await loadSnapshot(file, { verify: false });
  renameSync(later, file);
  const replaced = { code: 'EMISMATCH', message: /the file was replaced since its state was read/ };
  await t.rejects(loaded.mapMemory(32 * MiB), replaced, 'not mapped (a restore from nothing)');
  const spare = GuestMemory.create(32 * MiB);
  t.teardown(() => spare.close());
  t.throws(() => loaded.mapMemoryOver(spare), replaced, 'not mapped over a spare VM\'s RAM');
  t.equal(spare.backing, 'anonymous', 'the spare\'s RAM is as it was');
  const fresh = GuestMemory.create(32 * MiB, { backing: 'memfd' });
  t.teardown(() => fresh.close());
  t.throws(() => loaded.fillMemory(fresh), replaced, 'not copied into a prepared machine\'s RAM');

  // Loaded anew, the file there now is the one, state and RAM alike.
  const current = await loadSnapshot(file, { verify: true });
  const memory = await current.mapMemory(32 * MiB);
  t.teardown(() => memory.close());
  t.equal(memoryHash(memory), laterHash, 'the RAM of the snapshot now at the path');
});
