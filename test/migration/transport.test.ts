// Migration transport: addresses, one authenticated connection per destination, the token
// handshake both ways, unix socket files, timeouts, hostile peers that hold connections open.
import { createHmac, randomBytes } from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import os from 'node:os';
import t, { type Test } from 'tap';
import {
  MIGRATION_PROTOCOL_VERSION, connectForMigration, formatMigrationAddress, listenForMigration, parseMigrationAddress,
  type ListenForMigrationOptions, type MigrationAddress,
} from '../../lib/migration/transport.js';
import { MigrationError } from '../../lib/migration/errors.js';
import { destinationReadsDeviceStateAhead, rehearseHandshake } from '../../lib/migration/handshake.js';

interface Listening {
  bound: MigrationAddress;
  accepted: Promise<net.Socket>;
  rejected: { reason: string; peer: string }[];
  /** Resolves at the next rejection. */
  nextRejection(): Promise<{ reason: string; peer: string }>;
  /** Resolves with the rejection at `index` (counting from 0) once it has been reported. */
  rejection(index: number): Promise<{ reason: string; peer: string }>;
}

async function listen(address: MigrationAddress, options: ListenForMigrationOptions = {}): Promise<Listening> {
  const rejected: { reason: string; peer: string }[] = [];
  const waiters: (() => void)[] = [];
  let onBound!: (bound: MigrationAddress) => void;
  const bound = new Promise<MigrationAddress>((resolve) => (onBound = resolve));
  const accepted = listenForMigration(address, {
    ...options,
    onListening: onBound,
    onRejected: (reason, peer) => {
      rejected.push({ reason, peer });
      for (const wake of waiters.splice(0)) wake();
    },
  });
  accepted.catch(() => {});
  const result = await Promise.race([bound, accepted.then(() => { throw new Error('accepted before listening'); })]);
  return {
    bound: result,
    accepted,
    rejected,
    nextRejection() {
      return this.rejection(rejected.length);
    },
    rejection(index) {
      return new Promise((resolve) => {
        const check = () => (rejected.length > index ? resolve(rejected[index]!) : waiters.push(check));
        check();
      });
    },
  };
}

/** A fresh directory with a short path: a unix socket path must fit in 107 bytes. */
function socketDir(t: Test, files: Record<string, string> = {}): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nkvm-transport-'));
  for (const [name, content] of Object.entries(files)) fs.writeFileSync(path.join(dir, name), content);
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

const tcpPort = (address: MigrationAddress) => (address.kind === 'tcp' ? address.port : -1);

async function rejection(promise: Promise<unknown>): Promise<MigrationError> {
  try {
    await promise;
  } catch (error) {
    return error as MigrationError;
  }
  throw new Error('expected a rejection');
}

/** Reads exactly `byteCount` bytes from a socket. */
function readBytes(socket: net.Socket, byteCount: number): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    let received = Buffer.alloc(0);
    const onData = (chunk: Buffer) => {
      received = Buffer.concat([received, chunk]);
      if (received.length >= byteCount) {
        socket.off('data', onData);
        socket.pause();
        if (received.length > byteCount) socket.unshift(received.subarray(byteCount));
        resolve(received.subarray(0, byteCount));
      }
    };
    socket.on('data', onData);
    socket.once('error', reject);
    socket.once('end', () => resolve(received));
  });
}

function rawConnect(address: MigrationAddress): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const socket = address.kind === 'unix' ? net.createConnection(address.path) : net.createConnection(address.port, '127.0.0.1');
    socket.once('connect', () => resolve(socket));
    socket.once('error', reject);
  });
}

t.test('tcp on port 0 with a token: the right token connects, bytes flow both ways, and later connections are refused', async (t) => {
  const destination = await listen({ kind: 'tcp', host: '', port: 0 }, { token: 'correct horse' });
  t.equal(destination.bound.kind, 'tcp');
  t.equal((destination.bound as { host: string }).host, '127.0.0.1', 'an empty host means loopback');
  t.ok(tcpPort(destination.bound) > 0, 'onListening gets the real port');
  const source = await connectForMigration({ kind: 'tcp', host: '127.0.0.1', port: tcpPort(destination.bound) }, { token: 'correct horse' });
  // Written at once: the destination must find it after the handshake, not lose it inside it.
  source.write('guest pages');
  const accepted = await destination.accepted;
  t.same(destination.rejected, []);
  t.equal((await readBytes(accepted, 11)).toString(), 'guest pages');
  accepted.write('ack');
  t.equal((await readBytes(source, 3)).toString(), 'ack');

  const late = await rejection(connectForMigration({ kind: 'tcp', host: '127.0.0.1', port: tcpPort(destination.bound) }, { token: 'correct horse' }));
  t.type(late, MigrationError);
  t.equal(late.code, 'ECONNECT');
  t.equal((late.cause as NodeJS.ErrnoException).code, 'ECONNREFUSED', 'the system error as cause');
  t.equal(late.message, `cannot connect to tcp:127.0.0.1:${tcpPort(destination.bound)}: ECONNREFUSED (is the destination listening?)`);
  source.destroy();
  accepted.destroy();
});

