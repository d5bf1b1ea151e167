// Every struct layout, kvm_run offset and constant in lib/kvm/ against the values the addon read
// from the kernel headers it was built with (sizeof, offsetof, #define), and the struct codec's
// validation. Needs the addon, not /dev/kvm.
import t from 'tap';
import {
  ClockFlag, Cap, DirtyGfnFlag, DirtyLogManual, ExitReason, GuestDebugFlag, InternalErrorSuberror, IoDirection, IrqChip,
  IrqRoutingType, KVM_API_VERSION, KvmRunOffset, MemoryFlag, MpState, PIT_SPEAKER_DUMMY, SystemEventType, VcpuEventValid,
} from '../../lib/index.js';
import * as api from '../../lib/index.js';
import { decodeCpuid, decodeMsrList, encodeList, encodeMsrs } from '../../lib/kvm/lists.js';
import { native } from '../../lib/kvm/native.js';
import type { FieldType, StructType, Fields } from '../../lib/kvm/struct.js';
import {
  allStructs, kvmCpuidEntry2, kvmFpu, kvmIrqRoutingEntry, kvmMsrEntry, kvmPitState2, kvmRegs, kvmSregs, kvmVcpuEvents,
  type Regs, type Sregs,
} from '../../lib/kvm/structs.js';

const layout = native.layout();

/** TS field names that are not the kernel's name in camelCase, by struct. */
const FIELD_ALIASES: Record<string, Record<string, string>> = {
  // struct kvm_guest_debug { __u32 control; __u32 pad; struct kvm_guest_debug_arch arch; }
  kvm_guest_debug: { debugreg: 'arch' },
};

/** camelCase -> snake_case: apicBase -> apic_base, interruptBitmap -> interrupt_bitmap. */
function snake(name: string): string {
  return name.replace(/([a-z0-9])([A-Z])/g, '$1_$2').toLowerCase();
}

function kernelField(structName: string, field: string): string {
  return FIELD_ALIASES[structName]?.[field] ?? snake(field);
}

/** PascalCase constant key -> the kernel's SCREAMING_SNAKE suffix: IrqWindowOpen -> IRQ_WINDOW_OPEN. */
function screamingSnake(name: string): string {
  return name.replace(/([a-z0-9])([A-Z])/g, '$1_$2').toUpperCase();
}

/** Each exported constant group with the kernel prefix its keys convert under. */
const CONSTANT_GROUPS: { name: string; values: Record<string, number>; prefix: string; aliases?: Record<string, string> }[] = [
  { name: 'ExitReason', values: ExitReason, prefix: 'KVM_EXIT_' },
  { name: 'IoDirection', values: IoDirection, prefix: 'KVM_EXIT_IO_' },
  { name: 'Cap', values: Cap, prefix: 'KVM_CAP_' },
  { name: 'MemoryFlag', values: MemoryFlag, prefix: 'KVM_MEM_' },
  {
    name: 'DirtyLogManual', values: DirtyLogManual, prefix: 'KVM_DIRTY_LOG_',
    aliases: { ProtectEnable: 'KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE' },
  },
  { name: 'IrqChip', values: IrqChip, prefix: 'KVM_IRQCHIP_' },
  { name: 'IrqRoutingType', values: IrqRoutingType, prefix: 'KVM_IRQ_ROUTING_' },
  { name: 'MpState', values: MpState, prefix: 'KVM_MP_STATE_' },
  { name: 'GuestDebugFlag', values: GuestDebugFlag, prefix: 'KVM_GUESTDBG_' },
  { name: 'SystemEventType', values: SystemEventType, prefix: 'KVM_SYSTEM_EVENT_' },
  { name: 'InternalErrorSuberror', values: InternalErrorSuberror, prefix: 'KVM_INTERNAL_ERROR_' },
  { name: 'VcpuEventValid', values: VcpuEventValid, prefix: 'KVM_VCPUEVENT_VALID_' },
  { name: 'ClockFlag', values: ClockFlag, prefix: 'KVM_CLOCK_' },
  { name: 'DirtyGfnFlag', values: DirtyGfnFlag, prefix: 'KVM_DIRTY_GFN_F_' },
];

