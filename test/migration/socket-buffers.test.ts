// Socket buffers for migration connections: Node cannot size a stream socket's buffers itself.
import net from 'node:net';
import { mkdtempSync, openSync, closeSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import t, { type Test } from 'tap';
import { native } from '../../lib/kvm/native.js';
import { randomBytes } from 'node:crypto';
import { enlargeSocketBuffers, reopenWithReadBuffer } from '../../lib/migration/socket-buffers.js';
import { SectionBufferPool } from '../../lib/migration/writers.js';
import { keepFromChildren, spinRead } from '../../lib/kvm/host.js';
import { Worker } from 'node:worker_threads';
import { spawnSync } from 'node:child_process';

t.test('setSocketBuffers sizes a unix socket\'s buffers and reports what the kernel set', async (t) => {
  const dir = mkdtempSync(path.join(tmpdir(), 'node-kvm-sock-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const socketPath = path.join(dir, 's');
  const server = net.createServer();
  await new Promise<void>((resolve) => server.listen(socketPath, resolve));
  t.teardown(() => server.close());
  const accepted = new Promise<net.Socket>((resolve) => server.once('connection', resolve));
  const client = net.connect(socketPath);
  await new Promise((resolve) => client.once('connect', resolve));
  const peer = await accepted;
  t.teardown(() => {
    client.destroy();
    peer.destroy();
  });
  const fd = (client as unknown as { _handle: { fd: number } })._handle.fd;
  const [before] = native.setSocketBuffers(fd, 0, 0);
  const [send, receive] = native.setSocketBuffers(fd, 1 << 20, 1 << 20);
  t.ok(send > before, `the send buffer grew (${before} -> ${send})`);
  t.ok(send >= 1 << 20 && receive >= 1 << 20, 'at least what was asked (Linux doubles it)');
  enlargeSocketBuffers(peer);
  const [peerSend] = native.setSocketBuffers((peer as unknown as { _handle: { fd: number } })._handle.fd, 0, 0);
  t.ok(peerSend >= 1 << 20, 'enlargeSocketBuffers() on the accepted side');
});

t.test('setSocketBuffers refuses what is not a socket, and bad arguments', async (t) => {
  const dir = mkdtempSync(path.join(tmpdir(), 'node-kvm-sock-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const fd = openSync(path.join(dir, 'file'), 'w');
  t.teardown(() => closeSync(fd));
  t.throws(() => native.setSocketBuffers(fd, 4096, 4096), { code: 'ENOTSOCK', syscall: 'getsockopt(SO_TYPE)' });
  t.throws(() => native.setSocketBuffers(-1, 4096, 4096), RangeError);
  t.throws(() => native.setSocketBuffers(fd, -5, 0), RangeError);
  t.throws(() => native.setSocketBuffers('3' as unknown as number, 0, 0), TypeError);
});

async function connectedPair(t: Test, kind: 'tcp' | 'unix'): Promise<[net.Socket, net.Socket]> {
  const server = net.createServer({ pauseOnConnect: true });
  if (kind === 'unix') {
    const dir = mkdtempSync(path.join(tmpdir(), 'node-kvm-sock-'));
    t.teardown(() => rmSync(dir, { recursive: true, force: true }));
    await new Promise<void>((resolve) => server.listen(path.join(dir, 's'), resolve));
  } else {
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  }
  const address = server.address()!;
  t.teardown(() => server.close());
  const accepted = new Promise<net.Socket>((resolve) => server.once('connection', resolve));
  const client = typeof address === 'string' ? net.connect(address) : net.connect(address.port, '127.0.0.1');
  await new Promise((resolve) => client.once('connect', resolve));
  const peer = await accepted;
  t.teardown(() => {
    client.destroy();
    peer.destroy();
  });
  return [client, peer];
}

for (const kind of ['tcp', 'unix'] as const) {
  t.test(`reopenWithReadBuffer (${kind}): the same connection, read in pieces up to the buffer's size, writable both ways`, async (t) => {
    const [client, peer] = await connectedPair(t, kind);
    const buffer = Buffer.alloc(256 * 1024);
    const received: Buffer[] = [];
    let largest = 0;
    const reopened = reopenWithReadBuffer(peer, buffer, (bytes) => {
      t.equal(bytes.buffer, buffer.buffer, 'each read lands in the buffer given');
      largest = Math.max(largest, bytes.length);
      received.push(Buffer.from(bytes));
    });
    t.teardown(() => reopened.destroy());
    t.ok(peer.destroyed, 'the old socket is gone');
    const data = randomBytes(8 * 1024 * 1024);
    client.write(data);
    while (received.reduce((sum, chunk) => sum + chunk.length, 0) < data.length) await new Promise((resolve) => setTimeout(resolve, 5));
    t.ok(Buffer.concat(received).equals(data), 'every byte, in order');
    t.ok(largest > 64 * 1024 && largest <= buffer.length, `reads larger than Node's 64 KiB (largest ${largest})`);
    const answer = new Promise<Buffer>((resolve) => client.once('data', resolve));
    reopened.write('back');
    t.equal((await answer).toString(), 'back', 'the new socket writes to the same peer');
    const ended = new Promise((resolve) => reopened.once('end', resolve));
    reopened.resume();
    client.end();
    await ended;
    t.ok(reopened.readableEnded, 'the peer closing ends the new socket');
  });
}

t.test('reopenWithReadBuffer refuses a socket with unread bytes, a closed one, and bad arguments', async (t) => {
  const [client, peer] = await connectedPair(t, 'tcp');
  client.write('early');
  peer.resume();
  peer.pause();
  await new Promise((resolve) => setTimeout(resolve, 50));
  peer.unshift(Buffer.from('unread'));
  t.throws(() => reopenWithReadBuffer(peer, Buffer.alloc(16), () => {}), { message: /unread bytes/ });
  t.throws(() => reopenWithReadBuffer(peer, new Uint8Array(0), () => {}), TypeError);
  t.throws(() => reopenWithReadBuffer(peer, Buffer.alloc(16), null as never), TypeError);
  peer.destroy();
  t.throws(() => reopenWithReadBuffer(peer, Buffer.alloc(16), () => {}), { message: /no file descriptor/ });
  t.throws(() => native.dupSocket(-1), RangeError);
  const dir = mkdtempSync(path.join(tmpdir(), 'node-kvm-sock-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const fd = openSync(path.join(dir, 'file'), 'w');
  t.teardown(() => closeSync(fd));
  t.throws(() => native.dupSocket(fd), { code: 'ENOTSOCK' });
});

t.test('the section buffers are left out of spawned children: written again after a spawn, they take no copy-on-write faults', async (t) => {
  const pool = new SectionBufferPool();
  const slabs = Array.from({ length: 4 }, () => pool.allocate(SectionBufferPool.SLAB_BYTES));
  t.teardown(() => slabs.forEach((slab) => pool.release(slab)));
  for (const slab of slabs) slab.fill(1);
  const faults = () => process.resourceUsage().minorPageFault;
  spawnSync(process.execPath, ['-e', '']);
  const before = faults();
  for (const slab of slabs) slab.fill(2);
  const pages = (4 * SectionBufferPool.SLAB_BYTES) / 4096;
  // Without it every page would fault once (about 2,100); a few others may come from elsewhere.
  t.ok(faults() - before < pages / 10, `${faults() - before} faults writing ${pages} pages again`);
  // A plain ArrayBuffer does fault, as the comparison this test relies on.
  const plain = new Uint8Array(SectionBufferPool.SLAB_BYTES).fill(1);
  spawnSync(process.execPath, ['-e', '']);
  const plainBefore = faults();
  plain.fill(2);
  t.ok(faults() - plainBefore > pages / 8, `a plain buffer: ${faults() - plainBefore} faults for ${pages / 4} pages`);
  t.equal(keepFromChildren(new ArrayBuffer(100)), true, 'a buffer without a whole page is nothing to do');
  t.throws(() => keepFromChildren(new Uint8Array(8) as unknown as ArrayBuffer), { code: 'ERR_INVALID_ARG_TYPE' });
});

t.test('spinRead: what is there at once, what comes while it spins, the end of the stream, nothing in time', async (t) => {
  const [client, peer] = await connectedPair(t, 'unix');
  const fd = (peer as unknown as { _handle: { fd: number } })._handle.fd;
  const buffer = new Uint8Array(64);
  client.write('ready');
  t.equal(spinRead(fd, buffer, 100), 5, 'five bytes');
  t.equal(Buffer.from(buffer.subarray(0, 5)).toString(), 'ready');

  const started = performance.now();
  t.equal(spinRead(fd, buffer, 20), -1, '-1 when nothing came');
  t.ok(performance.now() - started >= 20, 'after spinning for maxMs');

  // Written by another thread while this one spins: no turn of the event loop is needed.
  const writerFd = (client as unknown as { _handle: { fd: number } })._handle.fd;
  const worker = new Worker(`
    const { workerData } = require('node:worker_threads');
    Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 20);
    require('node:fs').writeSync(workerData, 'late');`, { eval: true, workerData: writerFd });
  const exited = new Promise((resolve) => worker.once('exit', resolve));
  t.equal(spinRead(fd, buffer, 1000), 4, 'the bytes written meanwhile');
  t.equal(Buffer.from(buffer.subarray(0, 4)).toString(), 'late');
  await exited;

  client.end();
  await new Promise((resolve) => client.once('finish', resolve));
  t.equal(spinRead(fd, buffer, 1000), 0, '0 at the end of the stream');
});

t.test('spinRead refuses bad arguments, and what is not a socket', async (t) => {
  const dir = mkdtempSync(path.join(tmpdir(), 'node-kvm-sock-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const fd = openSync(path.join(dir, 'file'), 'w');
  t.teardown(() => closeSync(fd));
  t.throws(() => spinRead(fd, new Uint8Array(8), 1), { code: 'ENOTSOCK', syscall: 'recv' });
  t.throws(() => spinRead(-1, new Uint8Array(8), 1), RangeError);
  t.throws(() => spinRead(fd, new Uint8Array(0), 1), RangeError);
  t.throws(() => spinRead(fd, [] as unknown as Uint8Array, 1), TypeError);
  t.throws(() => spinRead(fd, new Uint8Array(8), 1001), RangeError);
  t.throws(() => spinRead(fd, new Uint8Array(8), '1' as unknown as number), TypeError);
  t.throws(() => native.spinRead(fd, new Uint16Array(4) as unknown as Uint8Array, 1), TypeError);
});
