// Multiboot modules, as QEMU's -initrd "FILE ARGS,FILE2 ..." gives a Multiboot kernel: where the
// loader puts them and how it lists them (planBoot, pure), what a kernel reads of them
// (guests/multiboot-modules.S through the library and through `node-kvm run --initrd` in this
// process), and the errors for modules that cannot be given.
import { mkdirSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import t, { type Test } from 'tap';
import { BootImageError, MULTIBOOT_BOOTLOADER_MAGIC, planBoot, type BootPlan, type MultibootModule } from '../../lib/boot/index.js';
import { parseModulesOption } from '../../lib/cli/run.js';
import { Machine } from '../../lib/index.js';
import { nodeKvmInProcess } from '../helpers/cli.js';
import { elfGuest } from '../helpers/boot-runner.js';
import { boot } from '../helpers/machine.js';
import { sharedPool } from '../helpers/pool.js';
import { guestImage, noKvm, repoRoot, throwsArgError } from '../helpers/kvm.js';

const pool = sharedPool();
const MiB = 1 << 20;
const kernelPath = path.join(repoRoot, 'guests', 'build', 'multiboot-modules.elf');
const kernel = elfGuest('multiboot-modules');

const FNV_BASIS = 0x811c9dc5;
const FNV_PRIME = 16777619;
/** 32-bit FNV-1a, as the guest computes it. */
function fnv(bytes: Uint8Array): number {
  let hash = FNV_BASIS;
  for (const byte of bytes) hash = Math.imul(hash ^ byte, FNV_PRIME) >>> 0;
  return hash;
}
/** The guest's exit code: a digest of every module's string and bytes (see the guest's header). */
function digest(modules: { string: string; data: Uint8Array }[]): number {
  let d = modules.length;
  for (const { string, data } of modules) {
    d = Math.imul(d ^ fnv(Buffer.from(string)), FNV_PRIME) >>> 0;
    d = Math.imul(d ^ fnv(data), FNV_PRIME) >>> 0;
  }
  return d;
}
const hex8 = (value: number) => value.toString(16).padStart(8, '0');
/** The line the guest prints for module `index`. */
const moduleLine = (index: number, start: number, string: string, data: Uint8Array) =>
  `module ${index} at 0x${hex8(start)} ${data.length} bytes fnv 0x${hex8(fnv(data))}: ${string}\n`;

/** 5000 bytes (more than a page, so the next module's page is not the first free one). */
const bigModule = Uint8Array.from({ length: 5000 }, (_, i) => (i * 7 + 3) & 0xff);
const smallModule = Buffer.from('the second module\n');

function cString(view: DataView, addr: number): string {
  let text = '';
  for (let at = addr; view.getUint8(at) !== 0; at++) text += String.fromCharCode(view.getUint8(at));
  return text;
}

/** Guest RAM below `bytes` as the plan leaves it. */
function planMemory(plan: BootPlan, bytes: number): DataView {
  const memory = new Uint8Array(bytes);
  for (const write of plan.writes) if ('data' in write) memory.set(write.data, write.guestPhysAddr);
  return new DataView(memory.buffer);
}

function failsToPlan(t: Test, image: Uint8Array, modules: MultibootModule[], message: string | RegExp, memoryBytes = 64 * MiB): void {
  let error: unknown;
  try {
    planBoot(image, { memoryBytes, vcpus: 1, modules });
  } catch (caught) {
    error = caught;
  }
  t.ok(error instanceof BootImageError, 'a BootImageError');
  t.match(error, { code: 'ERR_BOOT_IMAGE', message: typeof message === 'string' ? new RegExp(`^${message.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}$`) : message });
}

t.test('planBoot: modules on page boundaries above the kernel, listed in multiboot_info with their strings', async (t) => {
  const modules = [
    { data: bigModule, cmdline: 'big.bin arg1 key=value' },
    { data: smallModule, cmdline: 'we,ird.bin' },
    { data: new Uint8Array(0) },
  ];
  const plan = planBoot(kernel, { memoryBytes: 16 * MiB, vcpus: 1, cmdline: 'console=ttyS0', modules });
  t.equal(plan.format, 'multiboot');
  t.equal(plan.bsp.regs.rax, BigInt(MULTIBOOT_BOOTLOADER_MAGIC));
  const view = planMemory(plan, 2 * MiB);
  const info = Number(plan.bsp.regs.rbx);
  t.equal(view.getUint32(info, true), 0x24d, 'flags: mem (0), cmdline (2), mods (3), mmap (6), boot loader name (9)');
  t.equal(view.getUint32(info + 20, true), 3, 'mods_count');
  const list = view.getUint32(info + 24, true);
  t.ok(list >= 0x6000 && list + 3 * 16 <= 0x7c00, 'the list is in the boot information area');
  const entries = Array.from({ length: 3 }, (_, i) => ({
    start: view.getUint32(list + i * 16, true),
    end: view.getUint32(list + i * 16 + 4, true),
    string: cString(view, view.getUint32(list + i * 16 + 8, true)),
    reserved: view.getUint32(list + i * 16 + 12, true),
  }));
  // The kernel's segments end at 0x101410 (text, then data+bss from 0x101000).
  t.same(entries, [
    { start: 0x102000, end: 0x102000 + 5000, string: 'big.bin arg1 key=value', reserved: 0 },
    { start: 0x104000, end: 0x104000 + smallModule.length, string: 'we,ird.bin', reserved: 0 },
    { start: 0x105000, end: 0x105000, string: '', reserved: 0 },
  ]);
  t.same(new Uint8Array(view.buffer, 0x102000, 5000), bigModule, "module 0's bytes are where its entry says");
  t.same(new Uint8Array(view.buffer, 0x104000, smallModule.length), new Uint8Array(smallModule), "module 1's bytes are where its entry says");
  t.same(plan.writes.filter((w) => w.what.startsWith('Multiboot module')).map((w) => w.what),
    ['Multiboot module 0 ("big.bin arg1 key=value")', 'Multiboot module 1 ("we,ird.bin")', 'Multiboot module 2']);
  t.equal(cString(view, view.getUint32(info + 16, true)), 'console=ttyS0', 'the command line is still there');

  const none = planBoot(kernel, { memoryBytes: 16 * MiB, vcpus: 1, modules: [] });
  const noneView = planMemory(none, 2 * MiB);
  t.equal(noneView.getUint32(Number(none.bsp.regs.rbx), true) & 0x8, 0, 'no modules: flags bit 3 clear');
});

t.test('a flat Multiboot kernel (header address fields) gets its modules above its bss', async (t) => {
  // Loaded at 0x200000: 32 bytes of header, then bss up to 0x203800.
  const header = Buffer.alloc(32);
  [0x1badb002, 0x10003, -(0x1badb002 + 0x10003) >>> 0, 0x200000, 0x200000, 0, 0x203800, 0x200020].forEach((v, i) => header.writeUInt32LE(v >>> 0, i * 4));
  const plan = planBoot(new Uint8Array(Buffer.concat([header, Buffer.from([0xf4])])), { memoryBytes: 8 * MiB, vcpus: 1, modules: [{ data: smallModule }] });
  const write = plan.writes.find((w) => w.what === 'Multiboot module 0');
  t.equal(write?.guestPhysAddr, 0x204000);
});

t.test('errors: modules outside RAM, too many or too long for the boot information area, for a kernel that is not Multiboot', async (t) => {
  failsToPlan(t, kernel, [{ data: smallModule, cmdline: 'small' }, { data: new Uint8Array(MiB), cmdline: 'big.img quiet' }],
    'Multiboot module 1 ("big.img quiet") [0x103000, 0x203000) is outside guest RAM (2 MiB)', 2 * MiB);
  const many = Array.from({ length: 500 }, (_, i): MultibootModule => ({ data: new Uint8Array(1), cmdline: `m${i}` }));
  failsToPlan(t, kernel, many, /^500 Multiboot modules do not fit in the boot information area \[0x6000, 0x7c00\): their list \(16 bytes a module\) and strings \(2390 bytes with their NULs\) need 10390 bytes, and \d+ are left beside the multiboot_info, memory map and command line: give fewer modules, or shorter strings$/);
  failsToPlan(t, kernel, [{ data: smallModule, cmdline: 'x'.repeat(8000) }], /^1 Multiboot modules do not fit in the boot information area .* strings \(8001 bytes with their NULs\) need 8017 bytes/);
  failsToPlan(t, kernel, [{ data: smallModule, cmdline: 'a\0b' }], 'the string of Multiboot module 0 ("a\\u0000b") contains a NUL character');
  failsToPlan(t, guestImage('bzimage'), [{ data: smallModule }], 'modules are for a Multiboot kernel, and this image is not one: it is a Linux bzImage, which takes one initrd');
  failsToPlan(t, elfGuest('pvh'), [{ data: smallModule }], 'modules are for a Multiboot kernel, and this image is not one: it is an ELF file without a Multiboot header in its first 8 KiB');
  failsToPlan(t, guestImage('hello'), [{ data: smallModule }], 'modules are for a Multiboot kernel, and this image is not one: it is a file without a Multiboot header in its first 8 KiB');
  t.throws(() => planBoot(kernel, { memoryBytes: 64 * MiB, vcpus: 1, initrd: smallModule }),
    { name: 'BootImageError', message: 'an initrd is for a Linux bzImage kernel, and this image is a Multiboot kernel: give it its files as modules' });
  throwsArgError(t, () => planBoot(kernel, { memoryBytes: 64 * MiB, vcpus: 1, modules: [{ data: 'file.bin' as unknown as Uint8Array }] }),
    'ERR_INVALID_ARG_TYPE', 'modules[0].data must be a Uint8Array');
});

t.test('Machine.create: a module file that cannot be read is named, with the file system\'s code', async (t) => {
  await t.rejects(Machine.create({ image: kernel, modules: [{ data: smallModule }, { data: '/nonexistent/mod.bin' }], pool }),
    { code: 'ENOENT', message: 'cannot read the Multiboot module /nonexistent/mod.bin: ENOENT' });
  await t.rejects(Machine.create({ image: kernel, modules: [{ data: 42 as unknown as string }], pool }),
    { code: 'ERR_INVALID_ARG_TYPE', message: 'modules[0].data must be a Uint8Array or a file path' });
});

t.test("--initrd's module list, as QEMU reads it", async (t) => {
  t.same(parseModulesOption('a.bin'), [{ data: 'a.bin', cmdline: 'a.bin' }]);
  t.same(parseModulesOption('dir/a.bin x=1 y,b.bin'), [{ data: 'dir/a.bin', cmdline: 'dir/a.bin x=1 y' }, { data: 'b.bin', cmdline: 'b.bin' }]);
  t.same(parseModulesOption('we,,ird.bin a,,b'), [{ data: 'we,ird.bin', cmdline: 'we,ird.bin a,b' }], ',, is a comma');
  t.same(parseModulesOption('a,,,b'), [{ data: 'a,', cmdline: 'a,' }, { data: 'b', cmdline: 'b' }], ',,, is a comma, then the next module');
  throwsArgError(t, () => parseModulesOption('a.bin,'), 'ERR_INVALID_ARG_VALUE', "--initrd 'a.bin,': module 1 names no file (give 'FILE[ ARGS][,FILE2[ ARGS2] ...]')");
  throwsArgError(t, () => parseModulesOption(' a.bin'), 'ERR_INVALID_ARG_VALUE', "--initrd ' a.bin': module 0 names no file (give 'FILE[ ARGS][,FILE2[ ARGS2] ...]')");
});

t.test('the kernel reads its modules: through the library', { skip: noKvm }, async (t) => {
  const dir = t.testdir();
  const weird = path.join(dir, 'we,ird.bin');
  writeFileSync(weird, smallModule);
  const booted = await boot({
    image: kernel, memoryBytes: 16 * MiB, pool,
    modules: [{ data: bigModule, cmdline: 'big.bin arg1 key=value' }, { data: weird }, { data: new Uint8Array(0), cmdline: 'empty' }],
  });
  const pages = booted.machine.vmmDirtyBitmap.takeRanges();
  const marked = (page: number) => pages.some((r) => page >= r.firstPage && page < r.firstPage + r.pageCount);
  t.ok([0x102, 0x103, 0x104].every(marked), "the modules' pages are marked dirty, as every loader write is");
  booted.machine.start();
  const exit = await booted.machine.wait();
  await new Promise((resolve) => setImmediate(resolve));
  t.equal(booted.output(), 'modules 3\n' +
    moduleLine(0, 0x102000, 'big.bin arg1 key=value', bigModule) +
    moduleLine(1, 0x104000, weird, smallModule) +
    moduleLine(2, 0x105000, 'empty', new Uint8Array(0)));
  t.same(exit, { reason: 'debug-exit', vcpu: 0, code: digest([
    { string: 'big.bin arg1 key=value', data: bigModule }, { string: weird, data: smallModule }, { string: 'empty', data: new Uint8Array(0) },
  ]) });
});

t.test('the kernel reads its modules: node-kvm run --kernel K --initrd "FILE ARGS,FI,,LE2"', { skip: noKvm }, async (t) => {
  const dir = t.testdir();
  mkdirSync(path.join(dir, 'mods'));
  const big = path.join(dir, 'mods', 'big.bin');
  const weird = path.join(dir, 'mods', 'we,ird.bin');
  writeFileSync(big, bigModule);
  writeFileSync(weird, smallModule);
  // "quiet": the guest prints nothing (its console is this process's stdout) and says what it
  // read through its exit status alone.
  const initrd = `${big} arg1 key=va,,lue,${weird.replace(',', ',,')}`;
  const result = await nodeKvmInProcess(['run', '--kernel', kernelPath, '--initrd', initrd, '--append', 'quiet', '--memory', '16M']);
  const code = digest([{ string: `${big} arg1 key=va,lue`, data: bigModule }, { string: weird, data: smallModule }]);
  t.equal(result.stderr, '');
  t.equal(result.status, ((code << 1) | 1) & 0xff, 'the status of the digest of both strings and both modules');

  const missing = await nodeKvmInProcess(['run', '--kernel', kernelPath, '--initrd', `${big},${dir}/missing.bin arg`], { builtFirstThread: true });
  t.equal(missing.status, 1);
  t.equal(missing.stderr, `node-kvm: cannot read the Multiboot module ${dir}/missing.bin: ENOENT\n`, 'the file name, without its arguments');
  const tooBig = await nodeKvmInProcess(['run', '--kernel', kernelPath, '--initrd', big, '--memory', '1M'], { builtFirstThread: true });
  t.equal(tooBig.status, 1);
  t.match(tooBig.stderr, /^node-kvm: .*outside guest RAM \(1 MiB\)\n$/);
});

t.test('--initrd for a bzImage is one file, as before; for another kernel, an error', async (t) => {
  const bz = await nodeKvmInProcess(['run', '--kernel', path.join(repoRoot, 'guests', 'build', 'bzimage.bin'), '--initrd', '/nonexistent/a,b'], { builtFirstThread: true });
  t.equal(bz.stderr, 'node-kvm: cannot read the initrd /nonexistent/a,b: ENOENT\n');
  const dir = t.testdir();
  writeFileSync(path.join(dir, 'initrd.img'), 'data');
  const elf = await nodeKvmInProcess(['run', '--kernel', path.join(repoRoot, 'guests', 'build', 'pvh.elf'), '--initrd', path.join(dir, 'initrd.img')], { builtFirstThread: true });
  t.equal(elf.stderr, 'node-kvm: an initrd is for a Linux bzImage kernel, and this image is not one: it is an ELF file\n');
});
