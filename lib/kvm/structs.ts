// x86-64 KVM struct layouts, from <linux/kvm.h> and <asm/kvm.h>. Field names are the kernel's,
// in camelCase. Checked against the addon's sizeof/offsetof table by test/kvm/layout.test.ts.
import { array, bytes, i64, struct, u16, u32, u64, u8, type StructValue } from './struct.js';

/** The layout of `struct kvm_regs` (144 bytes), from the kernel's uapi headers. */
export const kvmRegs = struct('kvm_regs', 144, {
  rax: [0, u64], rbx: [8, u64], rcx: [16, u64], rdx: [24, u64],
  rsi: [32, u64], rdi: [40, u64], rsp: [48, u64], rbp: [56, u64],
  r8: [64, u64], r9: [72, u64], r10: [80, u64], r11: [88, u64],
  r12: [96, u64], r13: [104, u64], r14: [112, u64], r15: [120, u64],
  rip: [128, u64], rflags: [136, u64],
} as const);
/** A `struct kvm_regs` as a JavaScript object: each field by its name in camelCase. */
export type Regs = StructValue<(typeof kvmRegs)['fields']>;

/** The layout of `struct kvm_segment` (24 bytes), from the kernel's uapi headers. */
export const kvmSegment = struct('kvm_segment', 24, {
  base: [0, u64], limit: [8, u32], selector: [12, u16], type: [14, u8],
  present: [15, u8], dpl: [16, u8], db: [17, u8], s: [18, u8],
  l: [19, u8], g: [20, u8], avl: [21, u8], unusable: [22, u8],
} as const);
/** A `struct kvm_segment` as a JavaScript object: each field by its name in camelCase. */
export type Segment = StructValue<(typeof kvmSegment)['fields']>;

/** The layout of `struct kvm_dtable` (16 bytes), from the kernel's uapi headers. */
export const kvmDtable = struct('kvm_dtable', 16, { base: [0, u64], limit: [8, u16] } as const);
/** A `struct kvm_dtable` as a JavaScript object: each field by its name in camelCase. */
export type Dtable = StructValue<(typeof kvmDtable)['fields']>;

/** The layout of `struct kvm_sregs` (312 bytes), from the kernel's uapi headers. */
export const kvmSregs = struct('kvm_sregs', 312, {
  cs: [0, kvmSegment], ds: [24, kvmSegment], es: [48, kvmSegment], fs: [72, kvmSegment],
  gs: [96, kvmSegment], ss: [120, kvmSegment], tr: [144, kvmSegment], ldt: [168, kvmSegment],
  gdt: [192, kvmDtable], idt: [208, kvmDtable],
  cr0: [224, u64], cr2: [232, u64], cr3: [240, u64], cr4: [248, u64], cr8: [256, u64],
  efer: [264, u64], apicBase: [272, u64],
  // Bit n set: external interrupt n is pending injection.
  interruptBitmap: [280, array(u64, 4)],
} as const);
/** A `struct kvm_sregs` as a JavaScript object: each field by its name in camelCase. */
export type Sregs = StructValue<(typeof kvmSregs)['fields']>;

/** The layout of `struct kvm_fpu` (416 bytes), from the kernel's uapi headers. */
export const kvmFpu = struct('kvm_fpu', 416, {
  fpr: [0, bytes(128)], fcw: [128, u16], fsw: [130, u16], ftwx: [132, u8],
  lastOpcode: [134, u16], lastIp: [136, u64], lastDp: [144, u64],
  xmm: [152, bytes(256)], mxcsr: [408, u32],
} as const);
/** A `struct kvm_fpu` as a JavaScript object: each field by its name in camelCase. */
export type Fpu = StructValue<(typeof kvmFpu)['fields']>;

/** The layout of `struct kvm_msr_entry` (16 bytes), from the kernel's uapi headers. */
export const kvmMsrEntry = struct('kvm_msr_entry', 16, { index: [0, u32], data: [8, u64] } as const);
/** A `struct kvm_msr_entry` as a JavaScript object: each field by its name in camelCase. */
export type MsrEntry = StructValue<(typeof kvmMsrEntry)['fields']>;

/** The layout of `struct kvm_cpuid_entry2` (40 bytes), from the kernel's uapi headers. */
export const kvmCpuidEntry2 = struct('kvm_cpuid_entry2', 40, {
  function: [0, u32], index: [4, u32], flags: [8, u32],
  eax: [12, u32], ebx: [16, u32], ecx: [20, u32], edx: [24, u32],
} as const);
/** A `struct kvm_cpuid_entry2` as a JavaScript object: each field by its name in camelCase. */
export type CpuidEntry = StructValue<(typeof kvmCpuidEntry2)['fields']>;

/** The local APIC's 1 KiB register page, as the kernel stores it. */
export const kvmLapicState = struct('kvm_lapic_state', 1024, { regs: [0, bytes(1024)] } as const);
/** A `struct kvm_lapic_state` as a JavaScript object: each field by its name in camelCase. */
export type LapicState = StructValue<(typeof kvmLapicState)['fields']>;