// Groups the addon reports that lib/ may export under these names (kvm_irqfd.flags,
// kvm_ioeventfd.flags); the counterpart test below fails while they are absent.
const exported = api as unknown as Record<string, unknown>;
for (const [name, prefix] of [['IrqfdFlag', 'KVM_IRQFD_FLAG_'], ['IoeventfdFlag', 'KVM_IOEVENTFD_FLAG_']] as const) {
  const values = exported[name];
  if (typeof values === 'object' && values !== null) CONSTANT_GROUPS.push({ name, values: values as Record<string, number>, prefix });
}

/** Constants exported on their own rather than in a group. */
const SINGLE_CONSTANTS: Record<string, number> = {
  KVM_API_VERSION,
  KVM_PIT_SPEAKER_DUMMY: PIT_SPEAKER_DUMMY,
};
if (typeof exported.DIRTY_LOG_PAGE_OFFSET === 'number') SINGLE_CONSTANTS.KVM_DIRTY_LOG_PAGE_OFFSET = exported.DIRTY_LOG_PAGE_OFFSET;
if (typeof exported.COALESCED_MMIO_PAGE_OFFSET === 'number') SINGLE_CONSTANTS.KVM_COALESCED_MMIO_PAGE_OFFSET = exported.COALESCED_MMIO_PAGE_OFFSET;

function kernelConstantName(group: (typeof CONSTANT_GROUPS)[number], key: string): string {
  return group.aliases?.[key] ?? group.prefix + screamingSnake(key);
}

/** Every TS constant by its kernel name. */
function tsConstants(): Map<string, { tsName: string; value: number }> {
  const all = new Map<string, { tsName: string; value: number }>();
  for (const group of CONSTANT_GROUPS) {
    for (const [key, value] of Object.entries(group.values)) {
      all.set(kernelConstantName(group, key), { tsName: `${group.name}.${key}`, value });
    }
  }
  for (const [name, value] of Object.entries(SINGLE_CONSTANTS)) all.set(name, { tsName: name, value });
  return all;
}

t.test('the name conversions give the kernel spellings', async (t) => {
  t.equal(snake('apicBase'), 'apic_base');
  t.equal(snake('interruptBitmap'), 'interrupt_bitmap');
  t.equal(snake('hasErrorCode'), 'has_error_code');
  t.equal(snake('rip'), 'rip');
  t.equal(kernelField('kvm_guest_debug', 'debugreg'), 'arch');
  t.equal(screamingSnake('IrqWindowOpen'), 'IRQ_WINDOW_OPEN');
  t.equal(screamingSnake('ManualDirtyLogProtect2'), 'MANUAL_DIRTY_LOG_PROTECT2');
  t.equal(screamingSnake('X86Rdmsr'), 'X86_RDMSR');
  t.equal(screamingSnake('X2apicApi'), 'X2APIC_API');
  t.equal(screamingSnake('UseSwBp'), 'USE_SW_BP');
});

t.test('every struct has the size the kernel headers give', async (t) => {
  for (const type of allStructs) {
    t.equal(type.size, layout.sizes[type.name], `sizeof(struct ${type.name})`);
  }
});

t.test('every struct field sits at the kernel offset', async (t) => {
  for (const type of allStructs as StructType<Fields>[]) {
    for (const [field, [offset]] of Object.entries(type.fields)) {
      const key = `${type.name}.${kernelField(type.name, field)}`;
      t.equal(offset, layout.offsets[key], `offsetof(${key}) for ${field}`);
    }
  }
});

t.test('every kernel field the addon reports for these structs has a TS field', async (t) => {
  const byName = new Map((allStructs as StructType<Fields>[]).map((type) => [type.name, type]));
  const missing: string[] = [];
  for (const key of Object.keys(layout.offsets)) {
    const [structName, field] = key.split('.') as [string, string];
    const type = byName.get(structName);
    if (!type) continue;
    if (!Object.keys(type.fields).some((name) => kernelField(structName, name) === field)) missing.push(key);
  }
  t.same(missing, []);
});

t.test('fields do not overlap and end inside their struct', async (t) => {
  // Nested structs ('kvm_vcpu_events.exception') have no offsetof entries of their own: at least
  // they must fit in the gap their parent leaves them.
  const check = (type: StructType<Fields>) => {
    const spans = Object.entries(type.fields)
      .map(([field, [offset, fieldType]]) => ({ field, start: offset, end: offset + (fieldType as FieldType<unknown>).size }))
      .sort((a, b) => a.start - b.start);
    spans.forEach((span, i) => {
      const next = spans[i + 1];
      const limit = next ? next.start : type.size;
      t.ok(span.end <= limit, `${type.name}.${span.field} ends at ${span.end}, within ${limit}`);
    });
    for (const [, [, fieldType]] of Object.entries(type.fields)) {
      if ('fields' in fieldType) check(fieldType as StructType<Fields>);
    }
  };
  for (const type of allStructs as StructType<Fields>[]) check(type);
});

