// The Linux boot protocol: the setup header parsed from crafted images, the zero page and entry
// state planned for the bzimage guest (guests/bzimage.S), and that guest booted for real through
// the raw binding, Machine.create and `node-kvm run --kernel --initrd --append` (whose bad input
// is checked in this process).
import { writeFileSync } from 'node:fs';
import path from 'node:path';
import t, { type Test } from 'tap';
import {
  BootImageError, buildInitramfs, isBzImage, LINUX_CMDLINE_ADDR, memoryMap, parseSetupHeader, planBoot, planBzImage, ZERO_PAGE_ADDR,
  type BootPlan, type PlanOptions,
} from '../../lib/boot/index.js';
import { bootGuest, runGuest } from '../helpers/boot-runner.js';
import { nodeKvmInProcess, startNodeKvm } from '../helpers/cli.js';
import { guestImage, noKvm, repoRoot } from '../helpers/kvm.js';
import { runToExit } from '../helpers/machine.js';
import { sharedPool } from '../helpers/pool.js';

const MiB = 1 << 20;
const pool = noKvm ? undefined : sharedPool();
const options: PlanOptions = { memoryBytes: 64 * MiB, vcpus: 1 };
const guest = () => guestImage('bzimage');
const guestFile = path.join(repoRoot, 'guests', 'build', 'bzimage.bin');
const hex16 = (value: bigint | number) => value.toString(16).padStart(16, '0');

/** A copy of `image` with little-endian fields overwritten: [offset, bytes, value]. */
function patched(image: Uint8Array, ...fields: [number, 1 | 2 | 4 | 8, number | bigint][]): Uint8Array {
  const copy = new Uint8Array(image);
  const view = new DataView(copy.buffer);
  for (const [offset, bytes, value] of fields) {
    if (bytes === 1) view.setUint8(offset, Number(value));
    else if (bytes === 2) view.setUint16(offset, Number(value), true);
    else if (bytes === 4) view.setUint32(offset, Number(value), true);
    else view.setBigUint64(offset, BigInt(value), true);
  }
  return copy;
}

/**
 * A bzImage from nothing: boot sector with a protocol `version` setup header, `setupSects` setup
 * sectors, then `kernelBytes` of protected-mode kernel (syssize set to match).
 */
function crafted({ version = 0x020f, setupSects = 1, kernelBytes = 0x1000, loadflags = 1, xloadflags = 1, cmdlineSize = 2047, initSize = 0x100000 } = {}): Uint8Array {
  const realSects = setupSects === 0 ? 4 : setupSects;
  const image = new Uint8Array((realSects + 1) * 512 + kernelBytes);
  return patched(image,
    [0x1f1, 1, setupSects], [0x1f4, 4, Math.ceil(kernelBytes / 16)], [0x1fe, 2, 0xaa55], [0x200, 1, 0xeb], [0x201, 1, 0x6a],
    [0x202, 4, 0x53726448], [0x206, 2, version], [0x211, 1, loadflags], [0x214, 4, 0x100000], [0x22c, 4, 0x7fffffff],
    [0x230, 4, 0x200000], [0x234, 1, 1], [0x236, 2, xloadflags], [0x238, 4, cmdlineSize], [0x258, 8, 0x1000000n], [0x260, 4, initSize]);
}

/** A boot sector (0xAA55 at 0x1fe) and a sector after it, without a setup header. */
const bootSector = () => patched(new Uint8Array(1024), [0x1fe, 2, 0xaa55]);

const fails = (t: Test, image: Uint8Array, message: string, opts: Partial<PlanOptions> = {}) =>
  t.throws(() => planBoot(image, { ...options, ...opts }), new BootImageError(message), message);

/** The expected initrd address: the top of RAM below initrd_addr_max + 1, page-aligned. */
const initrdAddr = (memoryBytes: number, bytes: number, initrdAddrMax = 0x7fffffff) =>
  Math.floor((Math.min(initrdAddrMax + 1, memoryBytes) - bytes) / 4096) * 4096;

/** What the guest prints at its 64-bit entry. */
function expected64(memoryBytes: number, cmdline: string, initrd?: { addr: number; data: Uint8Array }): string {
  const e820 = memoryMap(memoryBytes).map((e) => `e820 0x${hex16(e.addr)} 0x${hex16(e.size)} ${e.type}\n`).join('');
  let text = `bzimage entry 64\n${e820}cmdline "${cmdline}"\n`;
  if (!initrd) return `${text}initrd none\nbzimage OK\n`;
  const { addr, data } = initrd;
  const sum = data.reduce((total, byte) => (total + byte) >>> 0, 0);
  text += `initrd 0x${hex16(addr)} ${data.length}\n`;
  text += `initrd head "${Buffer.from(data.subarray(0, 6)).toString('latin1')}"\n`;
  text += `initrd last ${data[data.length - 1]}\ninitrd sum ${sum}\n`;
  return `${text}bzimage OK\n`;
}

