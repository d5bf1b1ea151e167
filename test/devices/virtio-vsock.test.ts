// The virtio-vsock device model driven packet by packet from a fake guest (test/helpers/
// vsock-driver.ts) against real unix sockets: the hybrid CONNECT/OK handshake, guest connections
// to host listeners, RST, shutdown, credit both ways, hostile rings, park and restore.
import t from 'tap';
import { once } from 'node:events';
import { existsSync, readdirSync, statSync } from 'node:fs';
import { createConnection, createServer, type Server, type Socket } from 'node:net';
import { Reg, Status } from '../../lib/devices/virtio-mmio.js';
import { checkVsockConfig, VirtioVsockDevice, vsockModel } from '../../lib/devices/virtio-vsock.js';
import { VSOCK_BUFFER_BYTES } from '../../lib/devices/virtio-vsock-connection.js';
import { VSOCK_FIRST_HOST_PORT } from '../../lib/devices/virtio-vsock-muxer.js';
import { VSOCK_HOST_CID, VsockOp, VsockShutdown } from '../../lib/devices/virtio-vsock-packet.js';
import { FakeVsockGuest, GUEST_CID, until, type Packet } from '../helpers/vsock-driver.js';

async function guest(t: { teardown(fn: () => void): void }): Promise<FakeVsockGuest> {
  const g = new FakeVsockGuest();
  t.teardown(() => g.close());
  g.init();
  return g;
}

/** Collects what a socket receives. */
function reader(socket: Socket): { text(): string; bytes(): Buffer; ended: boolean; closed: boolean } {
  const chunks: Buffer[] = [];
  const state = { ended: false, closed: false, text: () => Buffer.concat(chunks).toString(), bytes: () => Buffer.concat(chunks) };
  socket.on('data', (chunk: Buffer) => chunks.push(chunk));
  socket.on('end', () => { state.ended = true; });
  socket.on('close', () => { state.closed = true; });
  socket.on('error', () => {});
  return state;
}

/** A host client that CONNECTs to guest port `port`; returns it with the guest's view of the REQUEST. */
async function hostConnect(g: FakeVsockGuest, port: number, extra = ''): Promise<{ socket: Socket; got: ReturnType<typeof reader>; request: Packet }> {
  const socket = createConnection(g.uds);
  const got = reader(socket);
  socket.write(`CONNECT ${port}\n${extra}`);
  const request = await g.nextOp(VsockOp.Request);
  return { socket, got, request };
}

async function listen(path: string, onSocket: (socket: Socket) => void): Promise<Server> {
  const server = createServer({ allowHalfOpen: true }, onSocket);
  server.listen(path);
  await once(server, 'listening');
  return server;
}

t.test('model: device 19, three queues, guest_cid in config space; configs are checked', async (t) => {
  const model = vsockModel(0x1_2345_6789);
  t.equal(model.deviceId, 19);
  t.equal(model.numQueues, 3);
  t.same([...model.config], [0x89, 0x67, 0x45, 0x23, 1, 0, 0, 0]);
  t.ok(model.features & 1n, 'VIRTIO_VSOCK_F_STREAM');
  const g = await guest(t);
  t.equal(g.read32(Reg.DeviceId), 19);
  t.equal(g.read32(Reg.Config), GUEST_CID);
  t.throws(() => checkVsockConfig({ cid: 2, uds: '/tmp/x' }), /cid/);
  t.throws(() => checkVsockConfig({ cid: 3, uds: '' }), /uds/);
  t.throws(() => checkVsockConfig({ cid: 3, uds: `/tmp/${'x'.repeat(100)}` }), /too long/);
  checkVsockConfig({ cid: 3, uds: '/tmp/v.sock' });
});

