// The `net-echo` guest (guests/net-echo.c: a polled virtio-net driver) on the VMM's virtio-net
// over a TAP inside a network namespace the test creates and removes: ping and a UDP client in
// the namespace reach the guest; a TAP that cannot be opened fails the machine's creation.
import t from 'tap';
import { closeSync } from 'node:fs';
import { Machine, openTap } from '../../lib/index.js';
import { noKvm } from '../helpers/kvm.js';
import { boot } from '../helpers/machine.js';
import { expectedEcho, GUEST_IP, MAC, namespaceWithTap, netEchoImage as image, ping, READY, udpEcho } from '../helpers/net-echo.js';
import { noNetns } from '../helpers/netns.js';
import { sharedPool } from '../helpers/pool.js';

const MiB = 1 << 20;
const skip = noKvm || noNetns;
const pool = skip ? undefined : sharedPool(2);

t.test('ping and a UDP client in the namespace reach the guest', { skip }, async (t) => {
  const ns = namespaceWithTap(t);
  const logs: string[] = [];
  const booted = await boot({ image, cmdline: `ip=${GUEST_IP}`, memoryBytes: 16 * MiB, pool, net: [{ tap: 'tap0', netns: ns.path, mac: MAC }] }, logs);
  t.teardown(() => booted.machine.stop());
  booted.machine.start();
  await booted.waitForOutput(READY);
  t.match(await ping(ns, 3), '3 packets transmitted, 3 received, 0% packet loss');
  t.equal(await udpEcho(ns, 5), expectedEcho(5), 'every datagram echoed, whole, from port 7');
  // The guest answered ARP: the namespace's kernel learned its MAC.
  const { stdout } = await ns.exec(['ip', 'neigh', 'show', GUEST_IP]);
  t.match(stdout, `lladdr ${MAC}`);
  t.same(logs, [], 'nothing logged');

  // A reboot resets the card; the guest sets it up again and answers as before.
  await booted.machine.reset();
  await booted.waitForOutput(new RegExp(`(${READY.trim()}\n[^]*){2}`));
  t.equal(await udpEcho(ns, 2), expectedEcho(2), 'echoes after a reset');
});

t.test('a TAP fd handed over by its owner: the machine serves a duplicate, the owner closes its own', { skip }, async (t) => {
  const ns = namespaceWithTap(t);
  const own = openTap('tap0', { netns: ns.path });
  const booted = await boot({ image, cmdline: `ip=${GUEST_IP}`, memoryBytes: 16 * MiB, pool, net: [{ fd: own.fd, mac: MAC }] });
  t.teardown(() => booted.machine.stop());
  closeSync(own.fd);
  booted.machine.start();
  await booted.waitForOutput(READY);
  t.equal(await udpEcho(ns, 2), expectedEcho(2));
});

t.test('a TAP that cannot be opened fails Machine.create() with the reason', { skip }, async (t) => {
  await t.rejects(Machine.create({ image, pool, net: [{ tap: 'tap0', netns: '/run/netns/nkvm-absent' }] }), /cannot open the TAP "tap0" in the network namespace \/run\/netns\/nkvm-absent: no such network namespace/);
  await t.rejects(Machine.create({ image, pool, net: [{ tap: 'tap0' }, { tap: 'tap1', mac: '52:54:00:12:34:56' }] }), /same MAC/);
});
