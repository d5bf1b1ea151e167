// Same-host live update of a guest in the middle of its disk I/O (guests/disk.c, loop mode: write,
// flush, read back, verify, round after round): the image's open file moves with its lock, the
// destination finishes the rounds, and no other machine can take the image at any point; after a
// failed move the source keeps the image, locked, and its rounds go on.
import { closeSync, mkdtempSync, openSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import t, { type Test } from 'tap';
import { lockFile } from '../../lib/kvm/host.js';
import { listenForMigration, parseMigrationAddress } from '../../lib/migration/transport.js';
import { SectionReader } from '../../lib/migration/section-reader.js';
import { socketSource } from '../../lib/migration/sources.js';
import { encodeHeader } from '../../lib/migration/format.js';
import { encodeConfigSection } from '../../lib/migration/state-sections.js';
import { lastRound, startDiskLoop, untilRound } from '../helpers/disk-loop.js';
import { noKvm } from '../helpers/kvm.js';
import type { Booted } from '../helpers/machine.js';
import { startLocalDestination } from '../helpers/migration-peer.js';
import { sharedPool } from '../helpers/pool.js';

const pool = noKvm ? undefined : sharedPool(2);

function tempDir(t: Test): string {
  const dir = mkdtempSync(path.join(tmpdir(), 'node-kvm-local-disk-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

async function startLoop(t: Test, file: string): Promise<Booted> {
  writeFileSync(file, Buffer.alloc(1024 * 512, 0x11));
  return startDiskLoop(t, file, { pool });
}

/** Whether another open of `file` can take the exclusive lock a writable disk needs (it lets go at once). */
function lockable(file: string): boolean {
  const fd = openSync(file, 'r+');
  try {
    return lockFile(fd, 'exclusive');
  } finally {
    closeSync(fd);
  }
}

t.test('a disk guest moves in the middle of its I/O: same open image, still locked, its rounds go on', { skip: noKvm }, async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, 'disk.img');
  const source = await startLoop(t, file);
  t.notOk(lockable(file), 'the running source holds the image\'s lock');
  const address = `unix:${path.join(dir, 'm.sock')}`;
  const incoming = startLocalDestination(t, address, { pool });
  await incoming.listening;
  await source.machine.migrate(address, { local: true });
  const destination = await incoming.arrived;
  t.equal((await source.machine.wait()).reason, 'migrated');
  t.same(destination.shape.disks?.map((disk) => [disk.path, disk.sectors, disk.readOnly]), [[file, 1024, false]], 'the same disk');
  t.notOk(lockable(file), 'the image is still locked: the source closed its fd without unlocking the open file both shared');
  const from = lastRound(source.output());
  await untilRound(incoming.output, from + 3);
  t.notMatch(source.output() + incoming.output(), 'BAD', 'every round read back what it wrote, across the move');
  t.ok(lastRound(incoming.output()) >= from + 3, `the destination runs on: rounds ${from} -> ${lastRound(incoming.output())}`);
  await destination.stop();
  t.ok(lockable(file), 'free once the destination has stopped');
});

t.test('a destination that dies after the fds: the source keeps its image, locked, and its rounds go on', { skip: noKvm }, async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, 'disk.img');
  const source = await startLoop(t, file);
  const address = `unix:${path.join(dir, 'm.sock')}`;
  let listening!: () => void;
  const ready = new Promise<void>((resolve) => (listening = resolve));
  // Accepts, takes the fds (through Node: the kernel drops them) and goes away.
  const fake = (async () => {
    const socket = await listenForMigration(parseMigrationAddress(address), { onListening: () => listening() });
    socket.on('error', () => {});
    const reader = new SectionReader(socketSource(socket, 10_000));
    const header = await reader.readHeader();
    await reader.next();
    socket.write(Buffer.concat([encodeHeader({ kind: 'local-migration', memoryBytes: header.memoryBytes, vcpuCount: header.vcpuCount }), encodeConfigSection({ machine: {} })]));
    await reader.next();
    socket.destroy();
  })();
  fake.catch(() => {});
  await ready;
  await t.rejects(source.machine.migrate(address, { local: true }), { message: /the guest runs on here$/ });
  await fake;
  t.equal(source.machine.state, 'running');
  t.notOk(lockable(file), 'the source still holds the image\'s lock');
  const from = lastRound(source.output());
  await untilRound(() => source.output(), from + 3);
  t.notMatch(source.output(), 'BAD');
  t.ok(lastRound(source.output()) >= from + 3, `rounds go on here: ${from} -> ${lastRound(source.output())}`);
});