t.test('a wrong token fails the source; the destination reports it and waits for the right one', async (t) => {
  const destination = await listen({ kind: 'tcp', host: '127.0.0.1', port: 0 }, { token: 'right' });
  const address = { kind: 'tcp' as const, host: '127.0.0.1', port: tcpPort(destination.bound) };
  const rejectedOnce = destination.nextRejection();
  const wrong = await rejection(connectForMigration(address, { token: 'wrong' }));
  t.type(wrong, MigrationError);
  t.equal(wrong.code, 'EREFUSED');
  t.equal(wrong.message, 'migration refused: wrong token');
  const { reason, peer } = await rejectedOnce;
  t.equal(reason, 'wrong token');
  t.match(peer, /^127\.0\.0\.1:\d+$/);

  const source = await connectForMigration(address, { token: 'right' });
  const accepted = await destination.accepted;
  t.equal(destination.rejected.length, 1, 'the right token was not refused');
  source.destroy();
  accepted.destroy();
});

/** A destination's greeting with `flags` (bit 0: a token is required; bit 1: it reads DeviceStateAhead) and a zero nonce. */
function greeting(flags: number): Buffer {
  const bytes = Buffer.alloc(43);
  Buffer.from('NKVM-MIG').copy(bytes);
  bytes.writeUInt16BE(MIGRATION_PROTOCOL_VERSION, 8);
  bytes[10] = flags;
  return bytes;
}

t.test('the destination must prove the token too: an impostor gets no guest', async (t) => {
  // A listener that speaks the protocol but does not know the token.
  const impostor = net.createServer((socket) => {
    socket.write(greeting(0x01));
    void readBytes(socket, 75).then(async () => {
      socket.resume();
      socket.write(Buffer.concat([Buffer.of(0), Buffer.alloc(32, 0xab)]));
      const ack = await readBytes(socket, 1);
      acks.push(ack[0]!);
    });
  });
  const acks: number[] = [];
  await new Promise<void>((resolve) => impostor.listen(0, '127.0.0.1', resolve));
  const port = (impostor.address() as net.AddressInfo).port;
  const error = await rejection(connectForMigration({ kind: 'tcp', host: '127.0.0.1', port }, { token: 'secret' }));
  t.equal(error.code, 'EREFUSED');
  t.equal(error.message, 'migration refused: the destination does not hold the same token');
  await new Promise((resolve) => setTimeout(resolve, 50));
  t.same(acks, [1], 'the source told it so');
  impostor.close();
});

t.test('a destination whose greeting lacks the DeviceStateAhead bit (an older build) is sent none', async (t) => {
  // A destination without a token that answers as a build before the bit did.
  const older = net.createServer((socket) => {
    socket.write(greeting(0x00));
    void readBytes(socket, 75).then(() => socket.write(Buffer.concat([Buffer.of(0), Buffer.alloc(32)])));
    socket.on('error', () => {});
  });
  const olderPath = path.join(socketDir(t), 'older.sock');
  await new Promise<void>((resolve) => older.listen(olderPath, resolve));
  t.teardown(() => older.close());
  const source = await connectForMigration({ kind: 'unix', path: olderPath });
  t.equal(destinationReadsDeviceStateAhead(source), false, 'the source sends that destination the whole device state at the end');
  source.destroy();
});

t.test('whileConnecting (as the connection is asked for) and whileVerified (after the hello, before the verdict) each run once; what one throws fails the connection', async (t) => {
  const destination = await listen({ kind: 'tcp', host: '127.0.0.1', port: 0 }, { token: 'tok' });
  const address = { kind: 'tcp' as const, host: '127.0.0.1', port: tcpPort(destination.bound) };
  let accepted = false;
  void destination.accepted.then(() => (accepted = true), () => {});
  // What the destination was waiting for when the source gave up in each.
  const waitingFor = {
    whileConnecting: /(waited|waiting) for the source's hello/,
    whileVerified: /closed the connection while this side waited for the source's acknowledgement/,
  };
  for (const hook of ['whileConnecting', 'whileVerified'] as const) {
    // A wrong token: it ran; the verdict then refuses.
    let calls = 0;
    const wrong = await rejection(connectForMigration(address, { token: 'wrong', [hook]: () => void calls++ }));
    t.equal(wrong.code, 'EREFUSED', `${hook}: refused`);
    t.equal(calls, 1, `${hook}: called once, for a connection the destination then refused`);

    // What it throws: the connection fails with it, and the destination waits on.
    const failure = new MigrationError('EINTERNAL', 'tracking could not start');
    const rejectedNext = destination.nextRejection();
    const thrown = await rejection(connectForMigration(address, { token: 'tok', [hook]: () => { throw failure; } }));
    t.equal(thrown, failure, `${hook}: the error it threw, as it is`);
    t.match((await rejectedNext).reason, waitingFor[hook], `${hook}: the destination saw the source go`);
    await t.rejects(connectForMigration(address, { token: 'tok', [hook]: 1 as unknown as () => void }), { name: 'TypeError', message: `${hook} must be a function` });
  }
  t.equal(accepted, false, 'nothing accepted: no source acknowledged');

  // Both: in that order, each once, before the handshake ended.
  const order: string[] = [];
  const source = await connectForMigration(address, {
    token: 'tok',
    whileConnecting: () => void order.push(`connecting, accepted ${accepted}`),
    whileVerified: () => void order.push(`verified, accepted ${accepted}`),
  });
  order.push('connected');
  const socket = await destination.accepted;
  t.same(order, ['connecting, accepted false', 'verified, accepted false', 'connected']);
  source.destroy();
  socket.destroy();
});