t.test('host CONNECT: REQUEST to the guest port, OK <host-port> on RESPONSE, bytes both ways, shutdown', async (t) => {
  const g = await guest(t);
  const { socket, got, request } = await hostConnect(g, 5000, 'early');
  const h = request.header;
  t.match(h, { srcCid: VSOCK_HOST_CID, dstCid: GUEST_CID, srcPort: VSOCK_FIRST_HOST_PORT, dstPort: 5000, type: 1, len: 0, bufAlloc: VSOCK_BUFFER_BYTES, fwdCnt: 0 });
  g.send({ op: VsockOp.Response, srcPort: 5000, dstPort: h.srcPort });
  await until(() => got.text() === `OK ${VSOCK_FIRST_HOST_PORT}\n`, 'OK line');
  // Bytes the client sent with its CONNECT line wait for the handshake.
  const early = await g.nextOp(VsockOp.Rw);
  t.equal(early.payload.toString(), 'early');
  socket.write('from the host');
  const rw = await g.nextOp(VsockOp.Rw);
  t.match(rw.header, { srcPort: h.srcPort, dstPort: 5000, len: 13 });
  t.equal(rw.payload.toString(), 'from the host');
  g.send({ op: VsockOp.Rw, srcPort: 5000, dstPort: h.srcPort }, Buffer.from('from the guest'), { split: true });
  await until(() => got.text().endsWith('from the guest'), 'guest bytes at the host');
  // The host half-closes: SHUTDOWN(SEND) to the guest; the guest can still send.
  socket.end();
  const shutdown = await g.nextOp(VsockOp.Shutdown);
  t.equal(shutdown.header.flags, VsockShutdown.Send);
  g.send({ op: VsockOp.Rw, srcPort: 5000, dstPort: h.srcPort }, Buffer.from(' bye'));
  // The guest closes (both flags, as Linux's close()): RST, and the host sees the end.
  g.send({ op: VsockOp.Shutdown, srcPort: 5000, dstPort: h.srcPort, flags: VsockShutdown.Rcv | VsockShutdown.Send });
  const rst = await g.nextOp(VsockOp.Rst);
  t.match(rst.header, { srcPort: h.srcPort, dstPort: 5000 });
  await until(() => got.closed, 'host socket closed');
  t.ok(got.text().endsWith('from the guest bye'));
  t.equal(g.device.connectionCount, 0);
});

t.test('host CONNECT: the guest refuses (RST) or never answers: the client is closed; bad lines too', async (t) => {
  const g = await guest(t);
  const refused = await hostConnect(g, 6000);
  g.send({ op: VsockOp.Rst, srcPort: 6000, dstPort: refused.request.header.srcPort });
  await until(() => refused.got.closed, 'refused client closed');
  t.equal(refused.got.text(), '');
  const bad = createConnection(g.uds);
  const badGot = reader(bad);
  bad.write('HELLO there\n');
  await until(() => badGot.closed, 'bad line closed');
  const mute = reader(createConnection(g.uds));
  const silent = await hostConnect(g, 6001);
  const started = Date.now();
  await until(() => silent.got.closed, 'timed-out client closed', 5000);
  await until(() => mute.closed, 'a client that never sent its CONNECT line closed', 5000);
  t.ok(Date.now() - started >= 1500, 'after the connect timeout');
  const rst = await g.nextOp(VsockOp.Rst);
  t.equal(rst.header.dstPort, 6001, 'and the guest hears the request is off');
});

