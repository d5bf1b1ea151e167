// Guest memory shared by fd (GuestMemory.shareFd() and fromFd()), and fds passed over a unix
// socket (sendWithFds, receiveWithFds): what a same-host live update stands on. Needs no /dev/kvm.
import { closeSync, fstatSync, ftruncateSync, openSync, rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import t from 'tap';
import { GuestMemory } from '../../lib/kvm/memory.js';
import { dupFile, dupSocket, receiveWithFds, sendWithFds } from '../../lib/kvm/host.js';

const MiB = 1024 * 1024;

t.test('shareFd() and fromFd(): the same pages, nothing copied', async (t) => {
  const memory = GuestMemory.create(4 * MiB);
  t.teardown(() => memory.close());
  memory.write(MiB, Buffer.from('before'));
  const fd = memory.shareFd();
  const other = GuestMemory.fromFd(fd, { size: 4 * MiB, backing: 'memfd' });
  closeSync(fd);
  t.teardown(() => other.close());
  t.equal(Buffer.from(other.bytes(MiB, 6)).toString(), 'before', 'the other mapping sees what was written');
  other.write(MiB, Buffer.from('after!'));
  t.equal(Buffer.from(memory.bytes(MiB, 6)).toString(), 'after!', 'and this one what the other wrote');
  t.equal(other.backing, 'memfd');
  t.ok(other.fd >= 0, 'memfd backing exposes an fd');
  const shared = memory.shareFd();
  t.equal(fstatSync(other.fd).ino, fstatSync(shared).ino, 'one memfd');
  closeSync(shared);
  // The memfd of GuestMemory.create() is sealed: nobody can shrink it under a mapping.
  const again = memory.shareFd();
  t.throws(() => ftruncateSync(again, MiB), { code: 'EPERM' }, 'cannot shrink');
  t.throws(() => ftruncateSync(again, 8 * MiB), { code: 'EPERM' }, 'cannot grow');
  closeSync(again);
});

t.test('fromFd() refuses what is not a sealed memfd of the size asked, mapping nothing', async (t) => {
  const before = GuestMemory.stats().mappings;
  const memory = GuestMemory.create(2 * MiB);
  t.teardown(() => memory.close());
  const fd = memory.shareFd();
  t.teardown(() => closeSync(fd));
  const refused = (what: string, fdToMap: number, size: number, message: string) =>
    t.throws(() => GuestMemory.fromFd(fdToMap, { size }), { code: 'ERR_INVALID_ARG_VALUE', message }, what);
  refused('another size', fd, 4 * MiB, 'the memfd holds 2097152 bytes, not 4194304');
  const file = openSync(process.execPath, 'r');
  t.teardown(() => closeSync(file));
  refused('a regular file', file, 4096, 'fd is not a memfd (it takes no seals)');
  // A tmpfs file takes seals (F_SEAL_SEAL only): not sealed against shrinking.
  const shmPath = path.join('/dev/shm', `node-kvm-test-${process.pid}`);
  const shm = openSync(shmPath, 'w+');
  t.teardown(() => {
    closeSync(shm);
    rmSync(shmPath, { force: true });
  });
  ftruncateSync(shm, 2 * MiB);
  refused('an unsealed shmem file', shm, 2 * MiB, 'the memfd is not sealed against shrinking and growing (F_SEAL_SHRINK | F_SEAL_GROW)');
  const readOnly = openSync(`/proc/self/fd/${fd}`, 'r');
  t.teardown(() => closeSync(readOnly));
  refused('a read-only fd', readOnly, 2 * MiB, 'the memfd is not open for reading and writing');
  t.throws(() => GuestMemory.fromFd(-1, { size: 4096 }), { code: 'ERR_OUT_OF_RANGE' });
  t.throws(() => GuestMemory.fromFd(fd, { size: 1000 }), { code: 'ERR_INVALID_ARG_VALUE' });
  t.equal(GuestMemory.stats().mappings, before + 1, 'only the original mapping exists');
  const file2 = GuestMemory.mapFile(process.execPath, { size: 4096 });
  t.throws(() => file2.shareFd(), { code: 'ERR_INVALID_ARG_VALUE', message: /copy-on-write mapping of a file/ }, 'a file mapping has no memfd to share');
  file2.close();
});

t.test('fds over a unix socket: they arrive with their bytes, as the same open files', async (t) => {
  const dir = tmpdir();
  const socketPath = path.join(dir, `node-kvm-fds-${process.pid}.sock`);
  const server = net.createServer({ pauseOnConnect: true });
  await new Promise<void>((resolve) => server.listen(socketPath, resolve));
  t.teardown(() => server.close());
  const accepted = new Promise<net.Socket>((resolve) => server.once('connection', resolve));
  const client = net.createConnection(socketPath);
  await new Promise((resolve) => client.once('connect', resolve));
  t.teardown(() => client.destroy());
  const peer = await accepted;
  // This side reads the raw fd itself: Node's own reads would drop the fds.
  const raw = dupSocket((peer as unknown as { _handle: { fd: number } })._handle.fd);
  peer.destroy();
  t.teardown(() => closeSync(raw));
  t.equal(receiveWithFds(raw, 64, 4), null, 'nothing there yet');

  const memory = GuestMemory.create(MiB);
  t.teardown(() => memory.close());
  memory.write(0, Buffer.from('shared'));
  const memfd = memory.shareFd();
  const image = openSync(process.execPath, 'r');
  sendWithFds((client as unknown as { _handle: { fd: number } })._handle.fd, Buffer.from('hello'), [memfd, image]);
  let got = receiveWithFds(raw, 64, 4);
  for (let i = 0; got === null && i < 100; i++) {
    await new Promise((resolve) => setTimeout(resolve, 10));
    got = receiveWithFds(raw, 64, 4);
  }
  t.ok(got);
  t.equal(Buffer.from(got!.bytes).toString(), 'hello');
  t.equal(got!.fds.length, 2);
  t.equal(got!.fdsDropped, false);
  const received = GuestMemory.fromFd(got!.fds[0]!, { size: MiB });
  t.equal(Buffer.from(received.bytes(0, 6)).toString(), 'shared', 'the memfd maps the same pages');
  received.close();
  t.equal(fstatSync(got!.fds[1]!).ino, fstatSync(image).ino, 'the file is the same');
  t.throws(() => dupFile(got!.fds[1]!, true), { message: 'fd is not open for reading and writing' }, 'a read-only file cannot back a writable disk');
  const copy = dupFile(got!.fds[1]!, false);
  closeSync(copy);
  for (const fd of got!.fds) closeSync(fd);
  closeSync(memfd);

  // More than the receiver takes: the rest are closed for it and it is told.
  sendWithFds((client as unknown as { _handle: { fd: number } })._handle.fd, Buffer.from('x'), [image, image, image]);
  let more = receiveWithFds(raw, 64, 1);
  for (let i = 0; more === null && i < 100; i++) {
    await new Promise((resolve) => setTimeout(resolve, 10));
    more = receiveWithFds(raw, 64, 1);
  }
  t.equal(more!.fds.length, 1);
  t.equal(more!.fdsDropped, true);
  closeSync(more!.fds[0]!);
  closeSync(image);
  t.throws(() => sendWithFds(image, Buffer.from('x'), []), 'a closed fd is refused');
  t.throws(() => sendWithFds(raw, new Uint8Array(0), []), { message: /at least one byte/ });
  const file = openSync(process.execPath, 'r');
  t.throws(() => receiveWithFds(file, 64, 1), { code: 'ENOTSOCK' });
  closeSync(file);
});

t.test('replaceWith(): the other memfd in place, under every view and the same fd number', async (t) => {
  const memory = GuestMemory.create(2 * MiB, { backing: 'memfd' });
  t.teardown(() => memory.close());
  const view = GuestMemory.attach(memory.handle);
  t.teardown(() => view.close());
  const before = view.bytes(0, 4);
  memory.write(0, Buffer.from('mine'));
  const other = GuestMemory.create(2 * MiB);
  other.write(0, Buffer.from('they'));
  const fdNumber = memory.fd;
  memory.replaceWith(other);
  t.equal(Buffer.from(before).toString(), 'they', 'a view made before sees the other pages');
  other.write(0, Buffer.from('both'));
  t.equal(Buffer.from(view.bytes(0, 4)).toString(), 'both', 'shared from then on');
  const otherFd = other.shareFd();
  t.equal(fstatSync(fdNumber).ino, fstatSync(otherFd).ino, 'the exposed fd number names the other memfd now');
  closeSync(otherFd);
  other.close();
  t.equal(Buffer.from(view.bytes(0, 4)).toString(), 'both', 'the pages stay when the other is closed');
  const small = GuestMemory.create(MiB);
  t.throws(() => memory.replaceWith(small), { code: 'ERR_INVALID_ARG_VALUE' }, 'sizes must match');
  small.close();
  const file = GuestMemory.mapFile(process.execPath, { size: 2 * MiB });
  t.throws(() => memory.replaceWith(file), { code: 'ERR_INVALID_ARG_VALUE', message: 'only memfd-backed memory can be replaced, or replace another' });
  file.close();
});

t.test('fd is -1 once closed, while a view keeps the mapping and its memfd open', async (t) => {
  const memory = GuestMemory.create(MiB, { backing: 'memfd' });
  const view = GuestMemory.attach(memory.handle);
  t.teardown(() => view.close());
  const fd = memory.fd;
  t.ok(fd >= 0, 'an fd while open');
  memory.close();
  t.equal(memory.fd, -1, 'none once closed: the number is not this object\'s to use any more');
  t.doesNotThrow(() => fstatSync(view.fd), 'the view still has the memfd open');
  t.equal(view.fd, fd, 'under the same number, the view\'s while it lives');
});

t.test('retainMapping(): the mapping and its memfd stay, without a view, until released', async (t) => {
  const before = GuestMemory.stats().mappings;
  const memory = GuestMemory.create(MiB, { backing: 'memfd' });
  memory.write(4096, Buffer.from('kept'));
  const fd = memory.fd;
  const release = memory.retainMapping();
  memory.close();
  t.ok(GuestMemory.stats().mappings > before, 'still mapped once its only GuestMemory has closed');
  t.ok(fstatSync(fd).size === MiB, 'its memfd still open');
  release();
  t.equal(GuestMemory.stats().mappings, before, 'unmapped when released');
  t.doesNotThrow(() => release(), 'releasing again does nothing');
  t.equal(GuestMemory.stats().mappings, before);
  t.throws(() => memory.retainMapping(), { code: 'EBADF' }, 'a closed GuestMemory retains nothing');
});
