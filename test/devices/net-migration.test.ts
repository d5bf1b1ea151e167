// The `net-echo` guest on a TAP inside a network namespace survives a live migration to a
// machine whose TAP is in a second namespace: its address answers there.
import t from 'tap';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { Machine } from '../../lib/index.js';
import { noKvm } from '../helpers/kvm.js';
import { boot } from '../helpers/machine.js';
import { expectedEcho, GUEST_IP, MAC, namespaceWithTap, netEchoImage as image, ping, READY, udpEcho } from '../helpers/net-echo.js';
import { noNetns } from '../helpers/netns.js';
import { sharedPool } from '../helpers/pool.js';

const MiB = 1 << 20;
const skip = noKvm || noNetns;
const pool = skip ? undefined : sharedPool(2);

t.test('a live migration between two namespaces: the address answers from the destination', { skip }, async (t) => {
  const source = namespaceWithTap(t);
  const target = namespaceWithTap(t);
  const dir = mkdtempSync(path.join(tmpdir(), 'node-kvm-net-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const booted = await boot({ image, cmdline: `ip=${GUEST_IP}`, memoryBytes: 16 * MiB, pool, net: [{ tap: 'tap0', netns: source.path, mac: MAC }] });
  t.teardown(() => booted.machine.stop());
  booted.machine.start();
  await booted.waitForOutput(READY);
  t.equal(await udpEcho(source, 2), expectedEcho(2));

  const address = `unix:${path.join(dir, 'm.sock')}`;
  let listening!: () => void;
  const ready = new Promise<void>((resolve) => (listening = resolve));
  const incoming = Machine.incoming(address, { onListening: () => listening(), serial: { output: null }, log: () => {}, pool, net: [{ tap: 'tap0', netns: target.path }] });
  await ready;
  await booted.machine.migrate(address);
  const destination = await incoming;
  t.teardown(() => destination.stop());
  t.equal((await booted.machine.wait()).reason, 'migrated');
  t.same(destination.shape.net, [{ mac: MAC }]);
  t.match(await ping(target, 2), '2 packets transmitted, 2 received');
  t.equal(await udpEcho(target, 3), expectedEcho(3), 'the migrated guest echoes in the second namespace');
});