/** The layout of `struct kvm_xcr` (16 bytes), from the kernel's uapi headers. */
export const kvmXcr = struct('kvm_xcr', 16, { xcr: [0, u32], value: [8, u64] } as const);
/** A `struct kvm_xcr` as a JavaScript object: each field by its name in camelCase. */
export type Xcr = StructValue<(typeof kvmXcr)['fields']>;
/** The most XCRs `struct kvm_xcrs` holds (KVM_MAX_XCRS). */
export const KVM_MAX_XCRS = 16;

/** The layout of `struct kvm_vcpu_events` (64 bytes), from the kernel's uapi headers. */
export const kvmVcpuEvents = struct('kvm_vcpu_events', 64, {
  exception: [0, struct('kvm_vcpu_events.exception', 8, {
    injected: [0, u8], nr: [1, u8], hasErrorCode: [2, u8], pending: [3, u8], errorCode: [4, u32],
  } as const)],
  interrupt: [8, struct('kvm_vcpu_events.interrupt', 4, {
    injected: [0, u8], nr: [1, u8], soft: [2, u8], shadow: [3, u8],
  } as const)],
  nmi: [12, struct('kvm_vcpu_events.nmi', 4, { injected: [0, u8], pending: [1, u8], masked: [2, u8] } as const)],
  sipiVector: [16, u32],
  flags: [20, u32],
  smi: [24, struct('kvm_vcpu_events.smi', 4, {
    smm: [0, u8], pending: [1, u8], smmInsideNmi: [2, u8], latchedInit: [3, u8],
  } as const)],
  tripleFault: [28, struct('kvm_vcpu_events.triple_fault', 1, { pending: [0, u8] } as const)],
  exceptionHasPayload: [55, u8],
  exceptionPayload: [56, u64],
} as const);
/** A `struct kvm_vcpu_events` as a JavaScript object: each field by its name in camelCase. */
export type VcpuEvents = StructValue<(typeof kvmVcpuEvents)['fields']>;

/** The layout of `struct kvm_mp_state` (4 bytes), from the kernel's uapi headers. */
export const kvmMpState = struct('kvm_mp_state', 4, { mpState: [0, u32] } as const);

/** The layout of `struct kvm_debugregs` (128 bytes), from the kernel's uapi headers. */
export const kvmDebugregs = struct('kvm_debugregs', 128, {
  db: [0, array(u64, 4)], dr6: [32, u64], dr7: [40, u64], flags: [48, u64],
} as const);
/** A `struct kvm_debugregs` as a JavaScript object: each field by its name in camelCase. */
export type DebugRegs = StructValue<(typeof kvmDebugregs)['fields']>;

/** The layout of `struct kvm_guest_debug` (72 bytes), from the kernel's uapi headers. */
export const kvmGuestDebug = struct('kvm_guest_debug', 72, {
  control: [0, u32],
  // debugreg[0..3] addresses, [6] DR6, [7] DR7 (asm/kvm.h, kvm_guest_debug_arch)
  debugreg: [8, array(u64, 8)],
} as const);
/** A `struct kvm_guest_debug` as a JavaScript object: each field by its name in camelCase. */
export type GuestDebug = StructValue<(typeof kvmGuestDebug)['fields']>;

/** The layout of `struct kvm_translation` (24 bytes), from the kernel's uapi headers. */
export const kvmTranslation = struct('kvm_translation', 24, {
  linearAddress: [0, u64], physicalAddress: [8, u64], valid: [16, u8], writeable: [17, u8], usermode: [18, u8],
} as const);

/** The layout of `struct kvm_interrupt` (4 bytes), from the kernel's uapi headers. */
export const kvmInterrupt = struct('kvm_interrupt', 4, { irq: [0, u32] } as const);

/** The layout of `struct kvm_pit_config` (64 bytes), from the kernel's uapi headers. */
export const kvmPitConfig = struct('kvm_pit_config', 64, { flags: [0, u32] } as const);

/** The layout of `struct kvm_pit_channel_state` (24 bytes), from the kernel's uapi headers. */
export const kvmPitChannelState = struct('kvm_pit_channel_state', 24, {
  count: [0, u32], latchedCount: [4, u16], countLatched: [6, u8], statusLatched: [7, u8],
  status: [8, u8], readState: [9, u8], writeState: [10, u8], writeLatch: [11, u8],
  rwMode: [12, u8], mode: [13, u8], bcd: [14, u8], gate: [15, u8], countLoadTime: [16, i64],
} as const);
/** A `struct kvm_pit_channel_state` as a JavaScript object: each field by its name in camelCase. */
export type PitChannelState = StructValue<(typeof kvmPitChannelState)['fields']>;

/** The layout of `struct kvm_pit_state2` (112 bytes), from the kernel's uapi headers. */
export const kvmPitState2 = struct('kvm_pit_state2', 112, {
  channels: [0, array(kvmPitChannelState, 3)], flags: [72, u32],
} as const);
/** A `struct kvm_pit_state2` as a JavaScript object: each field by its name in camelCase. */
export type PitState2 = StructValue<(typeof kvmPitState2)['fields']>;

