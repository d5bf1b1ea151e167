// virtio-vsock on the real /dev/kvm with guests/vsock-echo.c: the guest's hello reaches a host
// listener (uds_5001), host connections to its port 5000 echo on several streams at once (through
// machine.vsock and through the hybrid protocol on the socket, as another program would), RST
// for a port nobody listens on, a host peer that floods and never reads holds only its own
// connection, and a snapshot restore resets the connections (transport-reset event) while new
// ones work.
import t from 'tap';
import { once } from 'node:events';
import { mkdtempSync, rmSync } from 'node:fs';
import { createConnection } from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { PassThrough, type Duplex } from 'node:stream';
import { GUEST_PARAMS_ADDR, Machine } from '../../lib/index.js';
import { shapeMismatch } from '../../lib/vmm/builder.js';
import { noKvm, repoRoot } from '../helpers/kvm.js';
import { boot, logCollector } from '../helpers/machine.js';
import { sharedPool } from '../helpers/pool.js';

const MiB = 1 << 20;
const image = path.join(repoRoot, 'guests', 'build', 'vsock-echo.elf');
const pool = noKvm ? undefined : sharedPool(2);
const CID = 42;

function tempDir(t: { teardown(fn: () => void): void }): string {
  const dir = mkdtempSync(path.join(tmpdir(), 'node-kvm-vsock-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** Writes `data` and reads back exactly as many bytes (the echo). */
async function roundTrip(stream: Duplex, data: Buffer): Promise<Buffer> {
  const chunks: Buffer[] = [];
  let length = 0;
  const done = new Promise<void>((resolve, reject) => {
    const onData = (chunk: Buffer) => {
      chunks.push(chunk);
      length += chunk.length;
      if (length >= data.length) {
        stream.off('data', onData);
        resolve();
      }
    };
    stream.on('data', onData);
    stream.once('error', reject);
    stream.once('close', () => reject(new Error(`closed after ${length} of ${data.length} bytes`)));
  });
  stream.write(data);
  await done;
  return Buffer.concat(chunks);
}

const pattern = (length: number, seed: number) => Buffer.from(Uint8Array.from({ length }, (_, i) => (i * 31 + seed * 7 + (i >> 8)) & 0xff));

t.test('hello to the host, echoes on several connections at once, RST for a closed port', { skip: noKvm }, async (t) => {
  const dir = tempDir(t);
  const uds = path.join(dir, 'v.sock');
  const logs: string[] = [];
  const booted = await boot({ image, memoryBytes: 16 * MiB, vsock: { cid: CID, uds }, pool }, logs);
  const { machine } = booted;
  t.teardown(() => void machine.stop());
  t.same(machine.shape.vsock, { cid: CID }, 'the shape records the device and the CID');
  let hello!: (text: string) => void;
  const helloReceived = new Promise<string>((resolve) => (hello = resolve));
  const server = await machine.vsock!.listen(5001, (socket) => {
    let text = '';
    socket.on('data', (chunk: Buffer) => (text += chunk.toString()));
    socket.on('end', () => {
      hello(text);
      socket.end();
    });
  });
  t.teardown(() => server.close());
  machine.start();
  await booted.waitForOutput(`vsock-echo: ready, cid ${CID}, port 5000\n`);
  await booted.waitForOutput('vsock-echo: hello sent\n');
  t.equal(await helloReceived, 'hello from the guest\n', 'the guest connected to host port 5001, wrote and closed');

  // Four at once through the library, one through the hybrid protocol as a separate program.
  const streams = await Promise.all([0, 1, 2, 3].map(() => machine.vsock!.connect(5000)));
  t.equal(new Set(streams.map((s) => s.hostPort)).size, 4, 'each has its own host port');
  const sizes = [64, 4096, 100_000, 300_000];
  const echoed = await Promise.all(streams.map((stream, i) => roundTrip(stream, pattern(sizes[i]!, i))));
  echoed.forEach((bytes, i) => t.ok(bytes.equals(pattern(sizes[i]!, i)), `connection ${i}: ${sizes[i]} bytes echoed exactly`));

  const raw = createConnection(uds);
  raw.write('CONNECT 5000\n');
  const [first] = (await once(raw, 'data')) as [Buffer];
  t.match(first.toString(), /^OK \d+\n$/, 'the hybrid handshake on the socket');
  t.equal((await roundTrip(raw, Buffer.from('raw bytes'))).toString(), 'raw bytes');
  // Closing our side: the guest sees the end of input and closes too.
  raw.end();
  await once(raw, 'close');
  for (const stream of streams) stream.end();
  await Promise.all(streams.map((stream) => once(stream, 'close')));

  await t.rejects(machine.vsock!.connect(6000), { code: 'ECONNRESET' }, 'nobody listens on 6000: RST');
  t.same(logs.filter((line) => /vsock/.test(line)), [], 'nothing logged');
});

t.test('a flooding host peer that never reads holds back only its own connection', { skip: noKvm }, async (t) => {
  const dir = tempDir(t);
  const uds = path.join(dir, 'v.sock');
  const booted = await boot({ image, memoryBytes: 16 * MiB, vsock: { cid: CID, uds }, pool });
  const { machine } = booted;
  t.teardown(() => void machine.stop());
  machine.start();
  await booted.waitForOutput('vsock-echo: ready');
  const flood = await machine.vsock!.connect(5000);
  const total = 64 * MiB;
  const block = pattern(64 * 1024, 9);
  let written = 0;
  // Write without reading the echo, until the stream stops draining for a second.
  while (written < total) {
    written += block.length;
    if (flood.write(block)) continue;
    const drained = await Promise.race([once(flood, 'drain').then(() => true), new Promise((resolve) => setTimeout(() => resolve(false), 1000))]);
    if (!drained) break;
  }
  const taken = written - flood.writableLength;
  t.ok(written < total, `the host side stopped taking bytes: ${(taken / MiB).toFixed(2)} MiB left our stream (kernel socket buffers both ways, the device's and the guest's buffers)`);
  t.ok(taken < 4 * MiB, 'a bounded amount');
  // Meanwhile the guest's vCPU and the device serve another connection at once.
  const other = await machine.vsock!.connect(5000);
  const started = performance.now();
  t.equal((await roundTrip(other, Buffer.from('still here'))).toString(), 'still here');
  t.ok(performance.now() - started < 2000, `another connection answered in ${(performance.now() - started).toFixed(1)} ms`);
  other.destroy();
  // Reading the echo now lets the rest through, in order and whole.
  let received = 0;
  let intact = true;
  const expected = written;
  await new Promise<void>((resolve, reject) => {
    flood.on('data', (chunk: Buffer) => {
      for (let i = 0; i < chunk.length; i += 4099) if (chunk[i] !== block[(received + i) % block.length]) intact = false;
      received += chunk.length;
      if (received >= expected) resolve();
    });
    flood.once('close', () => reject(new Error(`closed after ${received} bytes`)));
  });
  t.equal(received, expected, 'every byte came back');
  t.ok(intact, 'in order');
  flood.destroy();
});

t.test('a restored snapshot resets connections with a transport-reset event; new ones work', { skip: noKvm }, async (t) => {
  const dir = tempDir(t);
  const uds = path.join(dir, 'v.sock');
  const file = path.join(dir, 'vsock.snap');
  const source = await boot({ image, memoryBytes: 16 * MiB, vsock: { cid: CID, uds }, pool });
  t.teardown(() => void source.machine.stop());
  source.machine.start();
  await source.waitForOutput('vsock-echo: hello refused\n');
  const open = await source.machine.vsock!.connect(5000);
  t.equal((await roundTrip(open, Buffer.from('before'))).toString(), 'before');
  const ended = once(open, 'end');
  await source.machine.snapshot(file);
  await source.machine.stop();
  await ended;

  await t.rejects(Machine.restore(file, { pool, log: () => {} }), { code: 'ERR_INVALID_ARG_VALUE', message: /give vsock: \{ uds \}/ });
  await t.rejects(Machine.restore(file, { pool, log: () => {}, vsock: { uds, cid: 7 } }), { message: /saved guest has CID 42/ });
  let output = '';
  const sink = new PassThrough();
  const transportReset = new Promise<void>((resolve) => sink.on('data', (chunk: Buffer) => {
    output += chunk.toString('latin1');
    if (output.includes('vsock-echo: transport reset\n')) resolve();
  }));
  const uds2 = path.join(dir, 'w.sock');
  const restored = await Machine.restore(file, { pool, log: () => {}, serial: { output: sink }, vsock: { uds: uds2 } });
  t.teardown(() => void restored.stop());
  t.same(restored.shape.vsock, { cid: CID });
  restored.start();
  const again = await restored.vsock!.connect(5000);
  t.equal((await roundTrip(again, Buffer.from('after'))).toString(), 'after', 'a new connection echoes');
  await transportReset;
  t.pass('the guest got the transport-reset event and dropped its old connections');
  again.destroy();
});

t.test('a guest that breaks its TX ring: NEEDS_RESET, logged once each, and the device serves it after a reset', { skip: noKvm }, async (t) => {
  const dir = tempDir(t);
  const { lines: logs, log, logged } = logCollector();
  const booted = await boot({ image, memoryBytes: 16 * MiB, vsock: { cid: CID, uds: path.join(dir, 'v.sock') }, pool, log });
  const { machine } = booted;
  t.teardown(() => void machine.stop());
  machine.writeMemory(GUEST_PARAMS_ADDR, new Uint8Array([1, 0, 0, 0]));
  machine.start();
  const output = await booted.waitForOutput('vsock-echo: ready');
  t.match(output, /vsock-echo: hostile short-header: needs-reset\nvsock-echo: hostile len-past-buffer: needs-reset\n/);
  await logged(/virtio-vsock: TX: a packet of 20 device-readable bytes/);
  await logged(/virtio-vsock: TX: a packet of len 4096 in 8 bytes/);
  t.equal(logs.filter((line) => /virtio-vsock: TX: a packet of 20 device-readable bytes/.test(line)).length, 1, 'the short header, logged once');
  t.equal(logs.filter((line) => /virtio-vsock: TX: a packet of len 4096 in 8 bytes/.test(line)).length, 1, 'the long len, logged once');
  const stream = await machine.vsock!.connect(5000);
  t.equal((await roundTrip(stream, Buffer.from('after the resets'))).toString(), 'after the resets', 'the machine and the device run on');
  stream.destroy();
});

t.test('a reboot ends the connections; the rebooted guest listens again', { skip: noKvm }, async (t) => {
  const dir = tempDir(t);
  const booted = await boot({ image, memoryBytes: 16 * MiB, vsock: { cid: CID, uds: path.join(dir, 'v.sock') }, pool });
  const { machine } = booted;
  t.teardown(() => void machine.stop());
  machine.start();
  await booted.waitForOutput('vsock-echo: hello refused\n');
  const before = await machine.vsock!.connect(5000);
  t.equal((await roundTrip(before, Buffer.from('before'))).toString(), 'before');
  const ended = once(before, 'end');
  await machine.reset();
  await ended;
  t.pass('the connection ended with the reboot');
  await booted.waitForOutput(/hello refused\n[^]*vsock-echo: ready[^]*hello refused\n/);
  const after = await machine.vsock!.connect(5000);
  t.equal((await roundTrip(after, Buffer.from('after'))).toString(), 'after', 'the rebooted guest echoes');
  after.destroy();
});

t.test('a saved machine fits only a machine with the same vsock CID; configs are checked', async (t) => {
  const base = { memoryBytes: 16 * MiB, vcpus: 1, irqchip: true };
  t.equal(shapeMismatch({ ...base, vsock: { cid: 3 } }, { ...base, vsock: { cid: 3 } }), null);
  t.match(shapeMismatch({ ...base, vsock: { cid: 3 } }, base), /vsock device with CID 3, this machine has no vsock device/);
  t.match(shapeMismatch({ ...base, vsock: { cid: 3 } }, { ...base, vsock: { cid: 4 } }), /CID 3.*CID 4/);
  if (noKvm) return;
  await t.rejects(Machine.create({ image, vsock: { cid: 2, uds: '/tmp/x' } }), { code: 'ERR_INVALID_ARG_VALUE' });
  await t.rejects(Machine.create({ image, vsock: { cid: 3, uds: '/nonexistent-dir/v.sock' }, pool }), { code: 'ENOENT' });
});

