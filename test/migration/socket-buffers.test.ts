// Socket buffers for migration connections: Node cannot size a stream socket's buffers itself.
import net from 'node:net';
import { mkdtempSync, openSync, closeSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import t from 'tap';
import { native } from '../../lib/kvm/native.js';
import { enlargeSocketBuffers } from '../../lib/migration/socket-buffers.js';

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
