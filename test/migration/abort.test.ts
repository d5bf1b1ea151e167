// AbortSignal for snapshots, restores, migrations and incoming migrations, each aborted at a
// moment where something is under way, and the 'progress' events a migrating machine emits.
// An abort rejects with a MigrationError of code ABORT_ERR and leaves nothing behind: the source
// guest runs on, a destination stops listening and lets its machine go, a snapshot leaves no file.
import { existsSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import t from 'tap';
import { Machine, MigrationError, type MigrationProgress, type VcpuWorkerPool } from '../../lib/index.js';
import { noKvm } from '../helpers/kvm.js';
import { assertRunsOn, dirtierImage, MiB, startDirtier } from '../helpers/migration.js';
import { startLocalDestination } from '../helpers/migration-peer.js';
import { sharedPool } from '../helpers/pool.js';

const pool = noKvm ? undefined : sharedPool(2);

function tempDir(t: Test): string {
  const dir = mkdtempSync(path.join(tmpdir(), 'node-kvm-abort-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

async function rejection(promise: Promise<unknown>): Promise<MigrationError> {
  const error = await promise.then(() => null, (caught: unknown) => caught);
  if (!(error instanceof MigrationError)) throw new Error(`expected a MigrationError, got ${String(error)}`);
  return error;
}

/** Resolves once the pool holds `count` idle threads again (threads come back a turn after their machine stops). */
async function idleThreads(count: number): Promise<number> {
  for (let turn = 0; turn < 100 && pool!.idleCount < count; turn++) await new Promise((resolve) => setImmediate(resolve));
  return pool!.idleCount;
}

t.test('a migration aborted during pre-copy: the source runs on with its disk, the destination is told why', { skip: noKvm }, async (t) => {
  const dir = tempDir(t);
  const disk = path.join(dir, 'disk.img');
  writeFileSync(disk, Buffer.alloc(MiB));
  const address = `unix:${path.join(dir, 'migrate.sock')}`;
  const destination = startLocalDestination(t, address, { pool });
  const bound = await destination.listening;
  const source = await startDirtier({ memoryBytes: 32 * MiB, rangeBytes: 2 * MiB, config: { pool, disks: [{ path: disk }] } });
  t.teardown(() => source.machine.stop());
  await source.waitForOutput('pass 1 ok\n');

  const controller = new AbortController();
  const events: string[] = [];
  // The machine's own 'progress' event: abort once the first pre-copy round has gone over.
  source.machine.on('progress', (progress) => {
    events.push(progress.phase);
    if (progress.phase === 'precopy') controller.abort();
  });
  const error = await rejection(source.machine.migrate(bound, { signal: controller.signal }));
  t.equal(error.code, 'ABORT_ERR');
  t.equal(error.phase, 'precopy');
  t.equal(error.message, `migration to ${bound}: aborted`);
  t.same(events, ['setup', 'precopy', 'failed'], 'progress: set up, one round, then failed');
  await assertRunsOn(t, source);
  await t.rejects(destination.arrived, { name: 'MigrationError', code: 'ECANCELED', message: `the source gave up: migration to ${bound}: aborted` },
    'the destination is told why');
  // The source never let go of its disk: another machine cannot take it.
  await t.rejects(Machine.create({ image: dirtierImage('dirtier-user'), memoryBytes: 16 * MiB, disks: [{ path: disk }], pool, serial: { output: null } }), {
    code: 'EBUSY', message: `disk 0: ${disk} is in use by another machine (it holds a lock on the image)`,
  });
});

t.test("a migrating machine emits 'progress' with each report onProgress gets", { skip: noKvm }, async (t) => {
  const dir = tempDir(t);
  const destination = startLocalDestination(t, `unix:${path.join(dir, 'migrate.sock')}`, { pool });
  const source = await startDirtier({ memoryBytes: 16 * MiB, rangeBytes: 2 * MiB, config: { pool } });
  t.teardown(() => source.machine.stop());
  await source.waitForOutput('pass 1 ok\n');
  const called: MigrationProgress[] = [];
  const emitted: MigrationProgress[] = [];
  const listener = (progress: MigrationProgress) => emitted.push(progress);
  source.machine.on('progress', listener);
  const stats = await source.machine.migrate(await destination.listening, {
    onProgress: (progress) => called.push({ ...progress }),
    signal: new AbortController().signal, // a signal nobody aborts changes nothing
  });
  source.machine.off('progress', listener);
  t.same(emitted, called, 'the same reports, in the same order');
  t.equal(emitted[0].phase, 'setup');
  t.same(emitted.slice(-2).map((progress) => progress.phase), ['stop-copy', 'completed']);
  t.ok(emitted.some((progress) => progress.phase === 'precopy'));
  t.equal(emitted.at(-1)!.bytesTransferred, stats.bytesTransferred);
  t.not(emitted[0], called[0], 'each listener has its own copy');
  await destination.arrived;
});

t.test('an incoming migration aborted while it listens: it stops listening and lets its machine go', { skip: noKvm }, async (t) => {
  const dir = tempDir(t);
  const socketPath = path.join(dir, 'incoming.sock');
  await idleThreads(2);
  const idleBefore = pool!.idleCount;
  const controller = new AbortController();
  // With the shape given, the machine is built before anything arrives.
  const incoming = Machine.incoming(`unix:${socketPath}`, {
    pool, memoryBytes: 16 * MiB, vcpus: 1, signal: controller.signal, log: () => {},
    onListening: () => controller.abort(),
  });
  const error = await rejection(incoming);
  t.equal(error.code, 'ABORT_ERR');
  t.equal(error.message, `stopped listening for a migration on unix:${socketPath}: aborted`);
  t.notOk(existsSync(socketPath), 'the socket file is gone');
  t.equal(await idleThreads(idleBefore), idleBefore, 'the machine built for it gave its vCPU thread back');
  await t.rejects(Machine.incoming(`unix:${socketPath}`, { signal: AbortSignal.abort() }), { name: 'MigrationError', code: 'ABORT_ERR' }, 'an aborted signal: nothing starts');
  t.notOk(existsSync(socketPath));
});

t.test('an incoming migration aborted during the transfer: the source is told why and runs on', { skip: noKvm }, async (t) => {
  const dir = tempDir(t);
  const address = `unix:${path.join(dir, 'migrate.sock')}`;
  const controller = new AbortController();
  const destination = startLocalDestination(t, address, { pool, signal: controller.signal });
  const bound = await destination.listening;
  const source = await startDirtier({ memoryBytes: 32 * MiB, rangeBytes: 2 * MiB, config: { pool } });
  t.teardown(() => source.machine.stop());
  await source.waitForOutput('pass 2 ok\n');
  // Once the first round of pages has gone over, the destination is aborted.
  const error = await rejection(source.machine.migrate(bound, {
    onProgress: (progress) => {
      if (progress.phase === 'precopy') controller.abort();
    },
  }));
  await t.rejects(destination.arrived, { name: 'MigrationError', code: 'ABORT_ERR', message: `receiving a migration on ${bound}: aborted` });
  t.equal(error.code, 'EREFUSED', error.message);
  t.match(error.message, `the destination refused: receiving a migration on ${bound}: aborted`);
  await assertRunsOn(t, source);
});

t.test('a snapshot aborted while the guest is paused for it: no file, the guest runs on', { skip: noKvm }, async (t) => {
  const dir = tempDir(t);
  const source = await startDirtier({ memoryBytes: 16 * MiB, rangeBytes: 2 * MiB, config: { pool } });
  t.teardown(() => source.machine.stop());
  await source.waitForOutput('pass 1 ok\n');
  const machine = source.machine;
  const controller = new AbortController();
  const pause = machine.pause.bind(machine);
  // The moment: the guest has just been paused for the snapshot.
  machine.pause = async () => {
    await pause();
    controller.abort();
  };
  const snapshotPath = path.join(dir, 'a.snap');
  const error = await rejection(machine.snapshot(snapshotPath, { signal: controller.signal }));
  delete (machine as Partial<Machine>).pause;
  t.equal(error.code, 'ABORT_ERR');
  t.equal(error.message, `the snapshot ${snapshotPath}: aborted`);
  t.same(readdirSync(dir), [], 'no snapshot, no temporary file');
  await assertRunsOn(t, source);
  await t.rejects(machine.snapshot(snapshotPath, { signal: AbortSignal.abort() }), { code: 'ABORT_ERR' });
  t.equal((await machine.snapshot(snapshotPath)).kind, 'full', 'a snapshot without an abort is written');
});

t.test('a restore aborted while its machine is being built: the machine is stopped, its threads given back', { skip: noKvm }, async (t) => {
  const dir = tempDir(t);
  const source = await startDirtier({ memoryBytes: 16 * MiB, rangeBytes: 2 * MiB, config: { pool } });
  const snapshotPath = path.join(dir, 'a.snap');
  await source.machine.snapshot(snapshotPath);
  await source.machine.stop();
  const idleBefore = await idleThreads(2);
  const controller = new AbortController();
  // The moment: the builder takes its vCPU threads.
  const hooked = {
    acquire: (count: number) => {
      controller.abort();
      return pool!.acquire(count);
    },
    release: (threads: Parameters<VcpuWorkerPool['release']>[0]) => pool!.release(threads),
  } as unknown as VcpuWorkerPool;
  const error = await rejection(Machine.restore(snapshotPath, { pool: hooked, signal: controller.signal, serial: { output: null } }));
  t.equal(error.code, 'ABORT_ERR');
  t.equal(error.message, `restoring ${snapshotPath}: aborted`);
  t.equal(await idleThreads(idleBefore), idleBefore, 'the machine built meanwhile gave its vCPU thread back');
  await t.rejects(Machine.restore(snapshotPath, { pool, signal: AbortSignal.abort() }), { code: 'ABORT_ERR' }, 'an aborted signal: nothing is read');
  const restored = await Machine.restore(snapshotPath, { pool, serial: { output: null } });
  t.equal(restored.state, 'created', 'without an abort it restores');
  await restored.stop();
});