t.test('guest connects to host port P: reaches the listener at uds_P; RST when none listens', async (t) => {
  const g = await guest(t);
  const accepted: ReturnType<typeof reader>[] = [];
  const sockets: Socket[] = [];
  const server = await listen(`${g.uds}_5001`, (socket) => {
    accepted.push(reader(socket));
    sockets.push(socket);
  });
  t.teardown(() => server.close());
  g.send({ op: VsockOp.Request, srcPort: 40000, dstPort: 5001 });
  const response = await g.nextOp(VsockOp.Response);
  t.match(response.header, { srcCid: 2, dstCid: GUEST_CID, srcPort: 5001, dstPort: 40000 });
  g.send({ op: VsockOp.Rw, srcPort: 40000, dstPort: 5001 }, Buffer.from('hello from the guest\n'));
  await until(() => accepted[0]?.text() === 'hello from the guest\n', 'hello at the listener');
  sockets[0]!.write('back');
  const rw = await g.nextOp(VsockOp.Rw);
  t.equal(rw.payload.toString(), 'back');
  // The host closes: SHUTDOWN(SEND), then the guest's close gets an RST.
  sockets[0]!.end();
  t.equal((await g.nextOp(VsockOp.Shutdown)).header.flags, VsockShutdown.Send);
  g.send({ op: VsockOp.Shutdown, srcPort: 40000, dstPort: 5001, flags: 3 });
  await g.nextOp(VsockOp.Rst);
  await until(() => accepted[0]!.ended, 'listener side sees the end');

  g.send({ op: VsockOp.Request, srcPort: 40001, dstPort: 5999 });
  const rst = await g.nextOp(VsockOp.Rst);
  t.match(rst.header, { srcPort: 5999, dstPort: 40001 });
  // Packets for no connection, and for a CID that is not the host's, are answered with RST.
  g.send({ op: VsockOp.Rw, srcPort: 1, dstPort: 2 }, Buffer.from('x'));
  t.match((await g.nextOp(VsockOp.Rst)).header, { srcPort: 2, dstPort: 1 });
  g.send({ op: VsockOp.Request, dstCid: 7, srcPort: 3, dstPort: 4 });
  t.match((await g.nextOp(VsockOp.Rst)).header, { srcPort: 4, dstPort: 3 });
  t.equal(g.device.connectionCount, 0);
});

t.test('many connections at once, each with its own bytes', async (t) => {
  const g = await guest(t);
  const count = 20;
  const clients = [];
  for (let i = 0; i < count; i++) clients.push(await hostConnect(g, 7000 + i));
  for (const c of clients) g.send({ op: VsockOp.Response, srcPort: c.request.header.dstPort, dstPort: c.request.header.srcPort });
  for (const c of clients) await until(() => c.got.text().startsWith('OK '), 'OK');
  clients.forEach((c, i) => c.socket.write(`message ${i}`));
  const seen = new Map<number, string>();
  while (seen.size < count) {
    const p = await g.nextOp(VsockOp.Rw);
    seen.set(p.header.dstPort, (seen.get(p.header.dstPort) ?? '') + p.payload.toString());
  }
  for (let i = 0; i < count; i++) t.equal(seen.get(7000 + i), `message ${i}`);
  for (const c of clients) g.send({ op: VsockOp.Rw, srcPort: c.request.header.dstPort, dstPort: c.request.header.srcPort }, Buffer.from(`echo ${c.request.header.dstPort}`));
  for (const c of clients) await until(() => c.got.text().endsWith(`echo ${c.request.header.dstPort}`), 'echo');
  t.equal(g.device.connectionCount, count);
  // The clients go: each is an end of input for the guest (SHUTDOWN SEND); the guest closes too.
  for (const c of clients) c.socket.destroy();
  for (let i = 0; i < count; i++) {
    const shutdown = await g.nextOp(VsockOp.Shutdown);
    g.send({ op: VsockOp.Shutdown, srcPort: shutdown.header.dstPort, dstPort: shutdown.header.srcPort, flags: 3 });
  }
  await until(() => g.device.connectionCount === 0, 'all gone');
});