t.test('the handshake rehearsal (before a destination listens) runs once per process and leaves nothing behind', async (t) => {
  const handles = (process as unknown as { _getActiveHandles(): unknown[] })._getActiveHandles().length;
  const first = rehearseHandshake();
  t.equal(rehearseHandshake(), first, 'the same rehearsal');
  t.equal(await first, undefined);
  t.equal((process as unknown as { _getActiveHandles(): unknown[] })._getActiveHandles().length, handles, 'no socket, no timer left');
});

t.test('tcp without a token is refused at listen and at connect', async (t) => {
  await t.rejects(listenForMigration({ kind: 'tcp', host: '127.0.0.1', port: 0 }), {
    name: 'TypeError',
    message: 'a token is required to listen for a migration over tcp (anyone who can reach the port could send a guest)',
  });
  await t.rejects(connectForMigration({ kind: 'tcp', host: '127.0.0.1', port: 4444 }), { name: 'TypeError', code: 'ERR_INVALID_ARG_TYPE', message: 'a token is required to migrate over tcp' });
  await t.rejects(listenForMigration({ kind: 'tcp', host: '127.0.0.1', port: 0 }, { token: '' }), { name: 'RangeError', code: 'ERR_INVALID_ARG_VALUE', message: 'token must not be empty' });
  await t.rejects(connectForMigration({ kind: 'tcp', host: '127.0.0.1', port: 0 }, { token: 'x' }), { name: 'RangeError', message: 'cannot connect to port 0 (tcp:127.0.0.1:0)' });
});

t.test('unix: the socket file is 0600 from the start, takes one connection, and is removed', async (t) => {
  const dir = socketDir(t);
  const socketPath = path.join(dir, 'migrate.sock');
  const destination = await listen({ kind: 'unix', path: socketPath });
  t.same(destination.bound, { kind: 'unix', path: socketPath });
  const stats = fs.lstatSync(socketPath);
  t.ok(stats.isSocket());
  t.equal(stats.mode & 0o777, 0o600);
  t.same(fs.readdirSync(dir), ['migrate.sock'], 'no private directory left behind');
  const source = await connectForMigration({ kind: 'unix', path: socketPath });
  const accepted = await destination.accepted;
  t.notOk(fs.existsSync(socketPath), 'removed once the migration is accepted');
  const second = await rejection(connectForMigration({ kind: 'unix', path: socketPath }));
  t.equal(second.code, 'ECONNECT');
  t.equal(second.message, `cannot connect to unix:${socketPath}: ENOENT (is the destination listening?)`);
  source.write('x');
  t.equal((await readBytes(accepted, 1)).toString(), 'x');
  source.destroy();
  accepted.destroy();
});

t.test('unix with a token: required of the source, and a tokenless destination is refused by a source with one', async (t) => {
  const dir = socketDir(t);
  const withToken = await listen({ kind: 'unix', path: path.join(dir, 'a.sock') }, { token: 't0k' });
  const rejectedOnce = withToken.nextRejection();
  const missing = await rejection(connectForMigration({ kind: 'unix', path: path.join(dir, 'a.sock') }));
  t.equal(missing.message, 'migration refused: a token is required');
  t.equal((await rejectedOnce).reason, 'a token is required');
  t.equal((await rejectedOnce).peer, 'a local process');
  const good = await connectForMigration({ kind: 'unix', path: path.join(dir, 'a.sock') }, { token: 't0k' });
  (await withToken.accepted).destroy();
  good.destroy();

  const tokenless = await listen({ kind: 'unix', path: path.join(dir, 'b.sock') });
  const closedOnce = tokenless.nextRejection();
  const refused = await rejection(connectForMigration({ kind: 'unix', path: path.join(dir, 'b.sock') }, { token: 't0k' }));
  t.equal(refused.code, 'EREFUSED');
  t.equal(refused.message, 'migration refused: the destination was started without a token, so it cannot prove it is the intended one');
  t.equal((await closedOnce).reason, 'handshake: the peer closed the connection while this side waited for the source\'s hello');
  const plain = await connectForMigration({ kind: 'unix', path: path.join(dir, 'b.sock') });
  (await tokenless.accepted).destroy();
  plain.destroy();
});