/** A small initramfs: what a Linux guest would get. */
const initramfs = () => buildInitramfs([
  { type: 'directory', path: 'dev' },
  { type: 'device', path: 'dev/console', device: 'char', major: 5, minor: 1 },
  { type: 'file', path: 'init', mode: 0o755, data: '#!/bin/sh\necho hello from the initramfs\n' },
]);

const zeroPageOf = (plan: BootPlan) => {
  const write = plan.writes.find((w) => w.what === 'zero page');
  if (!write || !('data' in write)) throw new Error('no zero page in the plan');
  return { bytes: write.data, view: new DataView(write.data.buffer, write.data.byteOffset, write.data.byteLength) };
};

t.test('the setup header of the bzimage guest', async (t) => {
  const image = guest();
  t.ok(isBzImage(image));
  t.same(parseSetupHeader(image), {
    setupSects: 1, version: 0x020f, loadflags: 1, xloadflags: 1, code32Start: 0x100000, cmdlineSize: 255, initrdAddrMax: 0x7fffffff,
    kernelAlignment: 0x200000, relocatable: true, prefAddress: 0x1000000n, initSize: 0x10000,
    kernelBytes: new DataView(image.buffer, image.byteOffset).getUint32(0x1f4, true) * 16, kernelOffset: 0x400, headerEnd: 0x26c,
  });
  t.notOk(isBzImage(bootSector()), 'a boot sector is not a bzImage');
  t.notOk(isBzImage(guestImage('hello')), 'nor is a short flat binary');
});

t.test('setup header fields: setup_sects 0 means 4, and fields newer than the protocol are not read', async (t) => {
  const four = parseSetupHeader(crafted({ setupSects: 0 }));
  t.equal(four.setupSects, 4);
  t.equal(four.kernelOffset, 5 * 512);
  const v206 = parseSetupHeader(crafted({ version: 0x0206 }));
  t.equal(v206.xloadflags, 0, 'no xloadflags before 2.12');
  t.equal(v206.initSize, 0, 'no init_size before 2.10');
  t.equal(v206.prefAddress, 0n, 'no pref_address before 2.10');
  t.equal(v206.initrdAddrMax, 0x7fffffff, 'initrd_addr_max from 2.03 on');
});

t.test('bad headers: one clear line each', async (t) => {
  const image = guest();
  fails(t, image.subarray(0, 0x220), 'truncated bzImage: the file has 544 bytes, its setup header needs 612');
  fails(t, image.subarray(0, 0x400),
    'truncated bzImage: the file has 1024 bytes, and its real-mode part (setup_sects 1) takes 1024 of them, leaving no protected-mode kernel');
  const cut = crafted({ kernelBytes: 0x1000 }).subarray(0, 0x400 + 0x800);
  fails(t, cut, 'truncated bzImage: syssize says the protected-mode kernel at offset 0x400 has 4096 bytes, the file holds 2048');
  fails(t, crafted({ kernelBytes: 0x100 }), "the 64-bit entry (offset 0x200) is beyond the protected-mode kernel's 256 bytes");
  fails(t, crafted({ version: 0x0204 }), 'the kernel speaks boot protocol 2.04; this loader needs 2.06 or later (Linux 2.6.22 and later)');
  fails(t, crafted({ loadflags: 0 }),
    'the kernel is not loaded high (loadflags bit 0, LOADED_HIGH, is clear): a zImage, which this loader does not boot; build a bzImage');
  fails(t, image, 'the command line is 256 bytes; this kernel takes at most 255 (its cmdline_size)', { cmdline: 'x'.repeat(256) });
  fails(t, image, 'the kernel needs guest RAM up to 0x1010000 (loaded at 0x100000, init_size 0x10000, pref_address 0x1000000), and guest RAM is 16 MiB',
    { memoryBytes: 16 * MiB });
  fails(t, image, "the initrd (50331648 bytes) does not fit between the kernel's end 0x1010000 and the end of guest RAM (64 MiB): 50266112 bytes are free there",
    { initrd: new Uint8Array(48 * MiB) });
  fails(t, patched(image, [0x22c, 4, 0x17fffff]),
    "the initrd (8388608 bytes) does not fit between the kernel's end 0x1010000 and initrd_addr_max + 1 (0x1800000): 8323072 bytes are free there",
    { initrd: new Uint8Array(8 * MiB) });
  fails(t, image, 'the initrd is empty', { initrd: new Uint8Array(0) });
});

