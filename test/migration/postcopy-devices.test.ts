// Post-copy with a virtio-blk disk in the middle of its I/O: the disk's own thread writes the
// guest's buffers and reads its rings, so it faults on missing pages too (served like the vCPUs').
// The guest's loop checks every block it reads back.
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import t from 'tap';
import { lastRound, startDiskLoop, untilRound } from '../helpers/disk-loop.js';
import { noKvm } from '../helpers/kvm.js';
import { startLocalDestination } from '../helpers/migration-peer.js';
import { sharedPool } from '../helpers/pool.js';

const pool = noKvm ? undefined : sharedPool(2);

t.test('post-copy in the middle of disk I/O: the destination finishes the guest\'s rounds', { skip: noKvm }, async (t) => {
  const dir = mkdtempSync(path.join(tmpdir(), 'node-kvm-pc-disk-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const file = path.join(dir, 'disk.img');
  const bytes = Buffer.alloc(1024 * 512);
  for (let i = 0; i < bytes.length; i++) bytes[i] = (i * 13 + 7) & 0xff;
  bytes.write('postcopy\n', 0, 'latin1');
  writeFileSync(file, bytes);

  const source = await startDiskLoop(t, file, { pool });

  const address = `unix:${path.join(dir, 'm.sock')}`;
  const incoming = startLocalDestination(t, address, { pool });
  await incoming.listening;
  const stats = await source.machine.migrate(address, { postcopy: true });
  t.ok(stats.postcopy && stats.postcopy.pagesOnDemand + stats.postcopy.pagesBackground === stats.postcopy.missingPages, 'every missing page went once');
  await incoming.arrived;
  t.equal((await source.machine.wait()).reason, 'migrated');
  const from = lastRound(source.output());
  await untilRound(incoming.output, from + 3);
  t.notMatch(source.output() + incoming.output(), 'BAD');
  t.ok(lastRound(incoming.output()) >= from + 3, `the destination runs on: rounds ${from} -> ${lastRound(incoming.output())}`);
});
