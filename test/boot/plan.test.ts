// planBoot() on every built guest: the format it finds, the mode and entry, what it writes where,
// and the boot information it builds. Pure: no VM is created.
import t from 'tap';
import {
  BOOT_INFO_ADDR, GDT_ADDR, HVM_START_MAGIC, MULTIBOOT_BOOTLOADER_MAGIC, PAGE_TABLES_ADDR, Selector,
  memoryMap, planBoot, writeBootPlan, type BootPlan,
} from '../../lib/boot/index.js';
import { GuestMemory } from '../../lib/index.js';
import { elfGuest } from '../helpers/boot-runner.js';
import { guestImage } from '../helpers/kvm.js';

const MiB = 1 << 20;
const GiB = 1024 * MiB;

/** Low memory (first 1 MiB) as the plan leaves it, for reading the loader's structures. */
function lowMemory(plan: BootPlan): DataView {
  const bytes = new Uint8Array(MiB);
  for (const write of plan.writes) {
    if (write.guestPhysAddr >= MiB) continue;
    if ('data' in write) bytes.set(write.data.subarray(0, MiB - write.guestPhysAddr), write.guestPhysAddr);
  }
  return new DataView(bytes.buffer);
}

function cString(view: DataView, addr: number): string {
  let text = '';
  for (let at = addr; view.getUint8(at) !== 0; at++) text += String.fromCharCode(view.getUint8(at));
  return text;
}

/** The hvm_memmap_table_entry array (PVH) or multiboot mmap, as memoryMap() entries. */
function hvmMemmap(view: DataView, info: number) {
  const at = Number(view.getBigUint64(info + 40, true));
  return Array.from({ length: view.getUint32(info + 48, true) }, (_, i) => ({
    addr: view.getBigUint64(at + i * 24, true), size: view.getBigUint64(at + i * 24 + 8, true), type: view.getUint32(at + i * 24 + 16, true),
  }));
}

/** A 4-level walk of the plan's page tables: the physical address of `va`, or null. */
function translate(view: DataView, cr3: number, va: bigint): bigint | null {
  const entry = (table: bigint, index: bigint) => view.getBigUint64(Number(table + index * 8n), true);
  const frame = (e: bigint) => e & 0x000ffffffffff000n;
  const pml4e = entry(BigInt(cr3), (va >> 39n) & 511n);
  if (!(pml4e & 1n)) return null;
  const pdpte = entry(frame(pml4e), (va >> 30n) & 511n);
  if (!(pdpte & 1n)) return null;
  const pde = entry(frame(pdpte), (va >> 21n) & 511n);
  if (!(pde & 1n) || !(pde & 0x80n)) return null;
  return (pde & 0x000fffffffe00000n) | (va & 0x1fffffn);
}

/** Where every write of the plan lands, as [start, end) and what. */
const extents = (plan: BootPlan) =>
  plan.writes.map((w) => ({ what: w.what, start: w.guestPhysAddr, end: w.guestPhysAddr + ('data' in w ? w.data.length : w.zeroBytes) }));

t.test('hello is a flat binary entered in real mode at 0000:7c00, written alone', async (t) => {
  const image = guestImage('hello');
  const plan = planBoot(image, { memoryBytes: MiB, vcpus: 1 });
  t.equal(plan.format, 'flat');
  t.equal(plan.mode, 'real');
  t.equal(plan.entry, 0x7c00n);
  t.same(extents(plan), [{ what: 'image', start: 0x7c00, end: 0x7c00 + image.length }], 'nothing but the image: real mode needs no GDT');
  t.same((plan.writes[0] as { data: Uint8Array }).data, image);
  t.equal(plan.bsp.regs.rip, 0x7c00n);
  t.equal(plan.bsp.regs.rflags, 0x2n, 'interrupts off');
  for (const name of ['cs', 'ds', 'es', 'fs', 'gs', 'ss'] as const) {
    t.equal(plan.bsp.sregs[name]!.selector, 0, `${name} selector 0`);
    t.equal(plan.bsp.sregs[name]!.base, 0n, `${name} base 0`);
  }
  t.equal(plan.bsp.sregs.cr0, undefined, 'CR0 stays at its reset value');
});

t.test('a real-mode load address above 64 KiB is reached through CS', async (t) => {
  const plan = planBoot(guestImage('hello'), { memoryBytes: MiB, vcpus: 1, loadAddr: 0x12340 });
  t.equal(plan.entry, 0x12340n);
  t.equal(plan.bsp.sregs.cs!.selector, 0x1234);
  t.equal(plan.bsp.sregs.cs!.base, 0x12340n);
  t.equal(plan.bsp.regs.rip, 0n);
});

