// Post-copy with a virtio-blk disk in the middle of its I/O: the disk's own thread writes the
// guest's buffers and reads its rings, so it faults on missing pages too (served like the vCPUs').
// The guest's loop checks every block it reads back.
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { PassThrough } from 'node:stream';
import t from 'tap';
import { GUEST_PARAMS_ADDR, Machine } from '../../lib/index.js';
import { noKvm, repoRoot } from '../helpers/kvm.js';
import { boot } from '../helpers/machine.js';
import { sharedPool } from '../helpers/pool.js';

const MiB = 1 << 20;
const image = path.join(repoRoot, 'guests', 'build', 'disk.elf');
const LOOP_MODE = 1;
const pool = noKvm ? undefined : sharedPool(2);
const lastRound = (output: string) => Math.max(-1, ...[...output.matchAll(/round (\d+) ok\n/g)].map((m) => Number(m[1])));

t.test('post-copy in the middle of disk I/O: the destination finishes the guest\'s rounds', { skip: noKvm }, async (t) => {
  const dir = mkdtempSync(path.join(tmpdir(), 'node-kvm-pc-disk-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const file = path.join(dir, 'disk.img');
  const bytes = Buffer.alloc(1024 * 512);
  for (let i = 0; i < bytes.length; i++) bytes[i] = (i * 13 + 7) & 0xff;
  bytes.write('postcopy\n', 0, 'latin1');
  writeFileSync(file, bytes);

  const source = await boot({ image, memoryBytes: 64 * MiB, disks: [{ path: file }], pool });
  t.teardown(() => void source.machine.stop());
  const params = new DataView(new ArrayBuffer(24));
  params.setUint32(0, LOOP_MODE, true);
  source.machine.writeMemory(GUEST_PARAMS_ADDR, new Uint8Array(params.buffer));
  source.machine.start();
  await source.waitForOutput('round 2 ok\n');

  let output = '';
  const sink = new PassThrough();
  sink.on('data', (chunk: Buffer) => (output += chunk.toString('latin1')));
  const address = `unix:${path.join(dir, 'm.sock')}`;
  let listening!: () => void;
  const ready = new Promise<void>((resolve) => (listening = resolve));
  const incoming = Machine.incoming(address, { onListening: () => listening(), serial: { output: sink }, log: () => {}, pool });
  incoming.catch(() => {});
  await ready;
  const stats = await source.machine.migrate(address, { postcopy: true });
  t.ok(stats.postcopy && stats.postcopy.pagesOnDemand + stats.postcopy.pagesBackground === stats.postcopy.missingPages, 'every missing page went once');
  const destination = await incoming;
  t.teardown(() => void destination.stop());
  t.equal((await source.machine.wait()).reason, 'migrated');
  const from = lastRound(source.output());
  const deadline = Date.now() + 20_000;
  while (lastRound(output) < from + 3 && Date.now() < deadline && !output.includes('BAD')) await new Promise((r) => setTimeout(r, 20));
  t.notMatch(source.output() + output, 'BAD');
  t.ok(lastRound(output) >= from + 3, `the destination runs on: rounds ${from} -> ${lastRound(output)}`);
});