t.test('host -> guest respects the guest credit; a flooding host is held by its socket', async (t) => {
  const g = await guest(t);
  g.bufAlloc = 4096;
  const c = await hostConnect(g, 8000);
  const hostPort = c.request.header.srcPort;
  g.send({ op: VsockOp.Response, srcPort: 8000, dstPort: hostPort });
  await until(() => c.got.text().startsWith('OK'), 'OK');
  // 4 MiB offered; the guest gives 4 KiB of credit and reads nothing.
  const flood = Buffer.alloc(4 * 1024 * 1024, 0x61);
  let flushed = false;
  c.socket.write(flood, () => { flushed = true; });
  let received = 0;
  await until(() => {
    for (const p of g.collect().splice(0)) if (p.header.op === VsockOp.Rw) received += p.payload.length;
    return received >= 4096;
  }, 'the first 4 KiB');
  // Turns of the event loop: nothing more may come without credit.
  for (let i = 0; i < 200; i++) await new Promise((resolve) => setImmediate(resolve));
  for (const p of g.collect().splice(0)) if (p.header.op === VsockOp.Rw) received += p.payload.length;
  t.equal(received, 4096, 'exactly the credit');
  t.notOk(flushed, 'the host is held back');
  // The guest consumes: credit update with fwd_cnt; everything comes, in order and whole.
  g.bufAlloc = 1024 * 1024;
  let total = Buffer.alloc(0);
  const chunks: Buffer[] = [];
  g.fwdCnt = 4096;
  g.send({ op: VsockOp.CreditUpdate, srcPort: 8000, dstPort: hostPort });
  let got = 4096;
  await until(() => {
    for (const p of g.collect().splice(0)) {
      if (p.header.op !== VsockOp.Rw) continue;
      chunks.push(p.payload);
      got += p.payload.length;
      g.fwdCnt = got;
    }
    if (chunks.length > 0) g.send({ op: VsockOp.CreditUpdate, srcPort: 8000, dstPort: hostPort });
    return got >= flood.length;
  }, 'the whole flood', 20000);
  total = Buffer.concat(chunks);
  t.equal(total.length, flood.length - 4096);
  t.ok(total.every((b) => b === 0x61));
});

t.test('guest -> host: credit updates as the host reads; a host that never reads stops the guest, not us', async (t) => {
  const g = await guest(t);
  let hostSocket: Socket | undefined;
  let hostBytes = 0;
  const server = await listen(`${g.uds}_5002`, (socket) => {
    hostSocket = socket;
    socket.on('data', (chunk: Buffer) => { hostBytes += chunk.length; });
  });
  t.teardown(() => server.close());
  g.send({ op: VsockOp.Request, srcPort: 41000, dstPort: 5002 });
  const response = await g.nextOp(VsockOp.Response);
  t.equal(response.header.bufAlloc, VSOCK_BUFFER_BYTES);
  // 192 KiB in 16 KiB packets: past half of our buffer, once the host read them, a CREDIT_UPDATE.
  const chunk = Buffer.alloc(16 * 1024, 0x62);
  for (let i = 0; i < 12; i++) g.send({ op: VsockOp.Rw, srcPort: 41000, dstPort: 5002 }, chunk);
  const update = await g.nextOp(VsockOp.CreditUpdate);
  t.ok(update.header.fwdCnt >= VSOCK_BUFFER_BYTES / 2, `fwd_cnt ${update.header.fwdCnt}`);
  await until(() => hostBytes === 12 * chunk.length, 'host got it all');
  // A CREDIT_REQUEST is answered.
  g.send({ op: VsockOp.CreditRequest, srcPort: 41000, dstPort: 5002 });
  t.equal((await g.nextOp(VsockOp.CreditUpdate)).header.fwdCnt, 12 * chunk.length);

  // Now the host stops reading: the guest may fill our buffer, and a packet past it is a reset.
  hostSocket!.pause();
  let sent = 12 * chunk.length;
  const limit = 12 * chunk.length + VSOCK_BUFFER_BYTES; // fwd_cnt advertised + buf_alloc, at most
  const big = Buffer.alloc(60 * 1024, 0x63);
  while (sent + big.length <= limit) {
    g.send({ op: VsockOp.Rw, srcPort: 41000, dstPort: 5002 }, big);
    sent += big.length;
  }
  t.equal(g.device.connectionCount, 1, 'within credit: still open');
  // The kernel socket buffer may take some; keep going until the device's own buffer is full.
  for (let i = 0; i < 40 && g.device.connectionCount === 1; i++) {
    g.send({ op: VsockOp.Rw, srcPort: 41000, dstPort: 5002 }, big);
    await new Promise((resolve) => setImmediate(resolve));
  }
  t.equal(g.device.connectionCount, 0, 'past its credit the guest is reset');
  await g.nextOp(VsockOp.Rst);
  t.ok(g.logs.some((line) => /past the credit/.test(line)), 'and logged');
});

