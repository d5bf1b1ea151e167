// The net-echo guest (guests/net-echo.c) on a TAP inside a test's network namespace: its
// address, and the ping and UDP clients that talk to it from the namespace.
import path from 'node:path';
import type { Test } from 'tap';
import type { VcpuWorkerPool } from '../../lib/index.js';
import { repoRoot } from './kvm.js';
import { boot, type Booted } from './machine.js';
import { NetNamespace, pingPath } from './netns.js';

export const netEchoImage = path.join(repoRoot, 'guests', 'build', 'net-echo.elf');
export const HOST_IP = '10.77.0.1';
export const GUEST_IP = '10.77.0.2';
export const MAC = '52:54:00:ab:cd:01';
export const READY = `net-echo: ready ip ${GUEST_IP} mac ${MAC}\n`;

/** A namespace holding a persistent TAP `tap0` with the host's address, up. */
export function namespaceWithTap(t: Pick<Test, 'teardown'>): NetNamespace {
  const ns = NetNamespace.create(['tuntap add dev tap0 mode tap', `addr add ${HOST_IP}/24 dev tap0`, 'link set tap0 up']);
  t.teardown(() => ns.remove());
  return ns;
}

/**
 * Boots the guest (16 MiB) on the TAP `tap0` of `ns`, stopped when `t` ends; resolves once its
 * card is up and it has said so.
 */
export async function startNetEcho(t: Pick<Test, 'teardown'>, ns: NetNamespace, pool: VcpuWorkerPool | undefined): Promise<Booted> {
  const booted = await boot({ image: netEchoImage, cmdline: `ip=${GUEST_IP}`, memoryBytes: 16 << 20, pool, net: [{ tap: 'tap0', netns: ns.path, mac: MAC }] });
  t.teardown(() => booted.machine.stop());
  booted.machine.start();
  await booted.waitForOutput(READY);
  return booted;
}

/** `count` datagrams to the guest's port 7 from the namespace, one at a time; what came back. */
export async function udpEcho(ns: NetNamespace, count: number): Promise<string> {
  const script = `
    const s = require('dgram').createSocket('udp4');
    const got = [];
    let i = 0;
    const send = () => s.send('datagram ' + i + ' ' + 'x'.repeat(i * 97), 7, '${GUEST_IP}');
    s.on('message', (m, r) => {
      got.push(m.toString().split(' ').slice(0, 2).join(' ') + ' ' + m.length + ' from ' + r.address + ':' + r.port);
      if (++i === ${count}) { console.log(got.join('\\n')); s.close(); } else send();
    });
    s.bind(0, '${HOST_IP}', send);
    setTimeout(() => { console.log(got.join('\\n')); process.exit(3); }, 10000).unref();
  `;
  const { code, stdout, stderr } = await ns.exec(['node', '-e', script]);
  if (code !== 0) throw new Error(`the UDP client failed (${code}): ${stdout}${stderr}`);
  return stdout.trim();
}

export const expectedEcho = (count: number) => Array.from({ length: count }, (_, i) => `datagram ${i} ${`datagram ${i} `.length + i * 97} from ${GUEST_IP}:7`).join('\n');

export async function ping(ns: NetNamespace, count = 3): Promise<string> {
  // .ci/run installs it: a missing ping is a failure, not a skip.
  if (!pingPath) throw new Error('iputils-ping is not installed: the network tests ping the guest');
  const { code, stdout, stderr } = await ns.exec([pingPath!, '-c', String(count), '-i', '0.2', '-W', '5', '-n', GUEST_IP]);
  if (code !== 0) throw new Error(`ping failed (${code}): ${stdout}${stderr}`);
  return stdout;
}