t.test('an initrd needs a bzImage: other images say why they are not one', async (t) => {
  const initrd = initramfs();
  fails(t, patched(guest(), [0x202, 4, 0]), 'an initrd is for a Linux bzImage kernel, and this image is not one: no "HdrS" magic at offset 0x202', { initrd });
  fails(t, bootSector(), 'an initrd is for a Linux bzImage kernel, and this image is not one: no "HdrS" magic at offset 0x202', { initrd });
  fails(t, patched(guest(), [0x1fe, 2, 0]), 'an initrd is for a Linux bzImage kernel, and this image is not one: no boot_flag 0xaa55 at offset 0x1fe', { initrd });
  fails(t, guest().subarray(0, 0x100),
    'an initrd is for a Linux bzImage kernel, and this image is not one: the file has 256 bytes, too few for a setup header (its "HdrS" magic is at offset 0x202)',
    { initrd });
  t.throws(() => parseSetupHeader(bootSector()), new BootImageError('not a Linux bzImage: no "HdrS" magic at offset 0x202'));
});

t.test('the plan: zero page, command line, initrd and the 64-bit entry state', async (t) => {
  const image = guest();
  const initrd = initramfs();
  const memoryBytes = 64 * MiB;
  const plan = planBoot(image, { ...options, cmdline: 'console=ttyS0 quiet', initrd });
  t.equal(plan.format, 'bzimage');
  t.equal(plan.mode, 'long');
  t.equal(plan.entry, 0x100200n, '64-bit entry: load address + 0x200');
  t.equal(plan.bsp.regs.rsi, BigInt(ZERO_PAGE_ADDR));
  t.equal(plan.bsp.sregs.cs?.selector, 0x10, '__BOOT_CS');
  t.equal(plan.bsp.sregs.cs?.l, 1, 'a 64-bit code segment');
  for (const name of ['ds', 'es', 'ss'] as const) t.equal(plan.bsp.sregs[name]?.selector, 0x18, `${name} is __BOOT_DS`);

  const { bytes, view } = zeroPageOf(plan);
  t.equal(bytes.length, 4096);
  t.equal(view.getUint32(0x202, true), 0x53726448, 'the setup header is copied in');
  t.same([...bytes.subarray(0x1f1, 0x210)], [...image.subarray(0x1f1, 0x210)].map((b, i) => (i === 0x1fa - 0x1f1 || i === 0x1fb - 0x1f1 ? 0xff : b)),
    'header bytes up to type_of_loader as in the image, vid_mode 0xffff');
  t.equal(bytes[0x1ef], 0, 'the sentinel is clear');
  t.equal(bytes[0x210], 0xff, 'type_of_loader');
  t.equal(bytes[0x211], 0x01, 'loadflags: LOADED_HIGH, no CAN_USE_HEAP');
  t.equal(view.getUint32(0x214, true), 0x100000, 'code32_start');
  t.equal(view.getUint32(0x228, true), LINUX_CMDLINE_ADDR, 'cmd_line_ptr');
  t.equal(view.getUint32(0xc8, true), 0, 'ext_cmd_line_ptr');
  const addr = initrdAddr(memoryBytes, initrd.length);
  t.equal(view.getUint32(0x218, true), addr, 'ramdisk_image: top of RAM, page-aligned');
  t.equal(view.getUint32(0x21c, true), initrd.length, 'ramdisk_size');
  t.equal(view.getUint32(0xc0, true) + view.getUint32(0xc4, true), 0, 'ext_ramdisk_image, ext_ramdisk_size');
  const map = memoryMap(memoryBytes);
  t.equal(bytes[0x1e8], map.length, 'e820_entries');
  map.forEach((entry, i) => {
    const at = 0x2d0 + 20 * i;
    t.same([view.getBigUint64(at, true), view.getBigUint64(at + 8, true), view.getUint32(at + 16, true)], [entry.addr, entry.size, entry.type], `e820 entry ${i}`);
  });

  const command = plan.writes.find((w) => w.what === 'command line');
  t.same(command, { guestPhysAddr: LINUX_CMDLINE_ADDR, data: new Uint8Array([...Buffer.from('console=ttyS0 quiet'), 0]), what: 'command line' });
  const ramdisk = plan.writes.find((w) => w.what === 'initrd');
  t.same(ramdisk, { guestPhysAddr: addr, data: initrd, what: 'initrd' });
  const kernel = plan.writes.find((w) => w.what === 'kernel');
  t.same(kernel, { guestPhysAddr: 0x100000, data: image.subarray(0x400), what: 'kernel' });
  const gdt = plan.writes.find((w) => w.what === 'GDT');
  if (!gdt || !('data' in gdt)) throw new Error('no GDT');
  const descriptor = (selector: number) => new DataView(gdt.data.buffer, gdt.data.byteOffset).getBigUint64(selector, true);
  t.equal((descriptor(0x10) >> 53n) & 1n, 1n, 'GDT 0x10: a long-mode code segment (L)');
  t.equal((descriptor(0x10) >> 43n) & 1n, 1n, 'GDT 0x10: code');
  t.equal((descriptor(0x18) >> 43n) & 1n, 0n, 'GDT 0x18: data');
  t.equal(descriptor(0x18) & 0xffffn, 0xffffn, 'GDT 0x18: flat');

  const empty = zeroPageOf(planBoot(image, options));
  t.equal(empty.view.getUint32(0x228, true), LINUX_CMDLINE_ADDR, 'no command line given: cmd_line_ptr still points at one (empty)');
  t.equal(empty.view.getUint32(0x218, true), 0, 'no initrd: ramdisk_image 0');
  t.equal(empty.view.getUint32(0x21c, true), 0, 'no initrd: ramdisk_size 0');
});

