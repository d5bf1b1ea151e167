// Every error the VMM throws or rejects with has a stable code, and a cause where it wraps
// another error: files that cannot be read keep the file system's code, arguments give
// ERR_INVALID_ARG_TYPE / ERR_OUT_OF_RANGE / ERR_INVALID_ARG_VALUE, and no error in lib/vmm is
// made without one.
import { readdirSync, readFileSync, writeFileSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Worker } from 'node:worker_threads';
import t from 'tap';
import { DirtyBitmap, IoBus, Machine, VcpuWorkerPool } from '../../lib/index.js';
import { createBusShared } from '../../lib/vmm/bus.js';
import { machineInternals } from '../../lib/vmm/machine.js';
import { watchVcpuThread } from '../../lib/vmm/pool.js';
import { guestImage, noKvm } from '../helpers/kvm.js';
import { exactly } from '../helpers/machine.js';
import { sharedPool } from '../helpers/pool.js';

const pool = noKvm ? undefined : sharedPool();
const vmmDir = fileURLToPath(new URL('../../lib/vmm/', import.meta.url));
const quiet = { serial: { output: null }, log: () => {} };
const typeError = (message: string) => ({ name: 'TypeError', code: 'ERR_INVALID_ARG_TYPE', message: exactly(message) });
const rangeError = (message: string) => ({ name: 'RangeError', code: 'ERR_OUT_OF_RANGE', message: exactly(message) });
const valueError = (message: string) => ({ name: 'RangeError', code: 'ERR_INVALID_ARG_VALUE', message: exactly(message) });