t.test('unix: an existing file is never replaced; a live socket is in use; a stale one is replaced', async (t) => {
  const dir = socketDir(t, { 'regular.sock': 'keep me' });
  const regular = path.join(dir, 'regular.sock');
  await t.rejects(listenForMigration({ kind: 'unix', path: regular }), {
    name: 'MigrationError',
    code: 'EEXIST',
    message: `cannot listen for a migration on unix:${regular}: refusing to replace ${regular}: it exists and is not a socket`,
  });
  t.equal(fs.readFileSync(regular, 'utf8'), 'keep me');

  const livePath = path.join(dir, 'live.sock');
  const live = net.createServer();
  await new Promise<void>((resolve) => live.listen(livePath, resolve));
  await t.rejects(listenForMigration({ kind: 'unix', path: livePath }), {
    name: 'MigrationError',
    code: 'EADDRINUSE',
    message: `cannot listen for a migration on unix:${livePath}: ${livePath} is in use: something is listening there`,
  });
  await new Promise((resolve) => live.close(resolve));

  // A socket file nobody listens on, as a killed process leaves it.
  const stalePath = path.join(dir, 'stale.sock');
  const stale = net.createServer();
  await new Promise<void>((resolve) => stale.listen(stalePath, resolve));
  const inode = fs.lstatSync(stalePath).ino;
  fs.linkSync(stalePath, path.join(dir, 'stale-copy'));
  await new Promise((resolve) => stale.close(resolve)); // libuv removes stale.sock itself...
  fs.renameSync(path.join(dir, 'stale-copy'), stalePath); // ...so put the dead socket back
  t.equal(fs.lstatSync(stalePath).ino, inode);
  const destination = await listen({ kind: 'unix', path: stalePath });
  t.not(fs.lstatSync(stalePath).ino, inode, 'a new socket in its place');
  const source = await connectForMigration({ kind: 'unix', path: stalePath });
  (await destination.accepted).destroy();
  source.destroy();
  t.same(fs.readdirSync(dir).sort(), ['regular.sock']);
});

t.test('timeouts: waiting for a migration, a silent source, a silent destination', async (t) => {
  const dir = socketDir(t);
  const waitPath = path.join(dir, 'wait.sock');
  const error = await rejection(listenForMigration({ kind: 'unix', path: waitPath }, { timeoutMs: 100 }));
  t.equal(error.code, 'ETIMEDOUT');
  t.equal(error.message, `no migration arrived on unix:${waitPath} within 100 ms`);
  t.notOk(fs.existsSync(waitPath), 'socket file removed');

  // A peer that connects and says nothing is dropped; the real source still gets in.
  const destination = await listen({ kind: 'unix', path: path.join(dir, 'slow.sock') }, { handshakeTimeoutMs: 100 });
  const silentRejected = destination.nextRejection();
  const silent = await rawConnect(destination.bound);
  silent.on('error', () => {});
  silent.resume();
  t.equal((await silentRejected).reason, 'handshake timed out after 100 ms waiting for the source\'s hello');
  const source = await connectForMigration(destination.bound);
  t.ok(destinationReadsDeviceStateAhead(source), 'the source knows from the greeting that this destination reads a DeviceStateAhead section');
  (await destination.accepted).destroy();
  source.destroy();
  silent.destroy();

  // A listener that never greets.
  const mute = net.createServer(() => {});
  const mutePath = path.join(dir, 'mute.sock');
  await new Promise<void>((resolve) => mute.listen(mutePath, resolve));
  const stalled = await rejection(connectForMigration({ kind: 'unix', path: mutePath }, { timeoutMs: 100 }));
  t.equal(stalled.code, 'ETIMEDOUT');
  t.equal(stalled.message, `migration connect to unix:${mutePath} timed out after 100 ms waiting for the greeting`);
  mute.close();
});

