// virtio-net against a veth pair measured in the same run: ping round trips and UDP echo
// throughput from a network namespace to the net-echo guest (over the machine's TAP), beside the
// same from that namespace to a second namespace over a veth pair, where a Node process echoes
// UDP. Also the guest's exits to userspace per echoed datagram (queue notifies reach the device
// through an ioeventfd and are not among them). Needs root, ip and ping; every namespace it makes
// it removes.
//
//   npm run bench:net -- [--rounds R] [--pings N] [--datagrams N] [--json]
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import path from 'node:path';
import { PassThrough } from 'node:stream';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { hostInfo, median } from './report.js';
import { Machine } from '../lib/index.js';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const { values } = parseArgs({
  options: {
    rounds: { type: 'string', default: '3' }, pings: { type: 'string', default: '100' }, datagrams: { type: 'string', default: '5000' },
    json: { type: 'boolean', default: false },
  },
});
const rounds = Number(values.rounds);
const pings = Number(values.pings);
const datagrams = Number(values.datagrams);
for (const [name, n] of [['rounds', rounds], ['pings', pings], ['datagrams', datagrams]] as const) {
  if (!Number.isInteger(n) || n < 1) throw new Error(`--${name} must be a positive integer`);
}
const DATAGRAM_BYTES = 1400;
/** Datagrams in flight in the UDP client. */
const WINDOW = 16;

const ns = `nkvm-bench-${process.pid}`;
const peer = `${ns}-peer`;
const ip = (args: string[], input?: string) => execFileSync('ip', args, { input, stdio: ['pipe', 'pipe', 'pipe'] });

/** Median round trip in ms of `count` pings from the namespace (one every 10 ms). */
function pingMs(address: string, count: number): number {
  const { stdout, status } = spawnSync('ip', ['netns', 'exec', ns, 'ping', '-c', String(count), '-i', '0.01', '-n', address], { encoding: 'utf8' });
  const times = [...stdout.matchAll(/time=([\d.]+) ms/g)].map((m) => Number(m[1]));
  if (status !== 0 || times.length < count) throw new Error(`ping ${address} failed: ${stdout.trim().split('\n').slice(-2).join(' | ')}`);
  return median(times);
}

/** Datagrams per second echoed from port 7 at `address`, WINDOW in flight. */
function udpEchoRate(address: string, count: number): number {
  const script = `
    const s = require('dgram').createSocket('udp4');
    const payload = Buffer.alloc(${DATAGRAM_BYTES}, 7);
    let sent = 0, got = 0;
    const pump = () => { while (sent < ${count} && sent - got < ${WINDOW}) { sent++; s.send(payload, 7, '${address}'); } };
    const t0 = process.hrtime.bigint();
    s.on('message', (m) => {
      if (m.length !== ${DATAGRAM_BYTES}) { console.log('short ' + m.length); process.exit(2); }
      if (++got === ${count}) { console.log(${count} / (Number(process.hrtime.bigint() - t0) / 1e9)); process.exit(0); }
      pump();
    });
    // A datagram lost (a full queue somewhere) is sent again rather than stalling the window.
    setInterval(() => { if (sent - got >= ${WINDOW}) { sent--; pump(); } }, 200);
    s.bind(0, () => pump());
    setTimeout(() => { console.log('timeout after ' + got); process.exit(1); }, 60000).unref();
  `;
  const { stdout, status } = spawnSync('ip', ['netns', 'exec', ns, 'node', '-e', script], { encoding: 'utf8' });
  if (status !== 0) throw new Error(`UDP echo to ${address} failed: ${stdout.trim()}`);
  return Number(stdout.trim());
}