t.test('the 32-bit entry: for a kernel without XLF_KERNEL_64, or older than protocol 2.12', async (t) => {
  for (const image of [patched(guest(), [0x236, 2, 0]), patched(guest(), [0x206, 2, 0x020b])]) {
    const plan = planBoot(image, options);
    t.equal(plan.mode, 'protected');
    t.equal(plan.entry, 0x100000n);
    t.same(plan.bsp.regs, { rsi: BigInt(ZERO_PAGE_ADDR), rbx: 0n, rbp: 0n, rdi: 0n, rip: 0x100000n, rflags: 2n });
    t.equal(plan.bsp.sregs.cs?.selector, 0x10);
    t.equal(plan.bsp.sregs.cs?.db, 1, 'a 32-bit code segment');
    t.equal(plan.bsp.sregs.ss?.selector, 0x18);
    t.notOk(plan.writes.some((w) => w.what === 'page tables'), 'paging off: no page tables');
  }
});

t.test('the initrd goes below initrd_addr_max, and the layout says where everything is', async (t) => {
  const initrd = new Uint8Array(5000).fill(7);
  const image = patched(guest(), [0x22c, 4, 0x2ffffff]);
  const { layout } = planBzImage(image, { memoryBytes: 256 * MiB, cmdline: null, initrd });
  t.same(layout.initrd, { addr: initrdAddr(256 * MiB, 5000, 0x2ffffff), bytes: 5000 });
  t.equal(layout.initrd!.addr, 0x2ffe000);
  t.equal(layout.kernelEnd, 0x1010000, 'the kernel runs from pref_address for init_size');
  t.equal(layout.entry, 64);
});

t.test('booted on the raw binding: the 64-bit entry sees the memory map and command line', { skip: noKvm }, async (t) => {
  const memoryBytes = 64 * MiB;
  const booted = bootGuest(guest(), { memoryBytes, cmdline: 'console=ttyS0 root=/dev/ram0' });
  t.teardown(() => booted.close());
  t.same(runGuest(booted.vcpu), { output: expected64(memoryBytes, 'console=ttyS0 root=/dev/ram0'), end: { reason: 'debug-exit', code: 0x10 } });
});

t.test('booted on the raw binding: the 32-bit entry', { skip: noKvm }, async (t) => {
  const booted = bootGuest(patched(guest(), [0x236, 2, 0]), { cmdline: 'thirty two' });
  t.teardown(() => booted.close());
  t.same(runGuest(booted.vcpu), { output: 'bzimage entry 32\ncmdline "thirty two"\nbzimage OK\n', end: { reason: 'debug-exit', code: 0x10 } });
});