t.test('peers that do not speak the protocol', async (t) => {
  const dir = socketDir(t);
  const destination = await listen({ kind: 'unix', path: path.join(dir, 'd.sock') });
  const rejectedOnce = destination.nextRejection();
  const stranger = await rawConnect(destination.bound);
  const greeting = await readBytes(stranger, 43);
  t.equal(greeting.subarray(0, 8).toString(), 'NKVM-MIG');
  t.equal(greeting.readUInt16BE(8), MIGRATION_PROTOCOL_VERSION);
  t.equal(greeting[10]! & 0x01, 0, 'no token required');
  t.equal(greeting[10]! & 0x02, 0x02, 'it reads a DeviceStateAhead section');
  stranger.resume();
  stranger.write(Buffer.alloc(75, 0x41));
  const verdict = await readBytes(stranger, 1000);
  t.equal(verdict[0], 1, 'refused');
  t.equal(verdict.subarray(2, 2 + verdict[1]!).toString(), 'not a node-kvm migration source');
  t.equal((await rejectedOnce).reason, 'not a node-kvm migration source');
  const source = await connectForMigration(destination.bound);
  t.ok(destinationReadsDeviceStateAhead(source), 'the source knows from the greeting that this destination reads a DeviceStateAhead section');
  (await destination.accepted).destroy();
  source.destroy();

  const notMigration = net.createServer((socket) => socket.end('HTTP/1.1 400 Bad Request\r\n\r\n' + ' '.repeat(20)));
  const httpPath = path.join(dir, 'http.sock');
  await new Promise<void>((resolve) => notMigration.listen(httpPath, resolve));
  const error = await rejection(connectForMigration({ kind: 'unix', path: httpPath }));
  t.equal(error.code, 'EPROTO');
  t.equal(error.message, `migration connect to unix:${httpPath}: not a node-kvm migration destination`);
  notMigration.close();
});

t.test('listening can be aborted', async (t) => {
  const dir = socketDir(t);
  const controller = new AbortController();
  const socketPath = path.join(dir, 'abort.sock');
  const destination = await listen({ kind: 'unix', path: socketPath }, { signal: controller.signal });
  controller.abort();
  const error = await rejection(destination.accepted);
  t.type(error, MigrationError);
  t.equal(error.code, 'ABORT_ERR');
  t.equal(error.message, `stopped listening for a migration on unix:${socketPath}: aborted`);
  t.notOk(fs.existsSync(socketPath), 'the socket file is removed');
  t.notOk(fs.existsSync(socketPath));
});

t.test('addresses: parse and format', async (t) => {
  t.same(parseMigrationAddress('tcp:127.0.0.1:4444'), { kind: 'tcp', host: '127.0.0.1', port: 4444 });
  t.same(parseMigrationAddress('tcp:dest.example.org:0'), { kind: 'tcp', host: 'dest.example.org', port: 0 });
  t.same(parseMigrationAddress('tcp:[::1]:4444'), { kind: 'tcp', host: '::1', port: 4444 });
  t.same(parseMigrationAddress('tcp:0.0.0.0:65535'), { kind: 'tcp', host: '0.0.0.0', port: 65535 });
  t.same(parseMigrationAddress('unix:/run/vm.sock'), { kind: 'unix', path: '/run/vm.sock' });
  t.same(parseMigrationAddress('unix:relative.sock'), { kind: 'unix', path: 'relative.sock' });
  for (const text of ['tcp:127.0.0.1:4444', 'tcp:[::1]:4444', 'tcp:[fe80::1]:1', 'unix:/run/vm.sock']) {
    t.equal(formatMigrationAddress(parseMigrationAddress(text)), text);
  }
  const bad: [string, string][] = [
    ['127.0.0.1:4444', "migration address '127.0.0.1:4444' must be tcp:HOST:PORT or unix:PATH"],
    ['', "migration address '' must be tcp:HOST:PORT or unix:PATH"],
    ['udp:1.2.3.4:5', "migration address 'udp:1.2.3.4:5' must be tcp:HOST:PORT or unix:PATH"],
    ['tcp::4444', "migration address 'tcp::4444' has an empty host (tcp:HOST:PORT)"],
    ['tcp:host', "migration address 'tcp:host' has no port (tcp:HOST:PORT)"],
    ['tcp:host:', "migration address 'tcp:host:': port '' is not a number 0..65535"],
    ['tcp:host:65536', "migration address 'tcp:host:65536': port '65536' is not a number 0..65535"],
    ['tcp:host:-1', "migration address 'tcp:host:-1': port '-1' is not a number 0..65535"],
    ['tcp:host:44a', "migration address 'tcp:host:44a': port '44a' is not a number 0..65535"],
    ['tcp:::1:4444', "migration address 'tcp:::1:4444': write an IPv6 host in brackets, as tcp:[::1]:PORT"],
    ['tcp:[::1]4444', "migration address 'tcp:[::1]4444': an IPv6 host is written [ADDRESS]:PORT"],
    ['tcp:[nope]:1', "migration address 'tcp:[nope]:1': 'nope' is not an IPv6 address"],
    ['tcp:a b:1', "migration address 'tcp:a b:1': 'a b' is not a host name or address"],
    ['unix:', "migration address 'unix:' has an empty path (unix:PATH)"],
    ['unix:/a\0b', "migration address 'unix:/a\0b': the path contains a NUL byte"],
    [`unix:/${'x'.repeat(107)}`, `migration address 'unix:/${'x'.repeat(107)}': the socket path is 108 bytes, at most 107 fit in sockaddr_un`],
  ];
  for (const [text, message] of bad) t.throws(() => parseMigrationAddress(text), { name: 'RangeError', code: 'ERR_INVALID_ARG_VALUE', message }, JSON.stringify(text));
  t.throws(() => parseMigrationAddress(42 as unknown as string), { name: 'TypeError', message: 'address must be a string' });
  await t.rejects(listenForMigration({ kind: 'tcp', host: '127.0.0.1', port: 70000 }, { token: 'x' }), { name: 'RangeError', code: 'ERR_OUT_OF_RANGE', message: 'address.port must be an integer 0..65535, got 70000' });
  await t.rejects(listenForMigration({ kind: 'serial' } as unknown as MigrationAddress), { name: 'TypeError', message: "address.kind must be 'tcp' or 'unix'" });
  await t.rejects(listenForMigration({ kind: 'unix', path: '/tmp/x.sock' }, { timeoutMs: -5 }), { name: 'RangeError', message: 'timeoutMs must be a positive number of milliseconds, got -5' });
});

