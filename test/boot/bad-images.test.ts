// Images that cannot boot: planBoot() throws a BootImageError (code ERR_BOOT_IMAGE) that says what
// is wrong and where, before any VM exists. Most images are built here byte by byte; some are
// damaged copies of the built guests.
import t, { type Test } from 'tap';
import { BootImageError, planBoot, type PlanOptions } from '../../lib/boot/index.js';
import { ErrorCode, NodeKvmError } from '../../lib/kvm/index.js';
import { elfGuest } from '../helpers/boot-runner.js';
import { throwsArgError } from '../helpers/kvm.js';

const MiB = 1 << 20;
const options: PlanOptions = { memoryBytes: 64 * MiB, vcpus: 1 };

interface Phdr { type?: number; offset?: number; vaddr?: number; paddr: number; filesz?: number; memsz: number; flags?: number; align?: number }

/** A little-endian x86 ELF executable: header, program headers right after it, zero padding to `size`. */
function elf(bits: 32 | 64, { entry, phdrs, size = 0x200, type = 2 }: { entry: number; phdrs: Phdr[]; size?: number; type?: number }): Uint8Array {
  const headerBytes = bits === 64 ? 64 : 52;
  const phentsize = bits === 64 ? 56 : 32;
  const image = Buffer.alloc(Math.max(size, headerBytes + phdrs.length * phentsize));
  image.set([0x7f, 0x45, 0x4c, 0x46, bits === 64 ? 2 : 1, 1, 1]);
  image.writeUInt16LE(type, 16);
  image.writeUInt16LE(bits === 64 ? 62 : 3, 18);
  image.writeUInt32LE(1, 20);
  if (bits === 64) {
    image.writeBigUInt64LE(BigInt(entry), 24);
    image.writeBigUInt64LE(BigInt(headerBytes), 32);
    image.writeUInt16LE(headerBytes, 52);
    image.writeUInt16LE(phentsize, 54);
    image.writeUInt16LE(phdrs.length, 56);
  } else {
    image.writeUInt32LE(entry, 24);
    image.writeUInt32LE(headerBytes, 28);
    image.writeUInt16LE(headerBytes, 40);
    image.writeUInt16LE(phentsize, 42);
    image.writeUInt16LE(phdrs.length, 44);
  }
  phdrs.forEach((p, i) => {
    const at = headerBytes + i * phentsize;
    const { type: pType = 1, offset = 0, vaddr = p.paddr, paddr, filesz = 0, memsz, flags = 5, align = 4 } = p;
    image.writeUInt32LE(pType, at);
    if (bits === 64) {
      image.writeUInt32LE(flags, at + 4);
      image.writeBigUInt64LE(BigInt(offset), at + 8);
      image.writeBigUInt64LE(BigInt(vaddr), at + 16);
      image.writeBigUInt64LE(BigInt(paddr), at + 24);
      image.writeBigUInt64LE(BigInt(filesz), at + 32);
      image.writeBigUInt64LE(BigInt(memsz), at + 40);
      image.writeBigUInt64LE(BigInt(align), at + 48);
    } else {
      image.writeUInt32LE(offset, at + 4);
      image.writeUInt32LE(vaddr, at + 8);
      image.writeUInt32LE(paddr, at + 12);
      image.writeUInt32LE(filesz, at + 16);
      image.writeUInt32LE(memsz, at + 20);
      image.writeUInt32LE(flags, at + 24);
      image.writeUInt32LE(align, at + 28);
    }
  });
  return new Uint8Array(image);
}

/** A Multiboot header: magic, flags, checksum (made valid unless given), then the address fields. */
function multibootHeader(flags: number, addresses: number[] = [], checksum?: number): Buffer {
  const header = Buffer.alloc(12 + addresses.length * 4);
  header.writeUInt32LE(0x1badb002, 0);
  header.writeUInt32LE(flags >>> 0, 4);
  header.writeUInt32LE(checksum ?? (-(0x1badb002 + flags) >>> 0), 8);
  addresses.forEach((value, i) => header.writeUInt32LE(value, 12 + i * 4));
  return header;
}

/** A PT_NOTE payload with one note. */
function note(name: string, type: number, desc: Buffer): Buffer {
  const pad = (b: Buffer) => Buffer.concat([b, Buffer.alloc((4 - (b.length % 4)) % 4)]);
  const head = Buffer.alloc(12);
  head.writeUInt32LE(name.length + 1, 0);
  head.writeUInt32LE(desc.length, 4);
  head.writeUInt32LE(type, 8);
  return Buffer.concat([head, pad(Buffer.from(`${name}\0`)), pad(desc)]);
}