/** One interrupt controller's state: a PIC (kvm_pic_state) or the IOAPIC (kvm_ioapic_state). */
export const kvmIrqchip = struct('kvm_irqchip', 520, { chipId: [0, u32], chip: [8, bytes(512)] } as const);
/** A `struct kvm_irqchip` as a JavaScript object: each field by its name in camelCase. */
export type IrqchipState = StructValue<(typeof kvmIrqchip)['fields']>;

/** The layout of `struct kvm_irq_level` (8 bytes), from the kernel's uapi headers. */
export const kvmIrqLevel = struct('kvm_irq_level', 8, { irq: [0, u32], level: [4, u32] } as const);

/** The layout of `struct kvm_msi` (32 bytes), from the kernel's uapi headers. */
export const kvmMsi = struct('kvm_msi', 32, {
  addressLo: [0, u32], addressHi: [4, u32], data: [8, u32], flags: [12, u32], devid: [16, u32],
} as const);
/** A `struct kvm_msi` as a JavaScript object: each field by its name in camelCase. */
export type Msi = StructValue<(typeof kvmMsi)['fields']>;

/** The layout of `struct kvm_irq_routing_entry` (48 bytes), from the kernel's uapi headers. */
export const kvmIrqRoutingEntry = struct('kvm_irq_routing_entry', 48, {
  gsi: [0, u32], type: [4, u32], flags: [8, u32],
  // The union: irqchip { irqchip, pin } or msi { address_lo, address_hi, data, devid }.
  u: [16, bytes(32)],
} as const);

/** The layout of `struct kvm_irqfd` (32 bytes), from the kernel's uapi headers. */
export const kvmIrqfd = struct('kvm_irqfd', 32, {
  fd: [0, u32], gsi: [4, u32], flags: [8, u32], resamplefd: [12, u32],
} as const);

/** The layout of `struct kvm_ioeventfd` (64 bytes), from the kernel's uapi headers. */
export const kvmIoeventfd = struct('kvm_ioeventfd', 64, {
  datamatch: [0, u64], addr: [8, u64], len: [16, u32], fd: [20, u32], flags: [24, u32],
} as const);

/** The layout of `struct kvm_clock_data` (48 bytes), from the kernel's uapi headers. */
export const kvmClockData = struct('kvm_clock_data', 48, {
  clock: [0, u64], flags: [8, u32], realtime: [16, u64], hostTsc: [24, u64],
} as const);
/** A `struct kvm_clock_data` as a JavaScript object: each field by its name in camelCase. */
export type ClockData = StructValue<(typeof kvmClockData)['fields']>;

/** The layout of `struct kvm_enable_cap` (104 bytes), from the kernel's uapi headers. */
export const kvmEnableCap = struct('kvm_enable_cap', 104, {
  cap: [0, u32], flags: [4, u32], args: [8, array(u64, 4)],
} as const);

/** The layout of `struct kvm_nested_state` (128 bytes), from the kernel's uapi headers. */
export const kvmNestedStateHeader = struct('kvm_nested_state', 128, {
  flags: [0, u16], format: [2, u16], size: [4, u32],
} as const);

/** The layout of `struct kvm_dirty_gfn` (16 bytes), from the kernel's uapi headers. */
export const kvmDirtyGfn = struct('kvm_dirty_gfn', 16, { flags: [0, u32], slot: [4, u32], offset: [8, u64] } as const);

/** The layout of `struct kvm_coalesced_mmio_zone` (16 bytes), from the kernel's uapi headers. */
export const kvmCoalescedMmioZone = struct('kvm_coalesced_mmio_zone', 16, {
  addr: [0, u64], size: [8, u32], pio: [12, u32],
} as const);

/** One coalesced write: where, how wide, and the bytes (pio: a port rather than MMIO). */
export const kvmCoalescedMmio = struct('kvm_coalesced_mmio', 24, {
  physAddr: [0, u64], len: [8, u32], pio: [12, u32], data: [16, bytes(8)],
} as const);
/** A `struct kvm_coalesced_mmio` as a JavaScript object: each field by its name in camelCase. */
export type CoalescedMmio = StructValue<(typeof kvmCoalescedMmio)['fields']>;

/** The ring header; entries follow it (kvm_coalesced_mmio_ring). */
export const kvmCoalescedMmioRing = struct('kvm_coalesced_mmio_ring', 8, { first: [0, u32], last: [4, u32] } as const);

/** Every struct above, for the layout test. */
export const allStructs = [
  kvmRegs, kvmSegment, kvmDtable, kvmSregs, kvmFpu, kvmMsrEntry, kvmCpuidEntry2, kvmLapicState, kvmXcr,
  kvmVcpuEvents, kvmMpState, kvmDebugregs, kvmGuestDebug, kvmTranslation, kvmInterrupt, kvmPitConfig,
  kvmPitChannelState, kvmPitState2, kvmIrqchip, kvmIrqLevel, kvmMsi, kvmIrqRoutingEntry, kvmIrqfd,
  kvmIoeventfd, kvmClockData, kvmEnableCap, kvmNestedStateHeader, kvmDirtyGfn, kvmCoalescedMmioZone, kvmCoalescedMmio,
  kvmCoalescedMmioRing,
];
