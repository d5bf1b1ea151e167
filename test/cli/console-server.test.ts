// The console served on a unix socket (serveConsole, behind run --serial unix:PATH): the echo
// guest's console with real clients (replay after a reconnect, a second client, a flooding client,
// one that leaves mid-stream), and a fake console for the bounds on output nobody takes.
import { once } from 'node:events';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Duplex } from 'node:stream';
import t, { type Test } from 'tap';
import { CONSOLE_BUSY_MESSAGE, CONSOLE_CLIENT_QUEUE_BYTES, CONSOLE_REPLAY_BYTES, serveConsole } from '../../lib/cli/serial.js';
import { Machine } from '../../lib/vmm/machine.js';
import { connectConsole } from '../helpers/console-client.js';
import { noKvm, repoRoot } from '../helpers/kvm.js';
import { sharedPool } from '../helpers/pool.js';

const KIB = 1024;
const echoImage = path.join(repoRoot, 'guests', 'build', 'echo.bin');
if (!noKvm) sharedPool();

function socketPath(t: Test): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nkvm-console-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  return path.join(dir, 'console.sock');
}

/** Resolves once `count` bytes have gone by on the machine's console (read by the server too). */
function consoleOutput(machine: Machine): { text(): string; waitFor(expected: string): Promise<void>; bytes(): number; waitForBytes(count: number): Promise<void> } {
  let text = '';
  const waiters = new Set<() => void>();
  machine.console.on('data', (chunk: Buffer) => {
    text += chunk.toString('latin1');
    for (const waiter of waiters) waiter();
  });
  const until = (done: () => boolean) => new Promise<void>((resolve) => {
    const check = () => {
      if (!done()) return;
      waiters.delete(check);
      resolve();
    };
    waiters.add(check);
    check();
  });
  return {
    text: () => text,
    bytes: () => text.length,
    waitFor: (expected) => until(() => text.includes(expected)),
    waitForBytes: (count) => until(() => text.length >= count),
  };
}

t.test('the echo guest on a console socket: replay, one client at a time, floods and departures', { skip: noKvm }, async (t) => {
  const file = socketPath(t);
  const machine = await Machine.create({ image: echoImage, memoryBytes: 1024 * KIB, pool: sharedPool() });
  t.teardown(() => machine.stop());
  const server = await serveConsole(file);
  t.teardown(() => server.close());
  server.attach(machine.console);
  const output = consoleOutput(machine);
  machine.start();

  const first = await connectConsole(file);
  await first.waitFor('echo> ');
  first.socket.write('ab');
  await first.waitFor('echo> ab');
  first.socket.destroy();
  await once(server, 'detached');

  // Output while nobody is attached is kept for the next client, and only that.
  machine.console.write('xyz');
  await output.waitFor('echo> abxyz');
  t.equal(server.stats().replayBytes, 3);
  const second = await connectConsole(file);
  await second.waitFor('xyz');
  t.equal(second.text(), 'xyz', 'the next client gets what it missed, nothing older');

  const third = await connectConsole(file);
  await third.closed;
  t.equal(third.text(), CONSOLE_BUSY_MESSAGE, 'a second client is told why and closed');
  t.equal(server.stats().refusedClients, 1);
  second.socket.write('1');
  await second.waitFor('xyz1');

  // A client that floods and never reads: its input is read only as the guest takes it, so the
  // rest waits in its own socket; the guest keeps echoing all the while.
  second.socket.pause();
  const flood = Buffer.alloc(1024 * KIB, 'a');
  second.socket.write(flood);
  const before = output.bytes();
  await output.waitForBytes(before + 8 * KIB);
  const stats = server.stats();
  t.ok(stats.inputPaused, 'the server stopped reading the client');
  t.ok(machine.console.writableLength <= 80 * KIB, `input queued for the guest is bounded (${machine.console.writableLength} bytes: the console's 16 KiB plus one read)`);
  t.ok(second.socket.writableLength > 512 * KIB, `the flood waits in the client's own socket (${second.socket.writableLength} bytes)`);
  t.ok(stats.clientQueuedBytes <= CONSOLE_CLIENT_QUEUE_BYTES);

  // It leaves mid-stream: the guest runs on (echoing what had been read), into the replay buffer.
  second.socket.destroy();
  await once(server, 'detached');
  const left = output.bytes();
  await output.waitForBytes(left + 2 * KIB);
  t.equal(machine.state, 'running');
  t.ok(server.stats().replayBytes >= 2 * KIB, 'what it echoes meanwhile is kept');

  const fourth = await connectConsole(file);
  await fourth.waitForBytes(2 * KIB);
  t.match(fourth.text(), /^a+$/, 'the next client gets the echo it missed');
  const exit = await machine.stop();
  t.equal(exit.reason, 'stopped');
  await server.close();
  await fourth.closed;
  t.notOk(fs.existsSync(file), 'the socket is removed');
});

