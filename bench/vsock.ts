// virtio-vsock against a plain unix socket measured in the same run: the round trip of a 64-byte
// echo and the throughput of a 1 MiB stream echoed back, from this process to the vsock-echo guest
// (through machine.vsock, the device's hybrid unix socket and its thread), beside the same to a
// second Node process that echoes on a unix socket.
//
//   npm run bench:vsock -- [--rounds R] [--echoes N] [--json]
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { mkdtempSync, rmSync } from 'node:fs';
import { createConnection } from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import type { Duplex } from 'node:stream';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { hostInfo, median } from './report.js';
import { Machine } from '../lib/index.js';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const { values } = parseArgs({
  options: { rounds: { type: 'string', default: '3' }, echoes: { type: 'string', default: '500' }, json: { type: 'boolean', default: false } },
});
const rounds = Number(values.rounds);
const echoes = Number(values.echoes);
for (const [name, n] of [['rounds', rounds], ['echoes', echoes]] as const) {
  if (!Number.isInteger(n) || n < 1) throw new Error(`--${name} must be a positive integer`);
}
const STREAM_BYTES = 1 << 20;

/** Writes `bytes` and resolves once as many came back. */
async function echo(stream: Duplex, bytes: Buffer): Promise<void> {
  let got = 0;
  const done = new Promise<void>((resolve, reject) => {
    const onData = (chunk: Buffer) => {
      got += chunk.length;
      if (got < bytes.length) return;
      stream.off('data', onData);
      stream.off('error', reject);
      resolve();
    };
    stream.on('data', onData);
    stream.once('error', reject);
  });
  stream.write(bytes);
  await done;
}

/** Median 64-byte round trip in µs, and MB/s of a 1 MiB stream echoed back. */
async function measure(stream: Duplex): Promise<{ roundTripUs: number; streamMBps: number }> {
  const small = Buffer.alloc(64, 1);
  for (let i = 0; i < 20; i++) await echo(stream, small);
  const times: number[] = [];
  for (let i = 0; i < echoes; i++) {
    const t0 = performance.now();
    await echo(stream, small);
    times.push((performance.now() - t0) * 1000);
  }
  const big = Buffer.alloc(STREAM_BYTES, 2);
  await echo(stream, big);
  const t0 = performance.now();
  await echo(stream, big);
  return { roundTripUs: median(times), streamMBps: STREAM_BYTES / 1e6 / ((performance.now() - t0) / 1000) };
}

const dir = mkdtempSync(path.join(tmpdir(), 'node-kvm-bench-vsock-'));
const peer = spawn(process.execPath, ['-e', `
  require('net').createServer((s) => s.pipe(s)).listen(${JSON.stringify(path.join(dir, 'peer.sock'))}, () => console.log('ready'));
`], { stdio: ['ignore', 'pipe', 'inherit'] });
try {
  await once(peer.stdout!, 'data');
  const machine = await Machine.create({
    image: path.join(root, 'guests', 'build', 'vsock-echo.elf'), memoryBytes: 16 << 20,
    vsock: { cid: 3, uds: path.join(dir, 'v.sock') }, serial: { output: null }, log: () => {},
  });
  machine.start();
  // The guest is ready once its listener answers.
  let guest: Duplex | null = null;
  for (let tries = 0; guest === null; tries++) {
    guest = await machine.vsock!.connect(5000).catch((error: Error) => {
      if (tries > 100) throw error;
      return null;
    });
  }
  const plain = createConnection(path.join(dir, 'peer.sock'));
  await once(plain, 'connect');
  const runs: { vsock: { roundTripUs: number; streamMBps: number }; unix: { roundTripUs: number; streamMBps: number } }[] = [];
  for (let round = 0; round < rounds; round++) runs.push({ vsock: await measure(guest), unix: await measure(plain) });
  const pick = (side: 'vsock' | 'unix', key: 'roundTripUs' | 'streamMBps') => median(runs.map((run) => run[side][key]));
  const result = {
    roundTripUs: { vsock: pick('vsock', 'roundTripUs'), unix: pick('unix', 'roundTripUs') },
    streamMBps: { vsock: pick('vsock', 'streamMBps'), unix: pick('unix', 'streamMBps') },
    runs, host: hostInfo(),
  };
  if (values.json) {
    console.log(JSON.stringify(result, null, 2));
  } else {
    const f = (n: number) => n.toFixed(1);
    console.log(`64-byte echo round trip (median of ${echoes}): vsock ${f(result.roundTripUs.vsock)} µs, unix socket ${f(result.roundTripUs.unix)} µs, ratio ${(result.roundTripUs.vsock / result.roundTripUs.unix).toFixed(2)}`);
    console.log(`1 MiB stream echoed back: vsock ${f(result.streamMBps.vsock)} MB/s, unix socket ${f(result.streamMBps.unix)} MB/s, ratio ${(result.streamMBps.vsock / result.streamMBps.unix).toFixed(2)}`);
    console.log(`median of ${rounds} rounds; host: ${JSON.stringify(result.host)}`);
  }
  guest.destroy();
  plain.destroy();
  await machine.stop();
} finally {
  peer.kill();
  rmSync(dir, { recursive: true, force: true });
}