const GREETING_BYTES = 43;
const NOT_A_SOURCE = 'not a node-kvm migration source';

/** The first `byteCount` bytes, or fewer if the peer closes first; the socket is left flowing. */
function firstBytes(socket: net.Socket, byteCount: number): Promise<Buffer> {
  return new Promise((resolve) => {
    let received = Buffer.alloc(0);
    const done = () => {
      socket.off('data', onData);
      socket.off('close', done);
      socket.on('data', () => {});
      resolve(received.subarray(0, byteCount));
    };
    const onData = (chunk: Buffer) => {
      received = Buffer.concat([received, chunk]);
      if (received.length >= byteCount) done();
    };
    socket.on('data', onData);
    socket.once('close', done);
  });
}

function closed(socket: net.Socket): Promise<void> {
  return new Promise((resolve) => (socket.closed ? resolve() : socket.once('close', () => resolve())));
}

interface Peer {
  socket: net.Socket;
  /** As the destination names it over tcp (taken at once: a closed socket no longer knows it). */
  tcpName: string;
  /** The destination's greeting, or what arrived of it before the connection closed. */
  greeting: Promise<Buffer>;
  closed: Promise<void>;
}

/** Raw connections a test opens (sending `firstWrite` at once); every one is destroyed at teardown. */
function hostilePeers(t: Test, address: MigrationAddress) {
  const sockets: net.Socket[] = [];
  t.teardown(() => {
    for (const socket of sockets) socket.destroy();
  });
  return async (firstWrite?: Buffer): Promise<Peer> => {
    const socket = await rawConnect(address);
    socket.on('error', () => {});
    sockets.push(socket);
    if (firstWrite) socket.write(firstWrite);
    return { socket, tcpName: `127.0.0.1:${socket.localPort}`, greeting: firstBytes(socket, GREETING_BYTES), closed: closed(socket) };
  };
}

/** How many rejections with `reason` were reported, one by one or in the summaries. */
function countRejections(rejected: { reason: string }[], reason: string): { total: number; others: string[] } {
  let total = 0;
  const others: string[] = [];
  for (const entry of rejected) {
    const summary = /^(.*) \(the last of (\d+) connections? refused, not reported one by one: at most \d+ reports a second\)$/.exec(entry.reason);
    if (entry.reason === reason) total++;
    else if (summary && summary[1] === reason) total += Number(summary[2]);
    else others.push(entry.reason);
  }
  return { total, others };
}

for (const kind of ['unix', 'tcp'] as const) {
  t.test(`${kind}: 50 idle and 50 garbage connections held open do not keep the real source out`, async (t) => {
    const token = kind === 'tcp' ? 'flood token' : undefined;
    const address: MigrationAddress = kind === 'unix' ? { kind, path: path.join(socketDir(t), 'flood.sock') } : { kind, host: '127.0.0.1', port: 0 };
    const destination = await listen(address, { token });
    const open = hostilePeers(t, destination.bound);
    const idle = await Promise.all(Array.from({ length: 50 }, () => open()));
    const idleGreetings = await Promise.all(idle.map((peer) => peer.greeting));
    t.equal(idleGreetings.filter((greeting) => greeting.length === GREETING_BYTES).length, 50, 'every idle connection was taken in and greeted');
    const garbage = await Promise.all(Array.from({ length: 50 }, () => open(randomBytes(64))));
    await Promise.all(garbage.map((peer) => peer.closed));
    t.same(countRejections(destination.rejected, NOT_A_SOURCE).others, [], 'the garbage senders were refused at once');

    const started = performance.now();
    const source = await connectForMigration(destination.bound, { token });
    const elapsedMs = performance.now() - started;
    t.ok(elapsedMs < 2000, `the handshake took ${elapsedMs.toFixed(0)} ms with 50 idle connections held open`);
    t.teardown(() => source.destroy());
    const accepted = await destination.accepted;
    t.teardown(() => accepted.destroy());
    const { total, others } = countRejections(destination.rejected, NOT_A_SOURCE);
    t.equal(total, 50, 'each garbage sender reported, one by one or counted');
    t.same(others, [], 'no idle connection had been dropped');
    source.write('guest pages');
    t.equal((await readBytes(accepted, 11)).toString(), 'guest pages');
    accepted.write('ack');
    t.equal((await readBytes(source, 3)).toString(), 'ack');
    await Promise.all(idle.map((peer) => peer.closed));
    t.equal(idle.filter((peer) => peer.socket.destroyed).length, 50, 'the destination closed the idle connections once the migration was accepted');
  });
}