/** A console whose output the test pushes, and which takes all input at once (emitting 'typed'). */
function fakeConsole(): Duplex {
  const console: Duplex = new Duplex({
    read() {},
    write(chunk: Buffer, _encoding, callback) {
      console.emit('typed', chunk.toString('latin1'));
      callback();
    },
  });
  return console;
}

t.test('output while nobody is attached: the latest 64 KiB are kept, the oldest dropped', async (t) => {
  const file = socketPath(t);
  const server = await serveConsole(file);
  const console = fakeConsole();
  // Its end, as a machine's console ends: the server closes without waiting for it.
  t.teardown(() => {
    console.push(null);
    return server.close();
  });
  server.attach(console);
  const total = 100 * KIB;
  const produced = Buffer.alloc(total);
  for (let i = 0; i < total; i++) produced[i] = (i * 7) & 0xff;
  for (let offset = 0; offset < total; offset += 3000) console.push(produced.subarray(offset, offset + 3000));
  // The server's reading starts flowing on the next tick; then it takes all that is buffered.
  await new Promise((resolve) => setImmediate(resolve));
  t.same(server.stats(), { clientAttached: false, replayBytes: CONSOLE_REPLAY_BYTES, droppedBytes: total - CONSOLE_REPLAY_BYTES, clientQueuedBytes: 0, inputPaused: false, refusedClients: 0 });
  const client = await connectConsole(file);
  await client.waitForBytes(CONSOLE_REPLAY_BYTES);
  t.ok(Buffer.from(client.text(), 'latin1').equals(produced.subarray(total - CONSOLE_REPLAY_BYTES)), 'the last 64 KiB, in order');
  const typed = once(console, 'typed');
  client.socket.write('typed');
  t.same(await typed, ['typed'], 'and its input reaches the console');
});

t.test('a client that never reads: output beyond 64 KiB queued for it is dropped, the rest arrives in order', async (t) => {
  const file = socketPath(t);
  const server = await serveConsole(file);
  const console = fakeConsole();
  // Its end, as a machine's console ends: the server closes without waiting for it.
  t.teardown(() => {
    console.push(null);
    return server.close();
  });
  server.attach(console);
  const client = await connectConsole(file);
  client.socket.pause();
  const total = 4096 * KIB;
  for (let offset = 0; offset < total; offset += 4 * KIB) console.push(Buffer.alloc(4 * KIB, (offset / (4 * KIB)) & 0xff));
  await new Promise((resolve) => setImmediate(resolve));
  const stats = server.stats();
  t.ok(stats.clientQueuedBytes <= CONSOLE_CLIENT_QUEUE_BYTES, `at most 64 KiB queued (${stats.clientQueuedBytes})`);
  t.ok(stats.droppedBytes >= total - 2048 * KIB, `the rest dropped (${stats.droppedBytes}; the kernel's socket buffer holds some)`);
  client.socket.resume();
  await client.waitForBytes(total - stats.droppedBytes);
  const received = Buffer.from(client.text(), 'latin1');
  t.equal(received.length + stats.droppedBytes, total, 'every byte either arrived or was counted as dropped');
  // Oldest first, nothing reordered: what arrived is a subsequence of what was produced.
  const produced = Buffer.concat(Array.from({ length: total / (4 * KIB) }, (_, chunk) => Buffer.alloc(4 * KIB, chunk & 0xff)));
  let next = 0;
  for (let offset = 0; offset < produced.length && next < received.length; offset++) if (produced[offset] === received[next]) next++;
  t.equal(next, received.length, 'what arrives is in order');
});
