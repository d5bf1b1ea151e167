// guestPath() and guestImages(): the shipped guest images found by file name, exactly the images
// guests/build.mjs builds (not its intermediates), and one of them booted from the path given.
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { PassThrough } from 'node:stream';
import t from 'tap';
import { guestImages, guestPath, Machine } from '../../lib/index.js';
// @ts-expect-error: a plain JavaScript module, without type declarations
import { buildGuests } from '../../guests/build.mjs';
import { noKvm, repoRoot } from '../helpers/kvm.js';
import { sharedPool } from '../helpers/pool.js';

const built = buildGuests() as Record<string, string>;

t.test('guestImages() lists every image guests/build.mjs builds, and nothing else', async (t) => {
  const expected = Object.values(built).map((file) => path.basename(file)).sort();
  t.same(guestImages(), expected);
  t.ok(expected.includes('hello.bin') && expected.includes('disk.elf') && expected.includes('bzimage.bin'), 'flat, C and bzImage guests are there');
  t.notOk(guestImages().some((name) => name.endsWith('.bin.elf') || name.endsWith('.o')), 'no intermediate');
});

t.test('guestPath() gives the absolute path of a shipped image', async (t) => {
  const file = guestPath('hello.bin');
  t.equal(file, path.join(repoRoot, 'guests', 'build', 'hello.bin'));
  t.ok(path.isAbsolute(file));
  t.equal(guestPath('smp.elf'), built.smp);
});

t.test('guestPath() refuses a name that is not a shipped image, naming the images', async (t) => {
  const list = guestImages().join(', ');
  t.throws(() => guestPath('hello'), {
    name: 'RangeError', code: 'ERR_INVALID_ARG_VALUE',
    message: `guestPath: no shipped guest image is named "hello" (did you mean hello.bin?); there are ${list}`,
  });
  for (const name of ['nope.bin', 'hello.bin.elf', 'hello.o', '../build/hello.bin', '/etc/passwd', '']) {
    t.throws(() => guestPath(name), { code: 'ERR_INVALID_ARG_VALUE', message: `guestPath: no shipped guest image is named ${JSON.stringify(name)}; there are ${list}` }, name);
  }
  t.throws(() => guestPath(42 as unknown as string), { name: 'TypeError', code: 'ERR_INVALID_ARG_TYPE', message: 'guestPath: file must be a string, not number' });
});

t.test('a machine boots the image guestPath() names', { skip: noKvm }, async (t) => {
  let printed = '';
  const output = new PassThrough().on('data', (chunk: Buffer) => (printed += chunk.toString('latin1')));
  const machine = await Machine.create({ image: guestPath('hello.bin'), memoryBytes: 1 << 20, pool: sharedPool(), log: () => {}, serial: { output } });
  machine.start();
  const exit = await machine.wait();
  t.equal(printed, 'Hello from node-kvm!\n');
  t.equal(exit.reason, 'hlt');
  t.same(readFileSync(guestPath('hello.bin')), readFileSync(built.hello));
});