const withBytes = (image: Uint8Array, at: number, bytes: ArrayLike<number>) => {
  const copy = new Uint8Array(image);
  copy.set(bytes, at);
  return copy;
};

/** Asserts that planning `image` throws a BootImageError (code ERR_BOOT_IMAGE) with exactly `message`. */
function fails(t: Test, image: Uint8Array, message: string, opts: Partial<PlanOptions> = {}): void {
  let error: unknown;
  try {
    planBoot(image, { ...options, ...opts });
  } catch (caught) {
    error = caught;
  }
  t.ok(error instanceof BootImageError, `${message}: a BootImageError`);
  t.match(error, { name: 'BootImageError', code: 'ERR_BOOT_IMAGE' }, `${message}: code ERR_BOOT_IMAGE`);
  t.equal((error as Error | undefined)?.message, message);
}

t.test('an empty file', async (t) => {
  fails(t, new Uint8Array(0), 'not a bootable image: the file is empty');
  const error = t.throws(() => planBoot(new Uint8Array(0), options), { name: 'BootImageError' });
  t.ok(error instanceof NodeKvmError, 'a BootImageError is a NodeKvmError');
  t.equal((error as NodeKvmError).code, ErrorCode.BootImage, 'whose code is ErrorCode.BootImage');
  t.equal(ErrorCode.BootImage, 'ERR_BOOT_IMAGE');
});

t.test('truncated ELF headers and program headers', async (t) => {
  fails(t, elfGuest('protected').subarray(0, 40), 'truncated ELF header: the file has 40 bytes, an ELF32 header needs 52');
  fails(t, elfGuest('long').subarray(0, 60), 'truncated ELF header: the file has 60 bytes, an ELF64 header needs 64');
  fails(t, elfGuest('protected').subarray(0, 60), 'truncated ELF program header 0 at offset 0x34: the file ends at 0x3c');
  const twoSegments = elf(64, { entry: 0x100000, phdrs: [{ paddr: 0x100000, memsz: 0x1000 }, { paddr: 0x200000, memsz: 0x1000 }] });
  fails(t, twoSegments.subarray(0, 64 + 56 + 10), 'truncated ELF program header 1 at offset 0x78: the file ends at 0x82');
});

t.test('segment data beyond the end of the file', async (t) => {
  fails(t, elf(32, { entry: 0x100000, size: 0x180, phdrs: [{ offset: 0x100, paddr: 0x100000, filesz: 0x200, memsz: 0x200 }] }),
    'ELF program header 0: its file data [0x100, 0x300) is beyond the end of the file (0x180 bytes)');
});

t.test('segments that do not fit guest RAM', async (t) => {
  fails(t, elf(32, { entry: 0x3fff000, phdrs: [{ paddr: 0x3fff000, memsz: 0x2000 }] }), 'segment 0x3fff000+0x2000 is outside guest RAM (64 MiB)');
  fails(t, elf(64, { entry: 0x200000, phdrs: [{ paddr: 0x200000, memsz: 0x1000 }] }), 'segment 0x200000+0x1000 is outside guest RAM (2 MiB)', { memoryBytes: 2 * MiB });
  fails(t, elfGuest('protected'), `segment 0x100000+0x${(new DataView(elfGuest('protected').buffer).getUint32(52 + 20, true)).toString(16)} is outside guest RAM (1 MiB)`, { memoryBytes: MiB });
});

t.test('malformed ELF headers', async (t) => {
  const image = elfGuest('protected');
  fails(t, withBytes(image, 4, [3]), 'not a bootable image: ELF class 3 (expected 1 for ELF32 or 2 for ELF64)');
  fails(t, withBytes(image, 5, [2]), 'not a bootable image: big-endian ELF (EI_DATA 2) is not for x86');
  fails(t, withBytes(image, 16, [1, 0]), 'not a bootable image: ELF type 1 (relocatable object) is not an executable');
  fails(t, withBytes(image, 18, [62, 0]), 'not a bootable image: ELF32 machine 62 (expected 3, i386)');
  fails(t, withBytes(elfGuest('long'), 18, [183, 0]), 'not a bootable image: ELF64 machine 183 (expected 62, x86-64)');
  fails(t, withBytes(image, 44, [0, 0]), 'not a bootable image: the ELF file has no program headers');
  fails(t, withBytes(image, 44, [0xff, 0xff]), 'not a bootable image: extended ELF program header numbering (PN_XNUM) is not supported');
  fails(t, withBytes(image, 42, [40, 0]), 'bad ELF header: program header size 40 (expected 32)');
});

