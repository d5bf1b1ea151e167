// Disks: a raw image file given to the guest as a virtio-blk device. The disk guest finds its
// disks, reads sector 0 of each and prints it, checks that a read-only one refuses writes, and
// exits (debug-exit 0x10).
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { Machine } from 'node-kvm';

const dir = mkdtempSync(path.join(tmpdir(), 'node-kvm-example-'));
try {
  const data = path.join(dir, 'data.img');
  const base = path.join(dir, 'base.img');
  // A raw image: its size a multiple of 512 bytes (a partial last sector is not part of the disk).
  writeFileSync(data, Buffer.concat([Buffer.from('hello from data.img\n'), Buffer.alloc(64 * 1024)]));
  writeFileSync(base, Buffer.concat([Buffer.from('hello from base.img\n'), Buffer.alloc(32 * 1024)]));
  const machine = await Machine.create({
    image: new URL('../../guests/build/disk.elf', import.meta.url).pathname,
    disks: [{ path: data, id: 'data' }, { path: base, readOnly: true }],
  });
  machine.console.pipe(process.stdout);
  machine.start();
  const exit = await machine.wait();
  console.log(`exit: ${exit.reason} 0x${exit.code?.toString(16)}`);
} finally {
  rmSync(dir, { recursive: true, force: true });
}
