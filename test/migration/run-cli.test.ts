// `node-kvm run --restore` checks the snapshot's RAM image unless told --no-verify, and
// `node-kvm run --incoming` logs the connections it refuses. In-process through main() where the
// guest never runs; the one guest that runs does so in a child, its console on the child's stdout.
import { mkdtempSync, openSync, readFileSync, readSync, rmSync, writeSync, closeSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import t, { type Test } from 'tap';
import { main } from '../../lib/cli/commands.js';
import { Machine } from '../../lib/index.js';
import { readSnapshotFile } from '../../lib/migration/snapshot-file.js';
import { connectForMigration, parseMigrationAddress } from '../../lib/migration/transport.js';
import { nodeKvmInProcess, startNodeKvm } from '../helpers/cli.js';
import { noKvm, repoRoot } from '../helpers/kvm.js';
import { sharedPool } from '../helpers/pool.js';

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
  const machine = await Machine.create({ image: hello, memoryBytes: 2 * 1024 * 1024, serial: { output: null }, pool: sharedPool() });
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

  const refused = await nodeKvmInProcess(['run', '--restore', file], { builtFirstThread: true });
  t.same(refused, { status: 1, stdout: '', stderr: `node-kvm: ${file}: checksum mismatch in the RAM image\n` }, 'verified by default');
  const misplaced = await nodeKvmInProcess(['run', hello, '--no-verify'], { builtFirstThread: true });
  t.same(misplaced, { status: 1, stdout: '', stderr: 'node-kvm: --no-verify applies to --restore only\n' });

  const result = await startNodeKvm(['run', '--restore', file, '--no-verify']).result;
  t.equal(result.stdout, 'hello from node-kvm!\n', 'unverified, the guest runs from the corrupt image');
  t.equal(result.status, 0, result.stderr);
});

/** process.stderr.write captured (and not printed) until restore() is called. */
function captureStderr() {
  const original = process.stderr.write;
  let text = '';
  let waiter: { line: string; resolve: () => void } | null = null;
  process.stderr.write = ((chunk: string | Uint8Array) => {
    text += typeof chunk === 'string' ? chunk : Buffer.from(chunk).toString();
    if (waiter && text.includes(waiter.line)) waiter.resolve();
    return true;
  }) as typeof process.stderr.write;
  return {
    text: () => text,
    waitFor: (line: string) => new Promise<void>((resolve) => {
      if (text.includes(line)) resolve();
      else waiter = { line, resolve };
    }),
    restore: () => {
      process.stderr.write = original;
    },
  };
}

t.test('run --incoming logs a refused connection and waits on', { skip: noKvm }, async (t) => {
  const dir = scratchDir(t);
  const socketPath = path.join(dir, 'in.sock');
  const address = `unix:${socketPath}`;
  const stderr = captureStderr();
  let outcome: unknown;
  let garbage: net.Socket | undefined;
  let source: net.Socket | undefined;
  try {
    const command = main(['run', '--incoming', address]);
    await stderr.waitFor(`node-kvm: listening for a migration on ${address}\n`);

    garbage = net.connect(socketPath);
    garbage.on('error', () => {});
    let answer = '';
    garbage.on('data', (chunk: Buffer) => (answer += chunk.toString('latin1')));
    // The destination logs a refusal as it closes the connection, before this end sees it closed.
    const closed = new Promise((resolve) => garbage!.on('close', resolve));
    garbage.write(Buffer.alloc(128, 0x5a)); // more than a source's hello (75 bytes), which is read whole
    await closed;
    t.match(answer, 'not a node-kvm migration source', 'the refused process is told why');
    const refusal = 'node-kvm: refused a migration connection from a local process: not a node-kvm migration source\n';
    t.equal(stderr.text(), `node-kvm: listening for a migration on ${address}\n${refusal}`, 'the refusal is logged');

    // A source that passes the handshake and then sends no stream header ends the wait: the
    // command fails with why, as it would for any broken migration.
    source = await connectForMigration(parseMigrationAddress(address));
    source.on('error', () => {});
    source.resume();
    source.write(Buffer.alloc(68));
    outcome = await command;
    t.equal(stderr.text(), `node-kvm: listening for a migration on ${address}\n${refusal}` +
      "node-kvm: not a node-kvm migration stream or snapshot: the first 8 bytes are 0000000000000000, expected 'NODE-KVM'\n",
    'nothing more is logged, and the command ends on the bad stream with why');
  } finally {
    stderr.restore();
    garbage?.destroy();
    source?.destroy();
  }
  t.equal(outcome, 1, 'status 1');
});
