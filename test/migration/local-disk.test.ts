// Same-host live update of a guest in the middle of its disk I/O (guests/disk.c, loop mode: write,
// flush, read back, verify, round after round): the image's open file moves with its lock, the
// destination finishes the rounds, and no other machine can take the image at any point; after a
// failed move the source keeps the image, locked, and its rounds go on.
import { closeSync, mkdtempSync, openSync, rmSync, writeFileSync } from 'node:fs';
import { PassThrough } from 'node:stream';
import { tmpdir } from 'node:os';
import path from 'node:path';
import t, { type Test } from 'tap';
import { GUEST_PARAMS_ADDR, Machine } from '../../lib/index.js';
import { lockFile } from '../../lib/kvm/host.js';
import { listenForMigration, parseMigrationAddress } from '../../lib/migration/transport.js';
import { SectionReader } from '../../lib/migration/section-reader.js';
import { socketSource } from '../../lib/migration/sources.js';
import { encodeHeader } from '../../lib/migration/format.js';
import { encodeConfigSection } from '../../lib/migration/state-sections.js';
import { noKvm, repoRoot } from '../helpers/kvm.js';
import { boot, type Booted } from '../helpers/machine.js';
import { sharedPool } from '../helpers/pool.js';

const MiB = 1 << 20;
const image = path.join(repoRoot, 'guests', 'build', 'disk.elf');
const pool = noKvm ? undefined : sharedPool(2);
const LOOP_MODE = 1;

function tempDir(t: Test): string {
  const dir = mkdtempSync(path.join(tmpdir(), 'node-kvm-local-disk-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

async function startLoop(t: Test, file: string): Promise<Booted> {
  writeFileSync(file, Buffer.alloc(1024 * 512, 0x11));
  const booted = await boot({ image, memoryBytes: 64 * MiB, disks: [{ path: file }], pool });
  t.teardown(() => void booted.machine.stop());
  const params = new Uint8Array(24);
  new DataView(params.buffer).setUint32(0, LOOP_MODE, true);
  booted.machine.writeMemory(GUEST_PARAMS_ADDR, params);
  booted.machine.start();
  await booted.waitForOutput('round 2 ok\n');
  return booted;
}

const lastRound = (output: string) => Math.max(-1, ...[...output.matchAll(/round (\d+) ok\n/g)].map((m) => Number(m[1])));

/** Whether another open of `file` can take the exclusive lock a writable disk needs (it lets go at once). */
function lockable(file: string): boolean {
  const fd = openSync(file, 'r+');
  try {
    return lockFile(fd, 'exclusive');
  } finally {
    closeSync(fd);
  }
}

async function untilRound(output: () => string, round: number): Promise<void> {
  const deadline = Date.now() + 20_000;
  while (lastRound(output()) < round && Date.now() < deadline && !output().includes('BAD')) await new Promise((resolve) => setTimeout(resolve, 20));
}

t.test('a disk guest moves in the middle of its I/O: same open image, still locked, its rounds go on', { skip: noKvm }, async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, 'disk.img');
  const source = await startLoop(t, file);
  t.notOk(lockable(file), 'the running source holds the image\'s lock');
  let output = '';
  const sink = new PassThrough();
  sink.on('data', (chunk: Buffer) => (output += chunk.toString('latin1')));
  const address = `unix:${path.join(dir, 'm.sock')}`;
  let listening!: () => void;
  const ready = new Promise<void>((resolve) => (listening = resolve));
  const incoming = Machine.incoming(address, { onListening: () => listening(), serial: { output: sink }, log: () => {}, pool });
  await ready;
  await source.machine.migrate(address, { local: true });
  const destination = await incoming;
  t.teardown(() => void destination.stop());
  t.equal((await source.machine.wait()).reason, 'migrated');
  t.same(destination.shape.disks?.map((disk) => [disk.path, disk.sectors, disk.readOnly]), [[file, 1024, false]], 'the same disk');
  t.notOk(lockable(file), 'the image is still locked: the source closed its fd without unlocking the open file both shared');
  const from = lastRound(source.output());
  await untilRound(() => output, from + 3);
  t.notMatch(source.output() + output, 'BAD', 'every round read back what it wrote, across the move');
  t.ok(lastRound(output) >= from + 3, `the destination runs on: rounds ${from} -> ${lastRound(output)}`);
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