async function main(): Promise<void> {
  ip(['netns', 'add', ns]);
  ip(['netns', 'add', peer]);
  let machine: Machine | null = null;
  const echo = { kill: () => {} } as { kill(): void };
  try {
    ip(['-n', ns, '-batch', '-'], [
      'link set lo up', 'tuntap add dev tap0 mode tap', 'addr add 10.55.0.1/24 dev tap0', 'link set tap0 up',
      `link add veth0 type veth peer name veth1 netns ${peer}`, 'addr add 10.56.0.1/24 dev veth0', 'link set veth0 up',
    ].join('\n') + '\n');
    ip(['-n', peer, '-batch', '-'], 'link set lo up\naddr add 10.56.0.2/24 dev veth1\nlink set veth1 up\n');
    const output = new PassThrough();
    let text = '';
    output.on('data', (chunk: Buffer) => (text += chunk.toString('latin1')));
    machine = await Machine.create({
      image: path.join(root, 'guests', 'build', 'net-echo.elf'), cmdline: 'ip=10.55.0.2', memoryBytes: 16 << 20,
      net: [{ tap: 'tap0', netns: `/run/netns/${ns}` }], serial: { output }, exitStats: true,
    });
    machine.start();
    while (!text.includes('net-echo: ready')) await new Promise((resolve) => setTimeout(resolve, 10));
    const child = spawn('ip', ['netns', 'exec', peer, 'node', '-e',
      "const s=require('dgram').createSocket('udp4');s.on('message',(m,r)=>s.send(m,r.port,r.address));s.bind(7,()=>console.log('up'))"], { stdio: ['ignore', 'pipe', 'inherit'] });
    echo.kill = () => child.kill();
    await new Promise((resolve) => child.stdout.once('data', resolve));

    const runs = { guestPingMs: [] as number[], vethPingMs: [] as number[], guestUdp: [] as number[], vethUdp: [] as number[], exitsPerDatagram: [] as number[] };
    for (let round = 0; round < rounds; round++) {
      runs.guestPingMs.push(pingMs('10.55.0.2', pings));
      runs.vethPingMs.push(pingMs('10.56.0.2', pings));
      const before = machine.exitStats().vcpus.reduce((sum, vcpu) => sum + vcpu.count, 0);
      runs.guestUdp.push(udpEchoRate('10.55.0.2', datagrams));
      const after = machine.exitStats().vcpus.reduce((sum, vcpu) => sum + vcpu.count, 0);
      runs.exitsPerDatagram.push((after - before) / datagrams);
      runs.vethUdp.push(udpEchoRate('10.56.0.2', datagrams));
    }
    const m = {
      guestPingMs: median(runs.guestPingMs), vethPingMs: median(runs.vethPingMs),
      guestUdpPerSec: median(runs.guestUdp), vethUdpPerSec: median(runs.vethUdp), exitsPerDatagram: median(runs.exitsPerDatagram),
    };
    const report = { host: hostInfo(), rounds, pings, datagrams, datagramBytes: DATAGRAM_BYTES, medians: m, runs };
    if (values.json) {
      console.log(JSON.stringify(report));
      return;
    }
    console.log(`virtio-net (net-echo guest over a TAP) vs a veth pair between two namespaces, medians of ${rounds}`);
    console.log(JSON.stringify(report.host));
    console.log(`ping round trip:   guest ${m.guestPingMs.toFixed(3)} ms, veth ${m.vethPingMs.toFixed(3)} ms (ratio ${(m.guestPingMs / m.vethPingMs).toFixed(1)})`);
    console.log(`UDP echo ${DATAGRAM_BYTES} B, ${WINDOW} in flight: guest ${m.guestUdpPerSec.toFixed(0)}/s (${(m.guestUdpPerSec * DATAGRAM_BYTES * 8 / 1e6).toFixed(1)} Mbit/s), ` +
      `veth ${m.vethUdpPerSec.toFixed(0)}/s (ratio ${(m.guestUdpPerSec / m.vethUdpPerSec).toFixed(2)})`);
    console.log(`guest exits to userspace per echoed datagram: ${m.exitsPerDatagram.toFixed(3)}`);
  } finally {
    echo.kill();
    await machine?.stop();
    ip(['netns', 'delete', ns]);
    ip(['netns', 'delete', peer]);
  }
}

await main();