t.test('every KvmRunOffset entry is the kernel offset in struct kvm_run', async (t) => {
  for (const [key, offset] of Object.entries(KvmRunOffset)) {
    t.equal(offset, layout.offsets[`kvm_run.${key}`], `offsetof(kvm_run, ${key})`);
  }
  const missing = Object.keys(layout.offsets)
    .filter((key) => key.startsWith('kvm_run.'))
    .map((key) => key.slice('kvm_run.'.length))
    .filter((key) => !(key in KvmRunOffset));
  t.same(missing, [], 'every kvm_run offset the addon reports has a KvmRunOffset entry');
});

t.test('variable-length ioctl arguments put their entries where the kernel reads them', async (t) => {
  const { offsets } = layout;
  // lists.ts writes one 8-byte header (u32 count + padding) before kvm_msrs, kvm_cpuid2 and
  // kvm_irq_routing entries, and a 4-byte one before kvm_msr_list indices.
  t.equal(offsets['kvm_msrs.nmsrs'], 0);
  t.equal(offsets['kvm_cpuid2.nent'], 0);
  t.equal(offsets['kvm_irq_routing.nr'], 0);
  t.equal(offsets['kvm_msr_list.nmsrs'], 0);

  const msrs = encodeMsrs([{ index: 0x174, data: 0x1234n }, { index: 0x10, data: 5n }]);
  const msrView = new DataView(msrs.buffer);
  t.equal(msrView.getUint32(offsets['kvm_msrs.nmsrs']!, true), 2);
  t.equal(msrView.getUint32(offsets['kvm_msrs.entries']! + layout.sizes['kvm_msr_entry']! + offsets['kvm_msr_entry.index']!, true), 0x10);
  t.equal(msrs.byteLength, offsets['kvm_msrs.entries']! + 2 * layout.sizes['kvm_msr_entry']!);

  const routing = encodeList(kvmIrqRoutingEntry, [{ gsi: 7, type: IrqRoutingType.Msi, flags: 0, u: new Uint8Array(32) }], 'routes');
  t.equal(new DataView(routing.buffer).getUint32(offsets['kvm_irq_routing.entries']! + offsets['kvm_irq_routing_entry.gsi']!, true), 7);

  const cpuid = new Uint8Array(offsets['kvm_cpuid2.entries']! + 2 * layout.sizes['kvm_cpuid_entry2']!);
  const cpuidView = new DataView(cpuid.buffer);
  cpuidView.setUint32(offsets['kvm_cpuid2.nent']!, 2, true);
  cpuidView.setUint32(offsets['kvm_cpuid2.entries']! + layout.sizes['kvm_cpuid_entry2']! + offsets['kvm_cpuid_entry2.function']!, 0x80000001, true);
  t.same(decodeCpuid(cpuid).map((entry) => entry.function), [0, 0x80000001]);
  t.equal(kvmCpuidEntry2.size, layout.sizes['kvm_cpuid_entry2']);

  const list = new Uint8Array(offsets['kvm_msr_list.indices']! + 3 * 4);
  const listView = new DataView(list.buffer);
  listView.setUint32(offsets['kvm_msr_list.nmsrs']!, 3, true);
  [0x10, 0x174, 0xc0000080].forEach((index, i) => listView.setUint32(offsets['kvm_msr_list.indices']! + i * 4, index, true));
  t.same(decodeMsrList(list), [0x10, 0x174, 0xc0000080]);

  // vcpu.ts sizes KVM_GET/SET_XCRS and the legacy KVM_GET_XSAVE buffers with these.
  t.equal(layout.sizes['kvm_xcrs'], 392);
  t.equal(offsets['kvm_xcrs.xcrs'], 8);
  t.equal(layout.sizes['kvm_xsave'], 4096);
});

t.test('every TS constant equals the kernel constant of its name', async (t) => {
  for (const [kernelName, { tsName, value }] of tsConstants()) {
    t.ok(kernelName in layout.constants, `${tsName} is ${kernelName}, which the addon reports`);
    t.equal(value, layout.constants[kernelName], `${tsName} === ${kernelName}`);
  }
});