t.test('ELF segments and entry points that make no sense', async (t) => {
  fails(t, elf(32, { entry: 0x100000, phdrs: [{ offset: 0x100, paddr: 0x100000, filesz: 0x20, memsz: 0x10 }] }),
    'ELF segment 0: file size 0x20 is larger than its memory size 0x10');
  fails(t, elf(32, { entry: 0x100000, phdrs: [{ type: 6, paddr: 0x100000, memsz: 0x10 }, { paddr: 0x100000, memsz: 0 }] }),
    'not a bootable image: the ELF file has no loadable (PT_LOAD) segment');
  fails(t, elf(32, { entry: 0x200000, phdrs: [{ paddr: 0x100000, memsz: 0x1000 }] }), 'the ELF entry point 0x200000 is not inside any loaded segment');
  fails(t, elf(32, { entry: 0x100000, phdrs: [{ paddr: 0x100000, memsz: 0x2000 }, { paddr: 0x101000, memsz: 0x1000 }] }),
    'segment 1 [0x101000, 0x102000) overlaps segment 0 [0x100000, 0x102000)');
});

t.test('images that collide with the loader structures in low memory', async (t) => {
  const hint = ": link or load the image at 1 MiB or above, clear of the loader's structures in low memory";
  fails(t, elf(32, { entry: 0x400, phdrs: [{ paddr: 0x400, memsz: 0x1000 }] }), `the GDT [0x500, 0x530) overlaps segment 0 [0x400, 0x1400)${hint}`);
  fails(t, elf(64, { entry: 0xa000, phdrs: [{ paddr: 0xa000, memsz: 0x1000 }] }), `segment 0 [0xa000, 0xb000) overlaps the page tables [0x9000, 0xf000)${hint}`);
  fails(t, elf(32, { entry: 0x6000, phdrs: [{ paddr: 0x6000, memsz: 0x100 }] }), `the boot information [0x6000, 0x6098) overlaps segment 0 [0x6000, 0x6100)${hint}`);
  fails(t, new Uint8Array(0x2000), `the page tables [0x9000, 0xf000) overlaps the image [0x7c00, 0x9c00)${hint}`, { mode: 'long' });
  t.equal(planBoot(new Uint8Array(0x2000), { ...options, mode: 'long', loadAddr: 0x100000 }).mode, 'long', 'the same image loads at 1 MiB');
});

t.test('RAM too large for the long-mode page tables in low memory', async (t) => {
  fails(t, elfGuest('long'), 'long mode needs identity-map page tables for 200 GiB, which do not fit below 0x9fc00', { memoryBytes: 200 * 1024 * MiB });
  t.equal(planBoot(elfGuest('protected'), { ...options, memoryBytes: 200 * 1024 * MiB }).mode, 'protected', 'protected mode needs no page tables');
});

t.test('flat binaries that do not fit', async (t) => {
  fails(t, new Uint8Array(0x10000), 'the image [0x7c00, 0x17c00) is outside guest RAM (64 KiB)', { memoryBytes: 0x10000 });
  fails(t, new Uint8Array(16), 'a real-mode image must be loaded below 64 KiB, or 16-byte aligned below 1 MiB; the load address is 0x100000', { loadAddr: 0x100000 });
  fails(t, new Uint8Array(16), 'a real-mode image must be loaded below 64 KiB, or 16-byte aligned below 1 MiB; the load address is 0x10008', { loadAddr: 0x10008 });
});

t.test('random bytes are a flat binary; random bytes behind an ELF magic are a broken ELF', async (t) => {
  let seed = 12345;
  const random = new Uint8Array(4096).map(() => ((seed = (seed * 1103515245 + 12345) >>> 0) >>> 16) & 0xff);
  const plan = planBoot(random, options);
  t.equal(plan.format, 'flat');
  t.equal(plan.mode, 'real');
  t.equal(planBoot(random, { ...options, mode: 'protected', loadAddr: 0x200000 }).mode, 'protected', 'in the mode asked for');
  const elfMagic = withBytes(random, 0, [0x7f, 0x45, 0x4c, 0x46]);
  t.throws(() => planBoot(elfMagic, options), { name: 'BootImageError', message: /^not a bootable image: ELF class \d+/ });
});

