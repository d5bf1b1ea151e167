// GuestMemory.mapFileOver(): anonymous memory becomes a copy-on-write mapping of a file in place,
// its slot in a VM following (a spare VM's placeholder RAM taking a snapshot's image).
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import t from 'tap';
import { GuestMemory } from '../../lib/index.js';

const MiB = 1 << 20;

t.test('anonymous memory shows the file\'s bytes afterwards; writes stay private', async (t) => {
  const dir = mkdtempSync(path.join(tmpdir(), 'node-kvm-map-over-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const file = path.join(dir, 'image');
  const image = Buffer.alloc(4096 + MiB);
  for (let i = 0; i < image.length; i += 4096) image.writeUInt32LE(i / 4096, i);
  writeFileSync(file, image);

  const memory = GuestMemory.create(MiB);
  t.teardown(() => memory.close());
  memory.write(0, Buffer.from('old bytes'));
  const view = memory.bytes(); // made before: it must see the new mapping too
  memory.mapFileOver(file, 4096);
  t.equal(memory.backing, 'file');
  t.equal(memory.fd, -1);
  t.same(Buffer.from(memory.bytes(0, 8)), image.subarray(4096, 4104), 'the first page is the file\'s at the offset');
  t.equal(Buffer.from(view.subarray(MiB - 4096, MiB - 4092)).readUInt32LE(0), 256, 'a view made before sees the file\'s last page');
  memory.write(0, Buffer.from('guest'));
  t.same(readFileSync(file).subarray(4096, 4101), image.subarray(4096, 4101), 'writes do not reach the file');

  t.throws(() => memory.mapFileOver(file, 0), { code: 'ERR_INVALID_ARG_VALUE', message: /'file'/ }, 'a file mapping once only');
});

t.test('refused: exposed memfds, bad offsets, short files; the memory stays as it was', async (t) => {
  const dir = mkdtempSync(path.join(tmpdir(), 'node-kvm-map-over-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const short = path.join(dir, 'short');
  writeFileSync(short, Buffer.alloc(MiB - 4096));
  const exposed = GuestMemory.create(MiB, { backing: 'memfd' });
  t.teardown(() => exposed.close());
  t.throws(() => exposed.mapFileOver(short), { code: 'ERR_INVALID_ARG_VALUE', message: /'memfd'/ });
  const memory = GuestMemory.create(MiB);
  t.teardown(() => memory.close());
  memory.write(0, Buffer.from('kept'));
  t.throws(() => memory.mapFileOver(short, 100), { code: 'ERR_INVALID_ARG_VALUE', message: /multiple of 4096/ });
  t.throws(() => memory.mapFileOver(short), { code: 'ERR_OUT_OF_RANGE', message: /beyond the end/ });
  t.throws(() => memory.mapFileOver(path.join(dir, 'none')), { code: 'ENOENT' });
  t.throws(() => memory.mapFileOver(null as unknown as string), { code: 'ERR_INVALID_ARG_TYPE' });
  t.equal(memory.backing, 'anonymous');
  t.equal(Buffer.from(memory.bytes(0, 4)).toString(), 'kept', 'its pages are still there');
});
