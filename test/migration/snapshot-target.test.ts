// Where writeSnapshotFile() writes: a new file beside the target, created exclusively and never
// through a symlink, renamed over nothing but a regular file; nothing left behind on failure, and
// every I/O error naming the snapshot.
import { execFileSync } from 'node:child_process';
import { lstatSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, readlinkSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import nodePath from 'node:path';
import t, { type Test } from 'tap';
import { PAGE_SIZE as PAGE_BYTES } from '../../lib/kvm/constants.js';
import { readSnapshotFile, writeSnapshotFile, type WriteSnapshotOptions } from '../../lib/migration/snapshot-file.js';

const MiB = 1024 * 1024;

function tempDir(t: Test): string {
  const dir = mkdtempSync(nodePath.join(os.tmpdir(), 'node-kvm-snapshot-target-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** A small synthetic guest RAM: `pages` non-zero pages from page 0, the rest zero. */
function memoryWith(memoryBytes: number, pages: number): Uint8Array {
  const memory = new Uint8Array(memoryBytes);
  for (let page = 0; page < pages; page++) memory.fill((page % 255) + 1, page * PAGE_BYTES, page * PAGE_BYTES + 64);
  return memory;
}

function options(memory: Uint8Array): WriteSnapshotOptions {
  return { kind: 'snapshot', memoryBytes: memory.length, vcpuCount: 1, config: { name: 'vm1' }, vcpus: [{ index: 0 }], vm: { clock: 1n }, devices: {}, memory };
}

const listing = (dir: string) => readdirSync(dir).sort();

t.test('a symlink planted at <target>.tmp is neither followed nor replaced', async (t) => {
  const dir = tempDir(t);
  const elsewhere = tempDir(t);
  const victim = nodePath.join(elsewhere, 'victim');
  const victimBytes = Buffer.from('a file the snapshot must not touch\n');
  writeFileSync(victim, victimBytes, { mode: 0o644 });
  const target = nodePath.join(dir, 'vm.snap');
  const planted = `${target}.tmp`;
  symlinkSync(victim, planted);
  // A regular file at the target is replaced (by a new file: its mode is not kept).
  writeFileSync(target, 'an older snapshot', { mode: 0o644 });

  const memory = memoryWith(1 * MiB, 3);
  await writeSnapshotFile(target, options(memory));

  t.ok(readFileSync(victim).equals(victimBytes), 'the victim is byte for byte unchanged');
  t.ok(lstatSync(planted).isSymbolicLink(), 'the planted link is still a link');
  t.equal(readlinkSync(planted), victim, 'to the victim');
  const stats = lstatSync(target);
  t.ok(stats.isFile(), 'the snapshot is a regular file');
  t.equal(stats.mode & 0o777, 0o600);
  t.same(listing(dir), ['vm.snap', 'vm.snap.tmp'], 'nothing else is left beside it');
  const contents = await readSnapshotFile(target);
  t.equal(contents.header.memoryBytes, memory.length);
  t.same(contents.config, { name: 'vm1' });
  const image = readFileSync(target).subarray(contents.ramImage!.fileOffset);
  t.ok(image.equals(memory), 'the file holds the RAM image');
});

t.test('anything but a regular file at the target is refused before anything is written', async (t) => {
  const dir = tempDir(t);
  const memory = memoryWith(1 * MiB, 3);
  const refuses = async (name: string, what: string) => {
    const target = nodePath.join(dir, name);
    const before = listing(dir);
    await t.rejects(writeSnapshotFile(target, options(memory)), { message: `refusing to write a snapshot over ${target}: it is ${what}, not a regular file` }, what);
    t.same(listing(dir), before, `${what}: the directory is as it was (no temporary file)`);
  };

  const socketPath = nodePath.join(dir, 'api.sock');
  const server = net.createServer();
  await new Promise<void>((resolve, reject) => server.once('error', reject).listen(socketPath, resolve));
  try {
    await refuses('api.sock', 'a socket');
    t.ok(lstatSync(socketPath).isSocket(), 'the socket is still there');
  } finally {
    await new Promise((resolve) => server.close(resolve));
  }

  mkdirSync(nodePath.join(dir, 'a-directory'));
  await refuses('a-directory', 'a directory');

  const victim = nodePath.join(dir, 'victim');
  writeFileSync(victim, 'untouched');
  symlinkSync(victim, nodePath.join(dir, 'link.snap'));
  await refuses('link.snap', 'a symbolic link');
  t.equal(readFileSync(victim, 'utf8'), 'untouched');

  let fifo: string | null = nodePath.join(dir, 'fifo');
  try {
    execFileSync('mkfifo', [fifo], { stdio: 'ignore' });
  } catch (error) {
    t.comment(`FIFO case skipped: mkfifo failed (${(error as Error).message})`);
    fifo = null;
  }
  if (fifo) await refuses('fifo', 'a FIFO');
});

/** Mounts a 1 MiB tmpfs on a new directory (as root), unmounted in teardown; null, with why, where that is impossible. */
function smallTmpfs(t: Test): string | null {
  if (process.getuid?.() !== 0) {
    t.comment('skipped: mounting a tmpfs needs root');
    return null;
  }
  const dir = mkdtempSync(nodePath.join(os.tmpdir(), 'node-kvm-snapshot-tmpfs-'));
  try {
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', dir], { stdio: 'pipe' });
  } catch (error) {
    rmSync(dir, { recursive: true, force: true });
    t.comment(`skipped: cannot mount a tmpfs (${(error as Error).message.split('\n')[0]})`);
    return null;
  }
  t.teardown(() => {
    execFileSync('umount', [dir], { stdio: 'ignore' });
    rmSync(dir, { recursive: true, force: true });
  });
  return dir;
}

t.test('a full disk: the error names the snapshot and keeps its code; no temporary file is left', async (t) => {
  const dir = smallTmpfs(t);
  if (!dir) return;
  const target = nodePath.join(dir, 'big.snap');
  const memory = memoryWith(4 * MiB, 1024); // every page non-zero: 4 MiB onto a 1 MiB filesystem
  const error = await writeSnapshotFile(target, options(memory)).then(() => null, (error: unknown) => error as NodeJS.ErrnoException);
  t.equal(error?.message, `cannot write the snapshot ${target}: writing the RAM image: ENOSPC: no space left on device`);
  t.equal(error?.code, 'ENOSPC');
  t.same(listing(dir), [], 'nothing is left in the filesystem');
});

t.test('a failed rename leaves no temporary file', async (t) => {
  // A regular file that is a mount point (a bind mount) cannot be renamed over: EBUSY.
  const dir = smallTmpfs(t);
  if (!dir) return;
  const target = nodePath.join(dir, 'mounted.snap');
  const source = nodePath.join(dir, 'source');
  writeFileSync(target, 'old');
  writeFileSync(source, 'mounted over');
  try {
    execFileSync('mount', ['--bind', source, target], { stdio: 'pipe' });
  } catch (error) {
    t.comment(`skipped: cannot bind-mount a file (${(error as Error).message.split('\n')[0]})`);
    return;
  }
  // Registered after the tmpfs teardown, which tap runs later: this mount goes first.
  t.teardown(() => execFileSync('umount', [target], { stdio: 'ignore' }));
  const before = listing(dir);
  const error = await writeSnapshotFile(target, options(memoryWith(64 * 1024, 2))).then(() => null, (error: unknown) => error as NodeJS.ErrnoException);
  t.equal(error?.message, `cannot write the snapshot ${target}: renaming it into place: EBUSY: resource busy or locked`);
  t.equal(error?.code, 'EBUSY');
  t.same(listing(dir), before, 'the directory is as it was');
});