t.test('protected (ELF32) is entered in protected mode at e_entry with the loader GDT', async (t) => {
  const plan = planBoot(elfGuest('protected'), { memoryBytes: 64 * MiB, vcpus: 1, mode: 'real' });
  t.equal(plan.format, 'elf32');
  t.equal(plan.mode, 'protected', 'the file says its mode: options.mode only applies to flat binaries');
  t.equal(plan.entry, 0x100000n);
  t.same(extents(plan).map((e) => e.what), ['segment 0', 'segment 1', 'segment 1 (bss)', 'GDT', 'boot info']);
  t.equal(plan.writes[0]!.guestPhysAddr, 0x100000);
  const bss = plan.writes[2]!;
  t.ok('zeroBytes' in bss && bss.zeroBytes > 0, 'the bss is a run of zero bytes');
  t.equal(plan.writes[3]!.guestPhysAddr, GDT_ADDR);
  t.equal(plan.writes[4]!.guestPhysAddr, BOOT_INFO_ADDR);

  const { regs, sregs } = plan.bsp;
  t.same(regs, { rbx: BigInt(BOOT_INFO_ADDR), rip: 0x100000n, rflags: 0x2n }, 'EBX = hvm_start_info, interrupts off');
  t.same(sregs.cs, { base: 0n, limit: 0xffffffff, selector: Selector.Code32, type: 0xb, present: 1, dpl: 0, db: 1, s: 1, l: 0, g: 1, avl: 0, unusable: 0 });
  for (const name of ['ds', 'es', 'fs', 'gs', 'ss'] as const) {
    t.same(sregs[name], { base: 0n, limit: 0xffffffff, selector: Selector.Data, type: 0x3, present: 1, dpl: 0, db: 1, s: 1, l: 0, g: 1, avl: 0, unusable: 0 }, name);
  }
  t.same(sregs.gdt, { base: BigInt(GDT_ADDR), limit: 0x2f });
  t.same(sregs.idt, { base: 0n, limit: 0 }, 'no IDT: an early exception is a clean triple fault');
  t.equal(sregs.cr0, 0x11n, 'PE (and ET), paging off');
  t.equal(sregs.cr4, 0n);
  t.equal(sregs.efer, 0n);

  // The GDT in RAM holds the descriptors the segment registers were loaded from.
  const view = lowMemory(plan);
  t.equal(view.getBigUint64(GDT_ADDR + Selector.Code32, true), 0x00cf9b000000ffffn, 'flat 32-bit code');
  t.equal(view.getBigUint64(GDT_ADDR + Selector.Data, true), 0x00cf93000000ffffn, 'flat data');
  t.equal(view.getBigUint64(GDT_ADDR + Selector.Code64, true), 0x00af9b000000ffffn, '64-bit code');
  t.equal(view.getBigUint64(GDT_ADDR + Selector.Tss, true), 0x00008b0000000067n, 'busy TSS at 0, limit 0x67');
});

t.test('long (ELF64) is entered in long mode on identity-mapped page tables', async (t) => {
  const memoryBytes = 1536 * MiB;
  const plan = planBoot(elfGuest('long'), { memoryBytes, vcpus: 1 });
  t.equal(plan.format, 'elf64');
  t.equal(plan.mode, 'long');
  t.equal(plan.entry, 0x100000n);
  const { sregs } = plan.bsp;
  t.equal(sregs.cs!.selector, Selector.Code64);
  t.equal(sregs.cs!.l, 1, 'CS.L: 64-bit code');
  t.equal(sregs.cs!.db, 0);
  t.equal(sregs.cr0, 0x80000011n, 'PE and PG');
  t.equal(sregs.cr4, 0x20n, 'PAE');
  t.equal(sregs.efer, 0x500n, 'LME and LMA');
  t.equal(sregs.cr3, BigInt(PAGE_TABLES_ADDR));
  t.equal(plan.bsp.regs.rbx, BigInt(BOOT_INFO_ADDR));

  const tables = plan.writes.find((w) => w.what === 'page tables')!;
  t.equal(tables.guestPhysAddr, PAGE_TABLES_ADDR);
  t.equal('data' in tables && tables.data.length, 6 * 4096, 'PML4, PDPT and 4 PDs: the first 4 GiB');
  const view = lowMemory(plan);
  for (const va of [0n, 0x7c00n, 0x100000n, 0x3fe00000n + 0x1234n, BigInt(memoryBytes - 8), 0xfee00020n, 0xffffffffn]) {
    t.equal(translate(view, PAGE_TABLES_ADDR, va), va, `0x${va.toString(16)} maps to itself`);
  }
  t.equal(translate(view, PAGE_TABLES_ADDR, 4n * BigInt(GiB)), null, 'nothing above 4 GiB when RAM is smaller');
  const pde = view.getBigUint64(PAGE_TABLES_ADDR + 2 * 4096, true);
  t.equal(pde & 0xfffn, 0xe7n, 'a 2 MiB page: present, writable, user, accessed, dirty');
});

