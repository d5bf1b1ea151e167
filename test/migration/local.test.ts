// Same-host live update (migrate with local: true): guest RAM's memfd moves to the destination
// over the unix socket (SCM_RIGHTS), nothing is copied. Source and destination are in this process
// (the fds still go through the socket: each side only ever uses what it received); the CLI's
// test runs them as two processes.
import { closeSync, fstatSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import t, { type Test } from 'tap';
import { GuestMemory, Machine } from '../../lib/index.js';
import { noKvm } from '../helpers/kvm.js';
import { isUnbrokenCount, lastPass, memoryHash, MiB, startDirtier } from '../helpers/migration.js';
import { startLocalDestination } from '../helpers/migration-peer.js';
import { sharedPool } from '../helpers/pool.js';

const pool = noKvm ? undefined : sharedPool(2);

const tempDir = (t: Test): string => {
  const dir = mkdtempSync(path.join(tmpdir(), 'node-kvm-local-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
};

t.test('the dirtier moves with its RAM: the count goes on, the memory is the same memfd', { skip: noKvm }, async (t) => {
  const dir = tempDir(t);
  const destination = startLocalDestination(t, `unix:${path.join(dir, 'm.sock')}`, { pool });
  const address = await destination.listening;
  const source = await startDirtier({ memoryBytes: 64 * MiB, rangeBytes: 4 * MiB, config: { pool } });
  t.teardown(() => source.machine.stop());
  await source.waitForOutput('pass 2 ok\n');
  // A view that outlives the source machine: the mapping it holds is the source's.
  const sourceView = GuestMemory.attach(source.machine.memory.handle);
  t.teardown(() => sourceView.close());
  const sharedFd = source.machine.memory.shareFd();
  const sourceRam = fstatSync(sharedFd);
  closeSync(sharedFd);
  const stats = await source.machine.migrate(address, { local: true });
  t.equal((await source.machine.wait()).reason, 'migrated', 'the source ends as migrated');
  t.equal(stats.phase, 'completed');
  t.equal(stats.pagesTransferred, 0, 'no page was sent');
  t.ok(stats.bytesTransferred < 256 * 1024, `only the state went over (${stats.bytesTransferred} bytes)`);
  t.ok(stats.downtimeMs > 0 && stats.downtimeMs <= stats.totalTimeMs, `downtime ${stats.downtimeMs.toFixed(2)} ms of ${stats.totalTimeMs.toFixed(1)} ms`);

  const arrived = await destination.arrived;
  const sourceOutput = source.output();
  await destination.waitForOutput(`pass ${lastPass(sourceOutput) + 3} ok\n`);
  t.ok(isUnbrokenCount(sourceOutput + destination.output()), 'one unbroken count across the move');
  t.notMatch(destination.output(), /BAD/, 'the guest found its memory intact');

  const destinationRam = fstatSync(arrived.memory.fd);
  t.equal(destinationRam.ino, sourceRam.ino, 'the destination maps the source\'s memfd (same inode)');
  t.equal(destinationRam.dev, sourceRam.dev);
  await arrived.pause();
  const marker = new Uint8Array(4096).fill(0xa5);
  arrived.writeMemory(40 * MiB, marker);
  t.same(sourceView.bytes(40 * MiB, 4096), marker, 'a write at the destination shows through the source\'s old mapping');
  t.equal(memoryHash(sourceView), memoryHash(arrived.memory), 'both mappings hold the same bytes');
});

t.test('a paused guest arrives paused, its memory as it was', { skip: noKvm }, async (t) => {
  const dir = tempDir(t);
  let onListening!: (address: string) => void;
  const listening = new Promise<string>((resolve) => (onListening = resolve));
  const incoming = Machine.incoming(`unix:${path.join(dir, 'm.sock')}`, { onListening, serial: { output: null }, log: () => {}, pool });
  const source = await startDirtier({ memoryBytes: 32 * MiB, config: { pool } });
  t.teardown(() => source.machine.stop());
  await source.waitForOutput('pass 1 ok\n');
  await source.machine.pause();
  source.machine.writeMemory(20 * MiB, new Uint8Array(MiB).fill(0x3c));
  const hash = memoryHash(source.machine.memory);
  await source.machine.migrate(await listening, { local: true });
  const destination = await incoming;
  t.teardown(() => destination.stop());
  t.equal(destination.state, 'paused', 'arrived paused, as it left');
  t.equal(memoryHash(destination.memory), hash, 'the same memory');
});

for (const vcpus of [1, 2]) t.test(`a destination built ahead (it knew the shape) takes the source's RAM in place of its own, ${vcpus} vCPU${vcpus > 1 ? 's' : ''}`, { skip: noKvm }, async (t) => {
  const dir = tempDir(t);
  const destination = startLocalDestination(t, `unix:${path.join(dir, 'm.sock')}`, { pool, memoryBytes: 32 * MiB, vcpus, irqchip: false });
  const address = await destination.listening;
  const source = await startDirtier({ memoryBytes: 32 * MiB, rangeBytes: 2 * MiB, vcpus, config: { pool } });
  t.teardown(() => source.machine.stop());
  await source.waitForOutput('pass 2 ok\n');
  const sharedFd = source.machine.memory.shareFd();
  const sourceRam = fstatSync(sharedFd);
  closeSync(sharedFd);
  const stats = await source.machine.migrate(address, { local: true });
  t.equal((await source.machine.wait()).reason, 'migrated');
  const arrived = await destination.arrived;
  t.ok(stats.totalTimeMs > 0);
  const sourceOutput = source.output();
  await destination.waitForOutput(`pass ${lastPass(sourceOutput) + 3} ok\n`);
  t.ok(isUnbrokenCount(sourceOutput + destination.output()), 'one unbroken count across the move');
  t.notMatch(destination.output(), /BAD/, 'the guest found its memory intact');
  t.equal(fstatSync(arrived.memory.fd).ino, sourceRam.ino, 'the machine built ahead now maps the source\'s memfd, under its own fd number');
  t.same(destination.logs, [], 'nothing logged');
});
