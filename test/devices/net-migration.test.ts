// The `net-echo` guest on a TAP inside a network namespace survives a live migration to a
// machine whose TAP is in a second namespace: its address answers there.
import t from 'tap';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { noKvm } from '../helpers/kvm.js';
import { startLocalDestination } from '../helpers/migration-peer.js';
import { expectedEcho, MAC, namespaceWithTap, ping, startNetEcho, udpEcho } from '../helpers/net-echo.js';
import { noNetns } from '../helpers/netns.js';
import { sharedPool } from '../helpers/pool.js';

const skip = noKvm || noNetns;
const pool = skip ? undefined : sharedPool(2);

t.test('a live migration between two namespaces: the address answers from the destination', { skip }, async (t) => {
  const source = namespaceWithTap(t);
  const target = namespaceWithTap(t);
  const dir = mkdtempSync(path.join(tmpdir(), 'node-kvm-net-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const booted = await startNetEcho(t, source, pool);
  t.equal(await udpEcho(source, 2), expectedEcho(2));

  const address = `unix:${path.join(dir, 'm.sock')}`;
  const incoming = startLocalDestination(t, address, { pool, net: [{ tap: 'tap0', netns: target.path }] });
  await incoming.listening;
  await booted.machine.migrate(address);
  const destination = await incoming.arrived;
  t.equal((await booted.machine.wait()).reason, 'migrated');
  t.same(destination.shape.net, [{ mac: MAC }]);
  t.match(await ping(target, 2), '2 packets transmitted, 2 received');
  t.equal(await udpEcho(target, 3), expectedEcho(3), 'the migrated guest echoes in the second namespace');
});