t.test('Multiboot headers the loader must refuse', async (t) => {
  const multiboot = elfGuest('multiboot');
  const headerAt = Buffer.from(multiboot).indexOf(multibootHeader(2));
  t.ok(headerAt > 0 && headerAt < 8192, 'the guest carries its header in the first 8 KiB');
  fails(t, withBytes(multiboot, headerAt + 8, [0, 0, 0, 0]),
    `the Multiboot header at offset 0x${headerAt.toString(16)} has a bad checksum (magic + flags + checksum must be 0 mod 2^32)`);
  fails(t, withBytes(multiboot, headerAt, multibootHeader(0x6)),
    `the Multiboot header at offset 0x${headerAt.toString(16)} requires flags 0x4, which this loader cannot meet (bit 2 asks for a video mode; this machine has a serial console only)`);
  fails(t, withBytes(multiboot, headerAt, multibootHeader(0x802)),
    `the Multiboot header at offset 0x${headerAt.toString(16)} requires flags 0x800, which this loader cannot meet`);

  const elf64 = withBytes(elf(64, { entry: 0x100000, size: 0x1000, phdrs: [{ offset: 0, paddr: 0x100000, filesz: 0x1000, memsz: 0x1000 }] }), 0x200, multibootHeader(2));
  fails(t, elf64, 'Multiboot v1 loads ELF32 kernels, and this one is ELF64: link it as ELF32, or give its header address fields (flags bit 16)');
  fails(t, withBytes(new Uint8Array(0x400), 0x40, multibootHeader(2)),
    'the Multiboot header at offset 0x40 has no address fields (flags bit 16), so the kernel must be an ELF32 file, and this is not ELF');
  const pastSearch = withBytes(new Uint8Array(0x3000), 0x2000, multibootHeader(2));
  t.equal(planBoot(pastSearch, options).format, 'flat', 'a header beyond the first 8 KiB is not looked for');
});

t.test('a Multiboot kernel described by its header address fields (the a.out kludge)', async (t) => {
  // header_addr, load_addr, load_end_addr, bss_end_addr, entry_addr; the file is loaded from its start.
  const kernel = (addresses: number[], size = 0x100) => withBytes(new Uint8Array(size), 0x10, multibootHeader(0x10002, addresses));
  const plan = planBoot(kernel([0x200010, 0x200000, 0x200100, 0x201000, 0x200040]), { ...options, cmdline: 'x' });
  t.equal(plan.format, 'multiboot');
  t.equal(plan.mode, 'protected');
  t.equal(plan.entry, 0x200040n);
  t.equal(plan.bsp.regs.rax, 0x2badb002n);
  t.same(plan.writes.slice(0, 2).map((w) => [w.what, w.guestPhysAddr, 'data' in w ? w.data.length : w.zeroBytes]),
    [['image', 0x200000, 0x100], ['image (bss)', 0x200100, 0xf00]]);
  t.equal(planBoot(kernel([0x200010, 0x200000, 0, 0, 0x200040]), options).writes.length, 3, 'load_end_addr 0: the whole file; bss_end_addr 0: no bss');

  fails(t, kernel([0x200010, 0x200100, 0, 0, 0x200100]), 'Multiboot load_addr 0x200100 is above header_addr 0x200010');
  fails(t, kernel([0x200100, 0x200000, 0, 0, 0x200000]), 'Multiboot header_addr - load_addr (0x100) is larger than the header\'s file offset 0x10');
  fails(t, kernel([0x200010, 0x200000, 0x200200, 0, 0x200000]),
    'Multiboot load_end_addr 0x200200 asks for file data up to offset 0x200, beyond the end of the file (0x100 bytes)');
  fails(t, kernel([0x200010, 0x200000, 0x1000, 0, 0x200000]), 'Multiboot load_end_addr 0x1000 is below load_addr 0x200000');
  fails(t, kernel([0x200010, 0x200000, 0x200100, 0x200080, 0x200000]), 'Multiboot bss_end_addr 0x200080 is below the end of the loaded data 0x200100');
  fails(t, kernel([0x200010, 0x200000, 0, 0, 0x300000]), 'Multiboot entry_addr 0x300000 is outside the kernel [0x200000, 0x200100)');
  fails(t, kernel([0x4000010, 0x4000000, 0, 0x4001000, 0x4000000]), 'the Multiboot kernel [0x4000000, 0x4001000) is outside guest RAM (64 MiB)');
  fails(t, withBytes(new Uint8Array(0x1c), 0x8, multibootHeader(0x10002)), 'truncated Multiboot header at offset 0x8: its address fields are beyond the end of the file');
});

