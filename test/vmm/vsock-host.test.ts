// The library's host end of vsock (VsockHost) against the device model and a fake guest:
// connect() speaks CONNECT/OK and hands over a stream, listen() serves the guest's connections.
import t from 'tap';
import { VsockHost } from '../../lib/vmm/vsock-host.js';
import { VsockOp } from '../../lib/devices/virtio-vsock-packet.js';
import { FakeVsockGuest, until } from '../helpers/vsock-driver.js';

async function guest(t: { teardown(fn: () => void): void }): Promise<FakeVsockGuest> {
  const g = new FakeVsockGuest();
  t.teardown(() => g.close());
  g.init();
  return g;
}

t.test('connect(port) resolves with a stream once the guest accepts; bytes both ways', async (t) => {
  const g = await guest(t);
  const host = new VsockHost(g.uds);
  const pending = host.connect(5000);
  const request = await g.nextOp(VsockOp.Request);
  g.send({ op: VsockOp.Response, srcPort: 5000, dstPort: request.header.srcPort });
  // The guest writes at once: those bytes follow the OK line and belong to the stream.
  g.send({ op: VsockOp.Rw, srcPort: 5000, dstPort: request.header.srcPort }, Buffer.from('first'));
  const stream = await pending;
  t.equal(stream.hostPort, request.header.srcPort);
  const received: Buffer[] = [];
  stream.on('data', (chunk: Buffer) => received.push(chunk));
  await until(() => Buffer.concat(received).toString() === 'first', 'first bytes');
  stream.write('ping');
  t.equal((await g.nextOp(VsockOp.Rw)).payload.toString(), 'ping');
  stream.destroy();
});

t.test('connect(port) rejects with ECONNRESET when the guest refuses; bad ports throw', async (t) => {
  const g = await guest(t);
  const host = new VsockHost(g.uds);
  const pending = host.connect(5999);
  const request = await g.nextOp(VsockOp.Request);
  g.send({ op: VsockOp.Rst, srcPort: 5999, dstPort: request.header.srcPort });
  await t.rejects(pending, { code: 'ECONNRESET' });
  t.throws(() => host.connect(-1), { code: 'ERR_INVALID_ARG_VALUE' });
  await t.rejects(new VsockHost(`${g.dir}/nothing`).connect(1), { code: 'ENOENT' });
  const controller = new AbortController();
  const aborted = host.connect(6000, { signal: controller.signal });
  await g.nextOp(VsockOp.Request);
  controller.abort();
  await t.rejects(aborted, { code: 'ABORT_ERR' });
});

t.test('listen(port) serves the guest connections to that host port', async (t) => {
  const g = await guest(t);
  const host = new VsockHost(g.uds);
  const got: Buffer[] = [];
  const sockets: import('node:net').Socket[] = [];
  const server = await host.listen(5001, (socket) => {
    sockets.push(socket);
    socket.on('data', (chunk: Buffer) => got.push(chunk));
  });
  g.send({ op: VsockOp.Request, srcPort: 40000, dstPort: 5001 });
  await g.nextOp(VsockOp.Response);
  g.send({ op: VsockOp.Rw, srcPort: 40000, dstPort: 5001 }, Buffer.from('hello from the guest\n'));
  await until(() => Buffer.concat(got).toString() === 'hello from the guest\n', 'hello');
  for (const socket of sockets) socket.destroy();
  await new Promise((resolve) => server.close(resolve));
  g.send({ op: VsockOp.Request, srcPort: 40001, dstPort: 5001 });
  t.equal((await g.nextOp(VsockOp.Rst)).header.dstPort, 40001, 'closed: the guest is refused');
});