t.test('the identity map grows with RAM above 4 GiB', async (t) => {
  const plan = planBoot(elfGuest('long'), { memoryBytes: 6 * GiB, vcpus: 1 });
  const tables = plan.writes.find((w) => w.what === 'page tables')!;
  t.equal('data' in tables && tables.data.length, 8 * 4096, 'one PD per GiB');
  const view = lowMemory(plan);
  const top = 6n * BigInt(GiB) - 8n;
  t.equal(translate(view, PAGE_TABLES_ADDR, top), top);
  t.equal(translate(view, PAGE_TABLES_ADDR, 6n * BigInt(GiB)), null);
});

t.test('multiboot: EAX magic, EBX multiboot_info with memory, memory map, name and command line', async (t) => {
  const memoryBytes = 64 * MiB;
  const plan = planBoot(elfGuest('multiboot'), { memoryBytes, vcpus: 1, cmdline: 'console=ttyS0 quiet' });
  t.equal(plan.format, 'multiboot');
  t.equal(plan.mode, 'protected');
  t.equal(plan.entry, 0x100000n + 12n, 'e_entry, just past the 12-byte header');
  t.equal(plan.bsp.regs.rax, BigInt(MULTIBOOT_BOOTLOADER_MAGIC));
  const info = Number(plan.bsp.regs.rbx);
  const view = lowMemory(plan);
  t.equal(view.getUint32(info, true), 0x245, 'flags: mem (0), cmdline (2), mmap (6), boot loader name (9)');
  t.equal(view.getUint32(info + 4, true), 639, 'mem_lower in KiB');
  t.equal(view.getUint32(info + 8, true), 63 * 1024, 'mem_upper: KiB above 1 MiB');
  t.equal(cString(view, view.getUint32(info + 16, true)), 'console=ttyS0 quiet');
  t.equal(cString(view, view.getUint32(info + 64, true)), 'node-kvm');
  const length = view.getUint32(info + 44, true);
  const at = view.getUint32(info + 48, true);
  const entries = [];
  for (let o = at; o < at + length; o += 4 + view.getUint32(o, true)) {
    entries.push({ addr: view.getBigUint64(o + 4, true), size: view.getBigUint64(o + 12, true), type: view.getUint32(o + 20, true) });
  }
  t.same(entries, memoryMap(memoryBytes));
});

t.test('multiboot without a command line leaves flags bit 2 clear', async (t) => {
  const plan = planBoot(elfGuest('multiboot'), { memoryBytes: 64 * MiB, vcpus: 1 });
  const view = lowMemory(plan);
  const info = Number(plan.bsp.regs.rbx);
  t.equal(view.getUint32(info, true) & 0x4, 0);
  t.equal(view.getUint32(info + 16, true), 0);
});

t.test('pvh: the note entry in protected mode, EBX = hvm_start_info', async (t) => {
  const memoryBytes = 128 * MiB;
  const image = elfGuest('pvh');
  // The note's value, found without the loader: "Xen" name, type 18, then the 8-byte entry.
  const noteHeader = Buffer.from([4, 0, 0, 0, 8, 0, 0, 0, 18, 0, 0, 0, 0x58, 0x65, 0x6e, 0]);
  const noteAt = Buffer.from(image).indexOf(noteHeader);
  t.ok(noteAt > 0, 'the image carries the PVH note');
  const noteEntry = Buffer.from(image).readBigUInt64LE(noteAt + noteHeader.length);
  const eEntry = Buffer.from(image).readBigUInt64LE(24);

  const plan = planBoot(image, { memoryBytes, vcpus: 1, cmdline: 'root=/dev/vda' });
  t.equal(plan.format, 'pvh');
  t.equal(plan.mode, 'protected', 'entered in 32-bit mode although the file is ELF64');
  t.equal(plan.entry, noteEntry);
  t.not(plan.entry, eEntry, 'not e_entry');
  t.equal(plan.bsp.regs.rip, noteEntry);
  t.equal(plan.bsp.sregs.cs!.db, 1);
  t.same(plan.bsp.sregs.tr, { base: 0n, limit: 0x67, selector: Selector.Tss, type: 0xb, present: 1, dpl: 0, db: 0, s: 0, l: 0, g: 0, avl: 0, unusable: 0 });
  const info = Number(plan.bsp.regs.rbx);
  const view = lowMemory(plan);
  t.equal(view.getUint32(info, true), HVM_START_MAGIC);
  t.equal(view.getUint32(info + 4, true), 1, 'version 1');
  t.equal(view.getUint32(info + 12, true), 0, 'no modules');
  t.equal(cString(view, Number(view.getBigUint64(info + 24, true))), 'root=/dev/vda');
  t.equal(view.getBigUint64(info + 32, true), 0n, 'no RSDP');
  t.same(hvmMemmap(view, info), memoryMap(memoryBytes));
});