t.test('a peer that sends its hello a byte at a time is dropped at the hello window', async (t) => {
  const destination = await listen({ kind: 'tcp', host: '127.0.0.1', port: 0 }, { token: 'secret', helloTimeoutMs: 300 });
  const open = hostilePeers(t, destination.bound);
  const { socket: loris, tcpName, greeting, closed: lorisClosed } = await open();
  const hello = Buffer.concat([Buffer.from('NKVM-MIG'), Buffer.of(0, MIGRATION_PROTOCOL_VERSION, 1), randomBytes(64)]);
  const dropped = destination.nextRejection();
  t.equal((await greeting).length, GREETING_BYTES);
  let sentBytes = 0;
  const trickle = setInterval(() => {
    if (sentBytes < hello.length) loris.write(hello.subarray(sentBytes, ++sentBytes));
  }, 10);
  t.teardown(() => clearInterval(trickle));
  const { reason, peer } = await dropped;
  clearInterval(trickle);
  const match = /^handshake timed out after 300 ms waiting for the source's hello \((\d+) of 75 bytes arrived\)$/.exec(reason);
  t.ok(match, reason);
  const arrivedBytes = Number(match?.[1]);
  t.ok(arrivedBytes > 8 && arrivedBytes < 75, `dropped with ${arrivedBytes} bytes of the hello in, still arriving`);
  t.equal(peer, tcpName);
  await lorisClosed;
  t.equal(destination.rejected.length, 1);

  const source = await connectForMigration(destination.bound, { token: 'secret' });
  (await destination.accepted).destroy();
  source.destroy();
});

t.test('a source that proved the token has the whole handshake limit for its acknowledgement', async (t) => {
  const token = 'secret';
  const destination = await listen({ kind: 'tcp', host: '127.0.0.1', port: 0 }, { token, helloTimeoutMs: 100, handshakeTimeoutMs: 400 });
  const open = hostilePeers(t, destination.bound);
  const { socket: mute, tcpName, greeting: greeted } = await open();
  const greeting = await greeted;
  const nonceS = randomBytes(32);
  const nonceD = greeting.subarray(11);
  const proofS = createHmac('sha256', token).update('node-kvm migration source').update(nonceD).update(nonceS).digest();
  const dropped = destination.nextRejection();
  const verdict = firstBytes(mute, 33);
  mute.write(Buffer.concat([Buffer.from('NKVM-MIG'), Buffer.of(0, MIGRATION_PROTOCOL_VERSION, 1), nonceS, proofS]));
  t.equal((await verdict)[0], 0, 'accepted; it never acknowledges');
  t.same(await dropped, { reason: 'handshake timed out after 400 ms waiting for the source\'s acknowledgement', peer: tcpName });

  const source = await connectForMigration(destination.bound, { token });
  (await destination.accepted).destroy();
  source.destroy();
});

t.test('at the cap, the oldest unauthenticated connection is dropped for the new one', async (t) => {
  const destination = await listen({ kind: 'tcp', host: '127.0.0.1', port: 0 }, { token: 'secret', maxUnauthenticatedConnections: 3, handshakeTimeoutMs: 2000 });
  const open = hostilePeers(t, destination.bound);
  const held: Peer[] = [];
  for (let i = 0; i < 3; i++) {
    const peer = await open();
    t.equal((await peer.greeting).length, GREETING_BYTES);
    held.push(peer);
  }
  const reason = 'dropped for a newer connection: 3 connections were already waiting to prove themselves';
  const firstDropped = destination.nextRejection();
  const fourth = await open();
  t.equal((await fourth.greeting).length, GREETING_BYTES, 'the new connection is taken in');
  t.same(await firstDropped, { reason, peer: held[0]!.tcpName });
  const firstClosed = await Promise.race([held[0]!.closed.then(() => 'the oldest'), fourth.closed.then(() => 'the new one')]);
  t.equal(firstClosed, 'the oldest', 'the oldest was closed, not the new one');

  const source = await connectForMigration(destination.bound, { token: 'secret' });
  t.teardown(() => source.destroy());
  const accepted = await destination.accepted;
  t.teardown(() => accepted.destroy());
  await Promise.all([held[1]!.closed, held[2]!.closed, fourth.closed]);
  t.same(destination.rejected, [{ reason, peer: held[0]!.tcpName }, { reason, peer: held[1]!.tcpName }],
    'the next oldest was dropped for the source; those left were closed with the listener, not reported');
});