t.test('every constant the addon reports has a TS counterpart', async (t) => {
  const ts = tsConstants();
  const missing = Object.keys(layout.constants).filter((name) => !ts.has(name));
  t.same(missing, [], 'kernel constants with no exported TS constant');
});

const sampleRegs = (): Regs => ({
  rax: 1n, rbx: 2n, rcx: 3n, rdx: 4n, rsi: 5n, rdi: 6n, rsp: 7n, rbp: 8n,
  r8: 9n, r9: 10n, r10: 11n, r11: 12n, r12: 13n, r13: 14n, r14: 15n, r15: 0xffffffffffffffffn,
  rip: 0x7c00n, rflags: 0x202n,
});

const segment = (selector: number, base: bigint) => ({
  base, limit: 0xffff, selector, type: 3, present: 1, dpl: 0, db: 0, s: 1, l: 0, g: 0, avl: 0, unusable: 0,
});

const sampleSregs = (): Sregs => ({
  cs: { ...segment(0xf000, 0xf0000n), type: 0xb }, ds: segment(0x10, 0x100n), es: segment(0x20, 0x200n),
  fs: segment(0x30, 0x300n), gs: segment(0x40, 0x400n), ss: segment(0x50, 0x500n),
  tr: { ...segment(0, 0n), type: 0xb, s: 0 }, ldt: { ...segment(0, 0n), type: 2, s: 0, unusable: 1 },
  gdt: { base: 0x1000n, limit: 0x17 }, idt: { base: 0n, limit: 0x3ff },
  cr0: 0x60000010n, cr2: 0xdeadbeefn, cr3: 0x9000n, cr4: 0n, cr8: 0n, efer: 0n, apicBase: 0xfee00900n,
  interruptBitmap: [1n << 32n, 0n, 0n, 1n << 63n],
});

t.test('encode then decode returns the same value', async (t) => {
  const regs = sampleRegs();
  const encodedRegs = kvmRegs.encode(regs);
  t.equal(encodedRegs.byteLength, 144);
  t.equal(new DataView(encodedRegs.buffer).getBigUint64(128, true), 0x7c00n, 'rip lands at offset 128');
  t.same(kvmRegs.decode(encodedRegs), regs);

  const sregs = sampleSregs();
  t.same(kvmSregs.decode(kvmSregs.encode(sregs)), sregs);

  const events = {
    exception: { injected: 1, nr: 13, hasErrorCode: 1, pending: 0, errorCode: 0x18 },
    interrupt: { injected: 1, nr: 0x20, soft: 0, shadow: 2 },
    nmi: { injected: 0, pending: 1, masked: 1 },
    sipiVector: 0x9a, flags: VcpuEventValid.NmiPending | VcpuEventValid.Payload,
    smi: { smm: 0, pending: 0, smmInsideNmi: 0, latchedInit: 1 },
    tripleFault: { pending: 1 },
    exceptionHasPayload: 1, exceptionPayload: 0xfffff000n,
  };
  t.same(kvmVcpuEvents.decode(kvmVcpuEvents.encode(events)), events);

  const channel = (count: number, countLoadTime: bigint) => ({
    count, latchedCount: 0x1234, countLatched: 1, statusLatched: 0, status: 0x36, readState: 3, writeState: 3,
    writeLatch: 0x12, rwMode: 3, mode: 2, bcd: 0, gate: 1, countLoadTime,
  });
  const pit = { channels: [channel(0x10000, -5n), channel(18, 1n << 40n), channel(0, -(1n << 63n))], flags: 1 };
  t.same(kvmPitState2.decode(kvmPitState2.encode(pit)), pit, 'signed count_load_time survives');

  const fpu = {
    fpr: Uint8Array.from({ length: 128 }, (_, i) => i), fcw: 0x37f, fsw: 0x4000, ftwx: 0xff, lastOpcode: 0x7ff,
    lastIp: 0x1234n, lastDp: 0x5678n, xmm: Uint8Array.from({ length: 256 }, (_, i) => 255 - i), mxcsr: 0x1f80,
  };
  t.same(kvmFpu.decode(kvmFpu.encode(fpu)), fpu);
  t.same(kvmMsrEntry.decode(kvmMsrEntry.encode({ index: 0xc0000080, data: 0xd01n })), { index: 0xc0000080, data: 0xd01n });
});