t.test('PVH notes the loader must refuse', async (t) => {
  const pvh = (desc: Buffer, entry = 0x100000, noteAlign = 4) => {
    const payload = note('Xen', 18, desc);
    const image = elf(64, {
      entry, size: 0x400,
      phdrs: [{ offset: 0x200, paddr: 0x100000, filesz: 0x100, memsz: 0x1000 }, { type: 4, offset: 0x300, paddr: 0, filesz: payload.length, memsz: 0, align: noteAlign }],
    });
    return withBytes(image, 0x300, payload);
  };
  const u32 = (value: number) => Buffer.from(new Uint32Array([value]).buffer);
  const u64 = (value: bigint) => Buffer.from(new BigUint64Array([value]).buffer);
  t.equal(planBoot(pvh(u32(0x100010)), options).entry, 0x100010n, 'a 4-byte entry, as Firecracker accepts it');
  t.equal(planBoot(pvh(u64(0x100020n)), options).entry, 0x100020n, 'an 8-byte entry, as Linux emits it');
  fails(t, pvh(Buffer.from([1, 0])), 'the PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY) has a 2-byte value (expected 4 or 8)');
  fails(t, pvh(u64(0x100000000n)), 'the PVH entry point 0x100000000 (XEN_ELFNOTE_PHYS32_ENTRY) is above 4 GiB');
  fails(t, pvh(u32(0x300000)), 'the PVH entry point 0x300000 is not inside any loaded segment');
  const truncated = pvh(u32(0x100010));
  new DataView(truncated.buffer).setUint32(0x300 + 4, 64, true);
  fails(t, truncated, 'truncated ELF note at offset 0x0 of program header 1');
  t.equal(planBoot(pvh(u32(0x100010)).map((b, i) => (i === 0x300 + 12 ? 0x59 : b)), options).format, 'elf64', 'a note named other than "Xen" is not PVH');
});

t.test('command lines the boot information cannot carry', async (t) => {
  const image = elfGuest('pvh');
  fails(t, image, 'the command line contains a NUL character', { cmdline: 'a\0b' });
  fails(t, image, 'the command line is 4096 bytes; at most 4095 fit', { cmdline: 'x'.repeat(4096) });
  t.equal(planBoot(image, { ...options, cmdline: 'x'.repeat(4095) }).format, 'pvh', '4095 bytes fit');
});

t.test('bad options are TypeErrors and RangeErrors with argument codes, not image errors', async (t) => {
  const image = new Uint8Array([0xf4]);
  throwsArgError(t, () => planBoot('hello' as unknown as Uint8Array, options), 'ERR_INVALID_ARG_TYPE', 'image must be a Uint8Array');
  throwsArgError(t, () => planBoot(image, null as unknown as PlanOptions), 'ERR_INVALID_ARG_TYPE', 'options must be an object');
  throwsArgError(t, () => planBoot(image, { ...options, memoryBytes: 1000 }), 'ERR_INVALID_ARG_VALUE', 'memoryBytes must be a positive multiple of 4096, got 1000');
  throwsArgError(t, () => planBoot(image, { ...options, vcpus: 0 }), 'ERR_OUT_OF_RANGE', 'vcpus must be a positive integer, got 0');
  throwsArgError(t, () => planBoot(image, { ...options, mode: 'virtual' as 'real' }), 'ERR_INVALID_ARG_VALUE', "mode must be 'real', 'protected' or 'long', got virtual");
  throwsArgError(t, () => planBoot(image, { ...options, loadAddr: -1 }), 'ERR_OUT_OF_RANGE', 'loadAddr must be a non-negative integer, got -1');
  throwsArgError(t, () => planBoot(image, { ...options, cmdline: 5 as unknown as string }), 'ERR_INVALID_ARG_TYPE', 'cmdline must be a string, got number');
});