t.test('hostile rings: short headers, lengths past the buffers, tiny RX buffers -> NEEDS_RESET; a reset recovers', async (t) => {
  const g = await guest(t);
  const needsReset = () => (g.status & Status.NeedsReset) !== 0;
  g.sendRaw(20);
  t.ok(needsReset(), 'a 20-byte TX packet');
  t.ok(g.logs.some((line) => /shorter than the 44-byte header/.test(line)));
  g.init();
  g.sendRaw(44, { op: VsockOp.Rw, len: 100, srcPort: 1, dstPort: 2 });
  t.ok(needsReset(), 'len beyond the buffer');
  t.ok(g.logs.some((line) => /len 100 in 0 bytes/.test(line)));
  g.init(0);
  g.postRx(0, 16);
  g.send({ op: VsockOp.Request, srcPort: 1, dstPort: 9 }); // an RST needs an RX buffer
  await until(needsReset, 'NEEDS_RESET for a 16-byte RX buffer');
  const logged = g.logs.length;
  g.init();
  g.sendRaw(20);
  t.equal(g.logs.length, logged, 'a problem is logged once');
  g.init();
  g.send({ op: VsockOp.Request, srcPort: 1, dstPort: 9 });
  t.equal((await g.nextOp(VsockOp.Rst)).header.dstPort, 1, 'after a reset the device serves again');
  t.notOk(needsReset());
});

t.test('parking holds host input back; a restore resets connections, sends TRANSPORT_RESET, keeps the listener', async (t) => {
  const g = await guest(t);
  const c = await hostConnect(g, 9000);
  g.send({ op: VsockOp.Response, srcPort: 9000, dstPort: c.request.header.srcPort });
  await until(() => c.got.text().startsWith('OK'), 'OK');
  g.device.parking();
  c.socket.write('while parked');
  for (let i = 0; i < 100; i++) await new Promise((resolve) => setImmediate(resolve));
  t.equal(g.collect().length, 0, 'nothing reaches the guest while parked');
  g.device.resumed(false);
  g.device.notified();
  t.equal((await g.nextOp(VsockOp.Rw)).payload.toString(), 'while parked');

  g.device.parking();
  g.device.resumed(true);
  g.device.notified();
  await until(() => c.got.closed, 'the host connection closed');
  t.same(g.collect() && g.events, [0], 'VIRTIO_VSOCK_EVENT_TRANSPORT_RESET');
  t.equal(g.device.connectionCount, 0);
  const again = await hostConnect(g, 9001);
  g.send({ op: VsockOp.Response, srcPort: 9001, dstPort: again.request.header.srcPort });
  await until(() => again.got.text().startsWith('OK'), 'a new connection after the restore');
  again.socket.destroy();
});

t.test('the socket file: mode 0600, a second device at the same path is refused, close removes it', async (t) => {
  const g = await guest(t);
  t.equal(statSync(g.uds).mode & 0o777, 0o600);
  t.throws(() => new VirtioVsockDevice(
    { mmio: g.mmio, ram: g.ram, dirty: g.dirty, log: () => {}, watch: () => ({ close() {} }) },
    { cid: 4, uds: g.uds },
  ), { code: 'EADDRINUSE' });
  t.same(readdirSync(g.dir), ['v.sock'], 'no private directory left behind');
  g.device.close();
  t.notOk(existsSync(g.uds), 'removed on close');
});
