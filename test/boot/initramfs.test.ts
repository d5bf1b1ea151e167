// buildInitramfs(): the exact bytes of a small newc archive, read back by an independent parser
// written here from buffer-format.rst, and listed by GNU cpio where it is installed.
import { spawnSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { buildInitramfs, type InitramfsEntry } from '../../lib/boot/index.js';

interface ParsedMember {
  name: string;
  ino: number;
  mode: number;
  uid: number;
  gid: number;
  nlink: number;
  mtime: number;
  devMajor: number;
  devMinor: number;
  rdevMajor: number;
  rdevMinor: number;
  check: number;
  data: string;
}

/** Reads a newc archive up to its trailer; checks every alignment rule on the way. */
function parseNewc(archive: Uint8Array): { members: ParsedMember[]; trailerEnd: number } {
  const text = Buffer.from(archive).toString('latin1');
  const members: ParsedMember[] = [];
  let at = 0;
  for (;;) {
    if (at % 4 !== 0) throw new Error(`member at ${at} is not 4-byte aligned`);
    if (text.slice(at, at + 6) !== '070701') throw new Error(`bad magic at ${at}: ${JSON.stringify(text.slice(at, at + 6))}`);
    const field = (i: number) => {
      const digits = text.slice(at + 6 + i * 8, at + 14 + i * 8);
      if (!/^[0-9a-fA-F]{8}$/.test(digits)) throw new Error(`field ${i} at ${at} is not 8 hex digits: ${digits}`);
      return parseInt(digits, 16);
    };
    const [ino, mode, uid, gid, nlink, mtime, fileSize, devMajor, devMinor, rdevMajor, rdevMinor, nameSize, check] = Array.from({ length: 13 }, (_, i) => field(i)) as number[];
    const nameStart = at + 110;
    const name = text.slice(nameStart, nameStart + nameSize! - 1);
    if (text[nameStart + nameSize! - 1] !== '\0') throw new Error(`name at ${nameStart} is not NUL-terminated`);
    let dataStart = nameStart + nameSize!;
    while (dataStart % 4 !== 0) {
      if (archive[dataStart] !== 0) throw new Error(`name padding at ${dataStart} is not zero`);
      dataStart++;
    }
    const data = text.slice(dataStart, dataStart + fileSize!);
    let next = dataStart + fileSize!;
    while (next % 4 !== 0) {
      if (archive[next] !== 0) throw new Error(`data padding at ${next} is not zero`);
      next++;
    }
    at = next;
    if (name === 'TRAILER!!!') return { members, trailerEnd: at };
    members.push({
      name, ino: ino!, mode: mode!, uid: uid!, gid: gid!, nlink: nlink!, mtime: mtime!, devMajor: devMajor!, devMinor: devMinor!,
      rdevMajor: rdevMajor!, rdevMinor: rdevMinor!, check: check!, data,
    });
  }
}

const sample: InitramfsEntry[] = [
  { type: 'directory', path: '/dev' },
  { type: 'device', path: '/dev/console', device: 'char', major: 5, minor: 1 },
  { type: 'device', path: 'dev/vda', device: 'block', major: 254, minor: 0, mode: 0o660 },
  { type: 'directory', path: 'bin', mode: 0o700, uid: 1000, gid: 100, mtime: 1700000000 },
  { type: 'file', path: 'bin/busybox', data: new Uint8Array([0x7f, 0x45, 0x4c, 0x46, 0]), mode: 0o755 },
  { type: 'symlink', path: 'bin/sh', target: 'busybox' },
  { type: 'file', path: 'init', data: '#!/bin/sh\necho ok\n', mode: 0o755 },
  { type: 'file', path: 'empty', data: '' },
];

t.test('the exact bytes of a two-member archive', async (t) => {
  const archive = buildInitramfs([
    { type: 'directory', path: 'dev' },
    { type: 'file', path: '/hi', data: 'hey\n', mode: 0o600, mtime: 0x10 },
  ]);
  const header = (fields: number[]) => `070701${fields.map((v) => v.toString(16).padStart(8, '0')).join('')}`;
  const expected =
    // "dev": 110 + 4 bytes of name and NUL = 114, padded to 116
    `${header([1, 0o40755, 0, 0, 2, 0, 0, 0, 0, 0, 0, 4, 0])}dev\0\0\0` +
    // "hi": 110 + 3 = 113, padded to 116; 4 bytes of data, already aligned
    `${header([2, 0o100600, 0, 0, 1, 0x10, 4, 0, 0, 0, 0, 3, 0])}hi\0\0\0\0hey\n` +
    // "TRAILER!!!": 110 + 11 = 121, padded to 124
    `${header([0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 11, 0])}TRAILER!!!\0\0\0\0`;
  t.equal(Buffer.from(archive).toString('latin1'), expected);
  t.equal(archive.length, 116 + 120 + 124);
  t.equal(archive.length % 4, 0);
});

t.test('every kind of entry reads back with its type, mode, owner, device and data', async (t) => {
  const archive = buildInitramfs(sample);
  const { members, trailerEnd } = parseNewc(archive);
  t.equal(trailerEnd, archive.length, 'the trailer ends the archive');
  t.same(members.map((m) => m.name), ['dev', 'dev/console', 'dev/vda', 'bin', 'bin/busybox', 'bin/sh', 'init', 'empty'], 'names without a leading /');
  t.same(members.map((m) => m.mode.toString(8)), ['40755', '20600', '60660', '40700', '100755', '120777', '100755', '100644']);
  t.same(members.map((m) => m.nlink), [2, 1, 1, 2, 1, 1, 1, 1]);
  t.equal(new Set(members.map((m) => m.ino)).size, members.length, 'distinct inode numbers');
  t.same(members[1], { ...members[1], rdevMajor: 5, rdevMinor: 1, devMajor: 0, devMinor: 0, data: '' });
  t.same(members[2], { ...members[2], rdevMajor: 254, rdevMinor: 0 });
  t.same(members[3], { ...members[3], uid: 1000, gid: 100, mtime: 1700000000 });
  t.equal(members[4]!.data, '\x7fELF\0');
  t.equal(members[5]!.data, 'busybox', 'a symlink holds its target, without NUL');
  t.equal(members[6]!.data, '#!/bin/sh\necho ok\n');
  t.equal(members[7]!.data, '');
  t.ok(members.every((m) => m.check === 0), 'newc: no checksum');
  t.same(buildInitramfs(sample), archive, 'the same entries give the same bytes');
});

const noCpio = spawnSync('cpio', ['--version']).error ? 'cpio is not installed (Debian package cpio): the archive is checked by the parser above only' : false;

t.test('GNU cpio lists the archive as written (where cpio is installed)', { skip: noCpio }, async (t) => {
  const file = path.join(t.testdir(), 'initramfs.cpio');
  writeFileSync(file, buildInitramfs(sample));
  const cpio = (flags: string) => spawnSync('sh', ['-c', `cpio ${flags} < "$1"`, 'sh', file], { encoding: 'utf8' });
  const names = cpio('-t --quiet');
  t.equal(names.status, 0, names.stderr);
  t.same(names.stdout.trim().split('\n'), ['dev', 'dev/console', 'dev/vda', 'bin', 'bin/busybox', 'bin/sh', 'init', 'empty']);
  const long = cpio('-t -v -n --quiet').stdout.trim().split('\n');
  t.same(long.map((line) => line.split(/\s+/)[0]),
    ['drwxr-xr-x', 'crw-------', 'brw-rw----', 'drwx------', '-rwxr-xr-x', 'lrwxrwxrwx', '-rwxr-xr-x', '-rw-r--r--']);
  t.match(long[1], /\b5,\s+1\b/, 'console is 5,1');
  t.match(long[3], /\b1000\s+100\b/, 'bin is owned by 1000:100');
  t.match(long[5], /bin\/sh -> busybox$/);
});

t.test('bad entries are refused with the entry named', async (t) => {
  const file = (path: string) => ({ type: 'file' as const, path, data: '' });
  t.throws(() => buildInitramfs([file('')]), new RangeError('entries[0].path must name something below the root, without NUL, got ""'));
  t.throws(() => buildInitramfs([file('/')]), /entries\[0\]\.path must name something below the root/);
  t.throws(() => buildInitramfs([file('a\0b')]), /without NUL/);
  t.throws(() => buildInitramfs([file('a/../b')]), new RangeError('entries[0].path must not contain \'..\', got "a/../b"'));
  t.throws(() => buildInitramfs([file('TRAILER!!!')]), /marks the end of the archive/);
  t.throws(() => buildInitramfs([file('x'), file('/x')]), new RangeError("initramfs: 'x' appears twice"));
  t.throws(() => buildInitramfs([{ type: 'file', path: 'x', data: '', mode: 0o10000 }]), /entries\[0\]\.mode must be permission bits/);
  t.throws(() => buildInitramfs([{ type: 'device', path: 'x', device: 'char', major: -1, minor: 0 }]), /entries\[0\]\.major must be an integer/);
  t.throws(() => buildInitramfs([{ type: 'device', path: 'x', device: 'pipe' as 'char', major: 1, minor: 0 }]), /device must be 'char' or 'block'/);
  t.throws(() => buildInitramfs([{ type: 'symlink', path: 'x', target: '' }]), /target must be a non-empty string/);
  t.throws(() => buildInitramfs([{ type: 'fifo', path: 'x' } as unknown as InitramfsEntry]), /type must be 'file', 'directory', 'symlink' or 'device'/);
  t.throws(() => buildInitramfs('x' as unknown as InitramfsEntry[]), new TypeError('entries must be an array'));
});