t.test('no error in lib/vmm is made without a code', async (t) => {
  const bare = /new (Error|TypeError|RangeError)\(/;
  const offenders = readdirSync(vmmDir).filter((file) => file.endsWith('.ts')).flatMap((file) =>
    readFileSync(path.join(vmmDir, file), 'utf8').split('\n').flatMap((line, index) => (bare.test(line) ? [`${file}:${index + 1}: ${line.trim()}`] : [])));
  t.same(offenders, []);
});

t.test('an image or initrd that cannot be read rejects with the file system\'s code and its error as cause', { skip: noKvm }, async (t) => {
  const image = await Machine.create({ image: '/nonexistent/guest.bin', pool, ...quiet }).catch((error: unknown) => error);
  t.match(image, { name: 'NodeKvmError', code: 'ENOENT', message: exactly('cannot read the image /nonexistent/guest.bin: ENOENT') });
  t.match((image as Error).cause, { code: 'ENOENT', syscall: 'open', path: '/nonexistent/guest.bin' });
  const initrd = await Machine.create({ image: guestImage('hello'), initrd: '/nonexistent/initrd.img', pool, ...quiet }).catch((error: unknown) => error);
  t.match(initrd, { name: 'NodeKvmError', code: 'ENOENT', message: exactly('cannot read the initrd /nonexistent/initrd.img: ENOENT') });
  t.match((initrd as Error).cause, { code: 'ENOENT', syscall: 'open', path: '/nonexistent/initrd.img' });
  const directory = await Machine.create({ image: '/', pool, ...quiet }).catch((error: unknown) => error);
  t.match(directory, { code: 'EISDIR', message: exactly('cannot read the image /: EISDIR'), cause: { code: 'EISDIR' } });
});

t.test('Machine.create\'s argument errors carry their codes', { skip: noKvm }, async (t) => {
  const image = guestImage('hello');
  await t.rejects(Machine.create(null as never), typeError('config must be an object'));
  await t.rejects(Machine.create({ image: 42 as never }), typeError('image must be a Uint8Array or a file path'));
  await t.rejects(Machine.create({ image, initrd: 42 as never }), typeError('initrd must be a Uint8Array or a file path'));
  await t.rejects(Machine.create({ image, memoryBytes: 1000 }), rangeError('memoryBytes must be a positive multiple of 1 MiB, got 1000'));
  await t.rejects(Machine.create({ image, memoryBytes: '64' as never }), typeError('memoryBytes must be a positive multiple of 1 MiB, got 64'));
  await t.rejects(Machine.create({ image, memoryBytes: 4096 * 1024 * 1024 }), rangeError('memoryBytes above 3072 MiB is not supported'));
  await t.rejects(Machine.create({ image, vcpus: 0 }), rangeError('vcpus must be an integer 1..255, got 0'));
  await t.rejects(Machine.create({ image, signal: {} as never }), typeError('signal must be an AbortSignal'));
  await t.rejects(Machine.create({ image, dirtyLog: 'log' as never, pool, ...quiet }), valueError("dirtyLog must be 'bitmap' or 'ring', got log"));
  await t.rejects(Machine.create({ image, disks: 'x' as never, pool }), typeError('disks must be an array of { path, readOnly?, id? }'));
  await t.rejects(Machine.create({ image, disks: [{ path: '/d', id: 'x'.repeat(21) }], pool }), valueError('disks[0].id must be a string of at most 20 bytes'));
  await t.rejects(Machine.create({ image, disks: Array.from({ length: 9 }, () => ({ path: '/d' })), pool }), rangeError('at most 8 disks, got 9'));
  t.throws(() => machineInternals({} as never), typeError('machine must be a Machine'));
});

t.test('a disk that cannot be opened, is too small or is in use: ENOENT with cause, ERR_INVALID_ARG_VALUE, EBUSY', { skip: noKvm }, async (t) => {
  const dir = mkdtempSync(path.join(tmpdir(), 'node-kvm-errors-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const image = guestImage('spin');
  const missing = path.join(dir, 'missing.img');
  const opened = await Machine.create({ image, disks: [{ path: missing }], pool, ...quiet }).catch((error: unknown) => error);
  t.match(opened, { code: 'ENOENT', message: exactly(`disk 0: cannot open ${missing} for writing: ENOENT`), cause: { code: 'ENOENT', syscall: 'open' } });
  const tiny = path.join(dir, 'tiny.img');
  writeFileSync(tiny, Buffer.alloc(100));
  await t.rejects(Machine.create({ image, disks: [{ path: tiny }], pool, ...quiet }), valueError(`disk 0: ${tiny} is smaller than one 512-byte sector`));
  const shared = path.join(dir, 'shared.img');
  writeFileSync(shared, Buffer.alloc(64 * 512));
  const holder = await Machine.create({ image, disks: [{ path: shared }], pool, ...quiet });
  t.teardown(() => holder.stop());
  await t.rejects(Machine.create({ image, disks: [{ path: shared }], pool, ...quiet }), {
    name: 'NodeKvmError', code: 'EBUSY', message: exactly(`disk 0: ${shared} is in use by another machine (it holds a lock on the image)`),
  });
});

t.test('pool errors: arguments, a closed pool, a thread that fails to load', { skip: noKvm }, async (t) => {
  t.throws(() => VcpuWorkerPool.start(-1), rangeError('size must be an integer 0..1024, got -1'));
  t.throws(() => VcpuWorkerPool.start('2' as never), typeError('size must be an integer 0..1024, got 2'));
  t.throws(() => VcpuWorkerPool.start(1, 'no' as never), typeError('started must be an array of vCPU threads'));
  const closed = VcpuWorkerPool.start(0);
  await t.rejects(closed.acquire(-1), rangeError('count must be a non-negative integer, got -1'));
  await closed.close();
  await t.rejects(closed.acquire(1), { name: 'NodeKvmError', code: 'ERR_INVALID_STATE', message: exactly('the vCPU pool is closed') });
  const broken = watchVcpuThread(new Worker('throw new Error("no code here")', { eval: true }));
  const failure = await broken.loaded.catch((error: unknown) => error);
  t.match(failure, { code: 'ERR_WORKER_INIT_FAILED', message: exactly('a vCPU thread failed to load: no code here'), cause: { message: 'no code here' } });
  const withBroken = VcpuWorkerPool.start(1, [watchVcpuThread(new Worker('throw new Error("nor here")', { eval: true }))]);
  t.teardown(() => withBroken.close());
  await t.rejects(Machine.create({ image: guestImage('hello'), memoryBytes: 1 << 20, pool: withBroken, ...quiet }), {
    code: 'ERR_WORKER_INIT_FAILED', message: exactly('vCPU 0 could not start: a vCPU thread failed to load: nor here'), cause: { message: /nor here/ },
  });
});

t.test('the I/O bus and the dirty bitmap give their argument errors codes', async (t) => {
  const bus = new IoBus(createBusShared(), () => {});
  const device = { name: 'dev', read: () => 0, write: () => {} };
  t.throws(() => bus.registerPorts(0xfff0, 0x20, device), rangeError('ports 65520+32 are outside 0..0xffff'));
  bus.registerPorts(0x100, 8, device);
  t.throws(() => bus.registerPorts(0x104, 1, { ...device, name: 'other' }), valueError('port 0x104 of other is taken by dev'));
  t.throws(() => bus.registerMmio(-1, 4096, device), rangeError('the MMIO range -1+4096 is not a non-negative base and a positive size'));
  bus.registerMmio(0x1000, 0x1000, device);
  t.throws(() => bus.registerMmio(0x1800, 0x1000, { ...device, name: 'other' }), valueError('MMIO range of other overlaps dev'));
  t.throws(() => DirtyBitmap.create('8' as never), typeError('pageCount must be a number, got string'));
  t.throws(() => DirtyBitmap.create(-1), rangeError('pageCount must be an integer 0..2147483648, got -1'));
  const bitmap = DirtyBitmap.create(8);
  t.throws(() => bitmap.markPages(4, 8), rangeError('pages [4, 12) are outside the dirty bitmap (8 pages)'));
});
