// Same-host live update of the `net-echo` guest on a TAP in a network namespace: the TAP's fd
// moves with the guest (the destination is given no TAP of its own), and the guest's address
// answers from the destination on the same TAP.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import t from 'tap';
import { noKvm } from '../helpers/kvm.js';
import { startLocalDestination } from '../helpers/migration-peer.js';
import { expectedEcho, MAC, namespaceWithTap, ping, startNetEcho, udpEcho } from '../helpers/net-echo.js';
import { noNetns } from '../helpers/netns.js';
import { sharedPool } from '../helpers/pool.js';

const skip = noKvm || noNetns;
const pool = skip ? undefined : sharedPool(2);

t.test('the TAP moves with the guest: its address answers from the destination, on the same TAP', { skip }, async (t) => {
  const ns = namespaceWithTap(t);
  const dir = mkdtempSync(path.join(tmpdir(), 'node-kvm-local-net-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const booted = await startNetEcho(t, ns, pool);
  t.equal(await udpEcho(ns, 2), expectedEcho(2));

  const address = `unix:${path.join(dir, 'm.sock')}`;
  // No net here: a copying migration would need a TAP for the card; this one is handed the source's.
  const incoming = startLocalDestination(t, address, { pool });
  await incoming.listening;
  await booted.machine.migrate(address, { local: true });
  const destination = await incoming.arrived;
  t.equal((await booted.machine.wait()).reason, 'migrated');
  t.same(destination.shape.net, [{ mac: MAC }]);
  t.match(await ping(ns, 2), '2 packets transmitted, 2 received');
  t.equal(await udpEcho(ns, 3), expectedEcho(3), 'the moved guest echoes on the same TAP');
});
