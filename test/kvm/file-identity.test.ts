// fileIdentity(fd): which file an fd is (device and inode, exact 64-bit numbers), its size, and
// whether it is a regular file, as fstat(2) gives them; bad input refused, a closed fd EBADF.
import { closeSync, mkdtempSync, openSync, renameSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import t from 'tap';
import { fileIdentity } from '../../lib/kvm/host.js';

t.test('a file, a directory, a renamed-over path: device, inode, size, regular', async (t) => {
  const dir = mkdtempSync(path.join(tmpdir(), 'node-kvm-identity-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const file = path.join(dir, 'a');
  writeFileSync(file, Buffer.alloc(12345, 1));
  const fd = openSync(file, 'r');
  t.teardown(() => closeSync(fd));
  const { dev, ino, size } = statSync(file, { bigint: true });
  t.same(fileIdentity(fd), { dev, ino, size: Number(size), regular: true });

  const dirFd = openSync(dir, 'r');
  t.teardown(() => closeSync(dirFd));
  t.equal(fileIdentity(dirFd).regular, false, 'a directory is not a regular file');

  // Another file renamed over the path: the open fd is still the first file, the path the second.
  const other = path.join(dir, 'b');
  writeFileSync(other, 'x');
  const { ino: otherIno } = statSync(other, { bigint: true });
  renameSync(other, file);
  t.equal(fileIdentity(fd).ino, ino, 'the fd: the file it was opened on');
  const again = openSync(file, 'r');
  t.teardown(() => closeSync(again));
  t.same({ ino: fileIdentity(again).ino, size: fileIdentity(again).size }, { ino: otherIno, size: 1 }, 'the path: the file renamed over it');
  t.not(otherIno, ino);
});

t.test('bad input: not a number, out of range, a closed fd', async (t) => {
  t.throws(() => fileIdentity('3' as never), { code: 'ERR_INVALID_ARG_TYPE' });
  t.throws(() => fileIdentity(-1), { code: 'ERR_OUT_OF_RANGE' });
  t.throws(() => fileIdentity(1.5), { code: 'ERR_OUT_OF_RANGE' });
  const dir = mkdtempSync(path.join(tmpdir(), 'node-kvm-identity-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const fd = openSync(dir, 'r');
  closeSync(fd);
  t.throws(() => fileIdentity(fd), { code: 'EBADF', syscall: 'fstat' });
});