t.test('Machine.create with an initrd, as bytes and as a file', { skip: noKvm }, async (t) => {
  const memoryBytes = 128 * MiB;
  const initrd = initramfs();
  const fromBytes = await runToExit({ image: guestFile, memoryBytes, cmdline: 'a b c', initrd, pool });
  t.same(fromBytes.exit, { reason: 'debug-exit', code: 0x10, vcpu: 0 });
  t.equal(fromBytes.output, expected64(memoryBytes, 'a b c', { addr: initrdAddr(memoryBytes, initrd.length), data: initrd }));

  const file = path.join(t.testdir(), 'initrd.cpio');
  const odd = new Uint8Array(4097).map((_, i) => (i * 31) & 0xff);
  writeFileSync(file, odd);
  const fromFile = await runToExit({ image: guestFile, memoryBytes, initrd: file, pool });
  t.same(fromFile.exit, { reason: 'debug-exit', code: 0x10, vcpu: 0 });
  t.equal(fromFile.output, expected64(memoryBytes, '', { addr: initrdAddr(memoryBytes, odd.length), data: odd }));

  const none = await runToExit({ image: guestFile, memoryBytes: 32 * MiB, pool });
  t.equal(none.output, expected64(32 * MiB, ''));

  await t.rejects(runToExit({ image: guestFile, initrd: '/nonexistent/initrd.img', pool }), new Error('cannot read the initrd /nonexistent/initrd.img: ENOENT'));
});

// The guest's console is the command's stdout: a child process.
const nodeKvm = (...args: string[]) => startNodeKvm(args).result;

t.test('node-kvm run --kernel --initrd --append, as QEMU names them', { skip: noKvm }, async (t) => {
  const initrd = initramfs();
  const file = path.join(t.testdir(), 'initrd.cpio');
  writeFileSync(file, initrd);
  // Side by side: each takes seconds to load.
  const [result, positional] = await Promise.all([
    nodeKvm('run', '--kernel', guestFile, '--initrd', file, '--append', 'console=ttyS0 init=/init', '--memory', '96M'),
    nodeKvm('run', guestFile, '--append', 'as IMAGE'),
  ]);
  t.equal(result.stderr, '');
  t.equal(result.stdout, expected64(96 * MiB, 'console=ttyS0 init=/init', { addr: initrdAddr(96 * MiB, initrd.length), data: initrd }));
  t.equal(result.status, (0x10 << 1) | 1);

  t.equal(positional.stdout, expected64(64 * MiB, 'as IMAGE'));
});

t.test('node-kvm run: bad kernels and flags are one line and status 1', async (t) => {
  const dir = t.testdir();
  const write = (name: string, bytes: Uint8Array) => {
    const file = path.join(dir, name);
    writeFileSync(file, bytes);
    return file;
  };
  const initrd = write('initrd.cpio', initramfs());
  const cases: [string[], string][] = [
    [['--kernel', write('cut', guest().subarray(0, 0x300))],
      'node-kvm: truncated bzImage: the file has 768 bytes, and its real-mode part (setup_sects 1) takes 1024 of them, leaving no protected-mode kernel\n'],
    [['--kernel', write('nohdrs', patched(guest(), [0x202, 4, 0])), '--initrd', initrd],
      'node-kvm: an initrd is for a Linux bzImage kernel, and this image is not one: no "HdrS" magic at offset 0x202\n'],
    [['--kernel', write('old', patched(guest(), [0x206, 2, 0x0205]))],
      'node-kvm: the kernel speaks boot protocol 2.05; this loader needs 2.06 or later (Linux 2.6.22 and later)\n'],
    [['--kernel', guestFile, '--append', 'y'.repeat(300)], 'node-kvm: the command line is 300 bytes; this kernel takes at most 255 (its cmdline_size)\n'],
    [['--kernel', guestFile, '--initrd', write('big', new Uint8Array(60 * MiB)), '--memory', '64M'],
      "node-kvm: the initrd (62914560 bytes) does not fit between the kernel's end 0x1010000 and the end of guest RAM (64 MiB): 50266112 bytes are free there\n"],
    [['--kernel', guestFile, guestFile], 'node-kvm: give the kernel as IMAGE or as --kernel FILE, not both\n'],
    [['--kernel', guestFile, '--append', 'a', '--cmdline', 'b'], 'node-kvm: --append and --cmdline both give the command line: use one\n'],
    [['--restore', '/nonexistent', '--initrd', initrd], 'node-kvm: --initrd applies to booting an IMAGE only\n'],
  ];
  // The main checks happen before a VM exists: these run with or without KVM. In this process, the
  // thread run starts is one from the built bundle: it only starts and quits.
  for (const [args, stderr] of cases) {
    const result = await nodeKvmInProcess(['run', ...args], { builtFirstThread: true });
    t.equal(result.stderr, stderr, args.join(' '));
    t.equal(result.status, 1);
    t.equal(result.stdout, '');
  }
});

t.test('run --help names the QEMU-style flags', async (t) => {
  const result = await nodeKvmInProcess(['run', '--help']);
  t.match(result.stdout, /--kernel FILE/);
  t.match(result.stdout, /--initrd FILE/);
  t.match(result.stdout, /--append TEXT/);
});