t.test('flat binaries enter protected or long mode at the load address when asked', async (t) => {
  const image = new Uint8Array([0xf4]);
  const protectedPlan = planBoot(image, { memoryBytes: 2 * MiB, vcpus: 1, mode: 'protected', loadAddr: 0x100000 });
  t.equal(protectedPlan.format, 'flat');
  t.equal(protectedPlan.mode, 'protected');
  t.equal(protectedPlan.entry, 0x100000n);
  t.equal(protectedPlan.bsp.sregs.cs!.selector, Selector.Code32);
  t.same(extents(protectedPlan).map((e) => e.what), ['image', 'GDT', 'boot info']);
  const longPlan = planBoot(image, { memoryBytes: 2 * MiB, vcpus: 1, mode: 'long' });
  t.equal(longPlan.mode, 'long');
  t.equal(longPlan.entry, 0x7c00n, 'the default load address');
  t.same(extents(longPlan).map((e) => e.what), ['image', 'GDT', 'page tables', 'boot info']);
});

t.test('every write of every guest lies in RAM and none overlap', async (t) => {
  const memoryBytes = 64 * MiB;
  const plans = ['protected', 'long', 'multiboot', 'pvh', 'dirtier', 'dirtier-user', 'smp']
    .map((name) => [name, planBoot(elfGuest(name), { memoryBytes, vcpus: 2, cmdline: 'x' })] as const);
  for (const [name, plan] of plans) {
    const sorted = extents(plan).sort((a, b) => a.start - b.start);
    t.ok(sorted.every((e) => e.start >= 0 && e.end <= memoryBytes && e.end > e.start), `${name}: inside RAM`);
    t.ok(sorted.every((e, i) => i === 0 || e.start >= sorted[i - 1]!.end), `${name}: no overlap`);
    t.ok(sorted.every((e) => e.end <= 0x5000 || e.start >= 0x6000), `${name}: the guest parameter page 0x5000 is left alone`);
  }
});

t.test('a plan is plain data: it survives structured cloning', async (t) => {
  const plan = planBoot(elfGuest('pvh'), { memoryBytes: 64 * MiB, vcpus: 1, cmdline: 'a' });
  t.same(structuredClone(plan), plan);
});

t.test('writeBootPlan copies the writes and zero-fills the bss', async (t) => {
  const memoryBytes = 4 * MiB;
  const plan = planBoot(elfGuest('protected'), { memoryBytes, vcpus: 1 });
  const memory = GuestMemory.create(memoryBytes);
  t.teardown(() => memory.close());
  const bss = plan.writes.find((w) => 'zeroBytes' in w) as { guestPhysAddr: number; zeroBytes: number };
  memory.bytes(bss.guestPhysAddr, bss.zeroBytes).fill(0xcc);
  writeBootPlan(plan, memory);
  for (const write of plan.writes) {
    if ('data' in write) t.same(memory.bytes(write.guestPhysAddr, write.data.length), write.data, `${write.what} copied`);
  }
  t.ok(memory.bytes(bss.guestPhysAddr, bss.zeroBytes).every((b) => b === 0), 'bss zeroed over earlier contents');

  const small = GuestMemory.create(MiB);
  t.teardown(() => small.close());
  const end = 0x100000 + (plan.writes[0] as { data: Uint8Array }).data.length;
  t.throws(() => writeBootPlan(plan, small), new RangeError(`segment 0 [0x100000, 0x${end.toString(16)}) is outside guest memory (1 MiB)`));
});

t.test('memoryMap: low RAM, two reserved holes, RAM from 1 MiB', async (t) => {
  t.same(memoryMap(64 * MiB), [
    { addr: 0n, size: 0x9fc00n, type: 1 },
    { addr: 0x9fc00n, size: 0x400n, type: 2 },
    { addr: 0xe0000n, size: 0x20000n, type: 2 },
    { addr: 0x100000n, size: 0x3f00000n, type: 1 },
  ]);
  t.same(memoryMap(MiB).map((e) => e.type), [1, 2, 2], 'exactly 1 MiB: no high RAM');
  t.same(memoryMap(512 * 1024)[0], { addr: 0n, size: 0x80000n, type: 1 }, 'less than 640 KiB: low RAM shortened');
  t.throws(() => memoryMap(1000), RangeError);
});
