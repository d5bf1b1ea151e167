// The `net-echo` guest on a TAP inside a network namespace survives a snapshot/restore: the
// restoring machine opens its own TAP (given in its config) and the guest's address answers there.
import t from 'tap';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { PassThrough } from 'node:stream';
import { Machine } from '../../lib/index.js';
import { noKvm } from '../helpers/kvm.js';
import { expectedEcho, MAC, namespaceWithTap, ping, startNetEcho, udpEcho } from '../helpers/net-echo.js';
import { noNetns } from '../helpers/netns.js';
import { sharedPool } from '../helpers/pool.js';

const skip = noKvm || noNetns;
const pool = skip ? undefined : sharedPool(1);

t.test('the guest answers after a snapshot/restore, on the TAP the restoring machine opens', { skip }, async (t) => {
  const ns = namespaceWithTap(t);
  const dir = mkdtempSync(path.join(tmpdir(), 'node-kvm-net-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const booted = await startNetEcho(t, ns, pool);
  t.equal(await udpEcho(ns, 1), expectedEcho(1));
  const snapshot = path.join(dir, 'net.snap');
  await booted.machine.pause();
  await booted.machine.snapshot(snapshot);
  await booted.machine.stop();
  t.same(booted.machine.shape.net, [{ mac: MAC }], 'the shape records the card\'s MAC');

  await t.rejects(Machine.restore(snapshot, { log: () => {}, pool }), /had 1 network card; give a TAP for each in net \(got 0\)/);
  const sink = new PassThrough();
  let output = '';
  sink.on('data', (chunk: Buffer) => (output += chunk.toString('latin1')));
  const restored = await Machine.restore(snapshot, { serial: { output: sink }, log: () => {}, pool, net: [{ tap: 'tap0', netns: ns.path }] });
  t.teardown(() => restored.stop());
  restored.start();
  t.match(await ping(ns, 2), '2 packets transmitted, 2 received');
  t.equal(await udpEcho(ns, 3), expectedEcho(3), 'the restored guest echoes');
  t.notMatch(output, 'BAD');
});
