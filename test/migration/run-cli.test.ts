// `node-kvm run --restore` checks the snapshot's RAM image unless told --no-verify. In-process
// through main() where the guest never runs; the one guest that runs does so in a child, its
// console on the child's stdout.
import { spawnSync } from 'node:child_process';
import { mkdtempSync, openSync, readFileSync, readSync, rmSync, writeSync, closeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import t, { type Test } from 'tap';
import { main } from '../../lib/cli/commands.js';
import { Machine } from '../../lib/index.js';
import { readSnapshotFile } from '../../lib/migration/snapshot-file.js';
import { noKvm, repoRoot } from '../helpers/kvm.js';

function scratchDir(t: Test): string {
  const dir = mkdtempSync(path.join(tmpdir(), 'node-kvm-run-cli-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

const hello = path.join(repoRoot, 'guests', 'build', 'hello.bin');

t.test('run --restore refuses a snapshot whose RAM image has a flipped bit; --no-verify runs it', { skip: noKvm }, async (t) => {
  const dir = scratchDir(t);
  const file = path.join(dir, 'hello.snap');
  // hello, loaded and not yet started: restored, it prints its message from guest RAM.
  const machine = await Machine.create({ image: hello, memoryBytes: 2 * 1024 * 1024, serial: { output: null } });
  try {
    await machine.snapshot(file);
  } finally {
    await machine.stop();
  }
  // Flip bit 5 of the message's first byte, 'H', in the RAM image: the guest would print 'hello'.
  const { ramImage } = await readSnapshotFile(file);
  const image = readFileSync(file).subarray(ramImage!.fileOffset);
  const messageAt = image.indexOf('Hello from node-kvm!\n');
  t.ok(messageAt > 0, `the message is in the image, at ${messageAt}`);
  const fd = openSync(file, 'r+');
  try {
    const byte = Buffer.alloc(1);
    readSync(fd, byte, 0, 1, ramImage!.fileOffset + messageAt);
    byte[0]! ^= 0x20;
    writeSync(fd, byte, 0, 1, ramImage!.fileOffset + messageAt);
  } finally {
    closeSync(fd);
  }

  // node-kvm prints what main() rejects with as one line, "node-kvm: MESSAGE", and exits 1.
  await t.rejects(main(['run', '--restore', file]), { message: `${file}: checksum mismatch in the RAM image` }, 'verified by default');
  await t.rejects(main(['run', hello, '--no-verify']), { message: '--no-verify applies to --restore only' });

  const cli = path.join(repoRoot, 'lib', 'cli', 'main.ts');
  const result = spawnSync(process.execPath, [...process.execArgv, cli, 'run', '--restore', file, '--no-verify'], {
    encoding: 'latin1', timeout: 60_000, stdio: ['ignore', 'pipe', 'pipe'],
  });
  t.equal(result.stdout, 'hello from node-kvm!\n', 'unverified, the guest runs from the corrupt image');
  t.equal(result.status, 0, result.stderr);
});
