// The vsock-echo guest through a live migration: the connection open at the source ends with the
// source, the guest gets a transport reset at the destination, and the destination's own socket
// (a new vsock.uds) reaches the guest's listener with the CID it had.
import t from 'tap';
import { once } from 'node:events';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { PassThrough } from 'node:stream';
import { Machine } from '../../lib/index.js';
import { noKvm, repoRoot } from '../helpers/kvm.js';
import { boot } from '../helpers/machine.js';
import { sharedPool } from '../helpers/pool.js';

const MiB = 1 << 20;
const image = path.join(repoRoot, 'guests', 'build', 'vsock-echo.elf');
const pool = noKvm ? undefined : sharedPool(2);

t.test('a live migration resets the connections; the destination socket reaches the guest', { skip: noKvm }, async (t) => {
  const dir = mkdtempSync(path.join(tmpdir(), 'node-kvm-vsock-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const booted = await boot({ image, memoryBytes: 16 * MiB, pool, vsock: { cid: 9, uds: path.join(dir, 'a.sock') } });
  t.teardown(() => booted.machine.stop());
  booted.machine.start();
  await booted.waitForOutput('vsock-echo: hello refused\n');
  const open = await booted.machine.vsock!.connect(5000);
  open.write('ping');
  t.equal(((await once(open, 'data')) as [Buffer])[0].toString(), 'ping');
  const ended = once(open, 'end');

  const address = `unix:${path.join(dir, 'm.sock')}`;
  let listening!: () => void;
  const ready = new Promise<void>((resolve) => (listening = resolve));
  let output = '';
  const sink = new PassThrough();
  const reset = new Promise<void>((resolve) => sink.on('data', (chunk: Buffer) => {
    output += chunk.toString('latin1');
    if (output.includes('vsock-echo: transport reset\n')) resolve();
  }));
  const incoming = Machine.incoming(address, {
    onListening: () => listening(), serial: { output: sink }, log: () => {}, pool, vsock: { uds: path.join(dir, 'b.sock') },
  });
  await ready;
  await booted.machine.migrate(address);
  const destination = await incoming;
  t.teardown(() => destination.stop());
  t.equal((await booted.machine.wait()).reason, 'migrated');
  await ended;
  t.pass('the connection to the source ended with it');
  t.same(destination.shape.vsock, { cid: 9 }, 'the guest keeps its CID');
  await reset;
  t.pass('the guest had a transport reset');
  const again = await destination.vsock!.connect(5000);
  again.write('pong');
  t.equal(((await once(again, 'data')) as [Buffer])[0].toString(), 'pong', 'the destination socket reaches the guest');
  again.destroy();
});