t.test('encode writes into a caller buffer and zeroes the padding', async (t) => {
  const into = new Uint8Array(kvmMsrEntry.size).fill(0xee);
  const out = kvmMsrEntry.encode({ index: 1, data: 2n }, into);
  t.equal(out, into);
  t.same([...into.subarray(4, 8)], [0, 0, 0, 0], 'kvm_msr_entry.reserved is zero');
  t.throws(() => kvmMsrEntry.encode({ index: 1, data: 2n }, new Uint8Array(8)), RangeError);
  t.throws(() => kvmRegs.decode(new Uint8Array(143)), RangeError);
});

t.test('encode rejects a missing field and names its path', async (t) => {
  const { rip: _rip, ...noRip } = sampleRegs();
  t.throws(() => kvmRegs.encode(noRip as Regs), { name: 'TypeError', message: /regs\.rip/ });
  const sregs = sampleSregs();
  const { base: _base, ...csNoBase } = sregs.cs;
  t.throws(() => kvmSregs.encode({ ...sregs, cs: csNoBase } as Sregs), { name: 'TypeError', message: /sregs\.cs\.base/ });
  t.throws(() => kvmRegs.encode(null as unknown as Regs), TypeError);
  t.throws(() => kvmSregs.encode({ ...sregs, gdt: 5 } as unknown as Sregs), { name: 'TypeError', message: /sregs\.gdt/ });
});

t.test('encode rejects a value of the wrong type', async (t) => {
  t.throws(() => kvmRegs.encode({ ...sampleRegs(), rax: '1' } as unknown as Regs), { name: 'TypeError', message: /regs\.rax/ });
  // A u64 takes a bigint or a safe integer; a number past 2^53 would already have lost bits.
  t.throws(() => kvmRegs.encode({ ...sampleRegs(), rbx: 2 ** 60 } as unknown as Regs), { name: 'TypeError', message: /regs\.rbx/ });
  t.throws(() => kvmSregs.encode({ ...sampleSregs(), cs: { ...segment(0, 0n), selector: 1n } } as unknown as Sregs), {
    name: 'TypeError', message: /sregs\.cs\.selector/,
  });
  t.throws(() => kvmSregs.encode({ ...sampleSregs(), interruptBitmap: 0n } as unknown as Sregs), {
    name: 'TypeError', message: /sregs\.interruptBitmap/,
  });
  t.throws(() => kvmFpu.encode({ ...kvmFpu.decode(new Uint8Array(416)), xmm: [0] } as unknown as ReturnType<typeof kvmFpu.decode>), {
    name: 'TypeError', message: /fpu\.xmm/,
  });
  t.same(kvmRegs.decode(kvmRegs.encode({ ...sampleRegs(), rax: 7 } as unknown as Regs)).rax, 7n, 'a safe integer is accepted for a u64');
});

t.test('encode rejects an out-of-range value', async (t) => {
  t.throws(() => kvmRegs.encode({ ...sampleRegs(), rax: -1n }), { name: 'RangeError', message: /regs\.rax/ });
  t.throws(() => kvmRegs.encode({ ...sampleRegs(), rax: 1n << 64n }), { name: 'RangeError', message: /regs\.rax/ });
  t.throws(() => kvmSregs.encode({ ...sampleSregs(), cs: { ...segment(0, 0n), type: 256 } }), {
    name: 'RangeError', message: /sregs\.cs\.type/,
  });
  t.throws(() => kvmSregs.encode({ ...sampleSregs(), cs: { ...segment(0, 0n), selector: 0x10000 } }), RangeError);
  t.throws(() => kvmSregs.encode({ ...sampleSregs(), cs: { ...segment(0, 0n), limit: 1.5 } }), RangeError);
  t.throws(() => kvmSregs.encode({ ...sampleSregs(), interruptBitmap: [0n, 0n, 0n] }), {
    name: 'RangeError', message: /sregs\.interruptBitmap/,
  });
  t.throws(() => kvmSregs.encode({ ...sampleSregs(), interruptBitmap: [0n, 0n, 0n, -1n] }), {
    name: 'RangeError', message: /sregs\.interruptBitmap\[3\]/,
  });
});

t.test('encode rejects a bytes field of the wrong length', async (t) => {
  const fpu = kvmFpu.decode(new Uint8Array(kvmFpu.size));
  t.throws(() => kvmFpu.encode({ ...fpu, xmm: new Uint8Array(255) }), { name: 'RangeError', message: /fpu\.xmm/ });
  t.throws(() => kvmFpu.encode({ ...fpu, fpr: new Uint8Array(129) }), { name: 'RangeError', message: /fpu\.fpr/ });
});