t.test('rejections are reported at most rejectionReportsPerSecond a second, the rest counted', async (t) => {
  const dir = socketDir(t);
  const controller = new AbortController();
  const destination = await listen({ kind: 'unix', path: path.join(dir, 'r.sock') }, { rejectionReportsPerSecond: 2, signal: controller.signal });
  const open = hostilePeers(t, destination.bound);
  const request = Buffer.from('GET / HTTP/1.1\r\n\r\n');
  const refuse = async (count: number) => Promise.all((await Promise.all(Array.from({ length: count }, () => open(request)))).map((peer) => peer.closed));
  const one = { reason: NOT_A_SOURCE, peer: 'a local process' };

  await refuse(5);
  t.same(destination.rejected, [one, one], 'two reported one by one');
  const summary = await destination.rejection(2);
  t.same(summary, { reason: `${NOT_A_SOURCE} (the last of 3 connections refused, not reported one by one: at most 2 reports a second)`, peer: 'a local process' });

  await refuse(3);
  t.equal(destination.rejected.length, 5, 'a new second: two more reported');
  controller.abort();
  await rejection(destination.accepted);
  t.same(destination.rejected.slice(3), [one, one, {
    reason: `${NOT_A_SOURCE} (the last of 1 connection refused, not reported one by one: at most 2 reports a second)`,
    peer: 'a local process',
  }], 'the count is reported when listening ends');
});

t.test('an onRejected that throws does not end the wait', async (t) => {
  const dir = socketDir(t);
  const socketPath = path.join(dir, 'throw.sock');
  let calls = 0;
  const accepted = listenForMigration({ kind: 'unix', path: socketPath }, {
    onRejected: () => {
      calls++;
      throw new Error('the log is full');
    },
  });
  accepted.catch(() => {});
  while (!fs.existsSync(socketPath)) await new Promise((resolve) => setImmediate(resolve));
  const open = hostilePeers(t, { kind: 'unix', path: socketPath });
  await (await open(Buffer.alloc(75, 0x41))).closed;
  t.equal(calls, 1);
  const source = await connectForMigration({ kind: 'unix', path: socketPath });
  (await accepted).destroy();
  source.destroy();
});

t.test('the hello window, the cap and the report rate are checked', async (t) => {
  const address: MigrationAddress = { kind: 'unix', path: path.join(socketDir(t), 'never.sock') };
  await t.rejects(listenForMigration(address, { helloTimeoutMs: 0, timeoutMs: 100 }), { name: 'RangeError', message: 'helloTimeoutMs must be a positive number of milliseconds, got 0' });
  await t.rejects(listenForMigration(address, { maxUnauthenticatedConnections: 1.5, timeoutMs: 100 }), { name: 'RangeError', message: 'maxUnauthenticatedConnections must be a positive integer, got 1.5' });
  await t.rejects(listenForMigration(address, { rejectionReportsPerSecond: 0, timeoutMs: 100 }), { name: 'RangeError', message: 'rejectionReportsPerSecond must be a positive integer, got 0' });
  t.notOk(fs.existsSync(address.path));
});

t.test('unix: a source that finds the backlog full (a burst of connections) tries again until its deadline', async (t) => {
  const dir = socketDir(t);
  const destination = await listen({ kind: 'unix', path: path.join(dir, 'burst.sock') });
  const socketPath = (destination.bound as { path: string }).path;
  const burst: net.Socket[] = [];
  t.teardown(() => {
    for (const socket of burst) socket.destroy();
  });
  let backlogFullCount = 0;
  // connect() happens within createConnection, so the destination accepts none of them meanwhile.
  for (let i = 0; i < 1000; i++) {
    const socket = net.createConnection(socketPath);
    socket.on('error', (error: NodeJS.ErrnoException) => {
      if (error.code === 'EAGAIN') backlogFullCount++;
    });
    burst.push(socket);
  }
  const source = await connectForMigration(destination.bound, { timeoutMs: 5000 });
  t.teardown(() => source.destroy());
  t.ok(backlogFullCount > 0, `${backlogFullCount} of the burst found the backlog full`);
  const accepted = await destination.accepted;
  t.teardown(() => accepted.destroy());
  source.write('x');
  t.equal((await readBytes(accepted, 1)).toString(), 'x');
});
