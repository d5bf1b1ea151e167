// Constants from <linux/kvm.h>, by their kernel names. test/kvm/layout.test.ts checks every one
// against the headers the addon was built with.

/** kvm_run.exit_reason values (KVM_EXIT_*). */
export const ExitReason = {
  Unknown: 0,
  Exception: 1,
  Io: 2,
  Hypercall: 3,
  Debug: 4,
  Hlt: 5,
  Mmio: 6,
  IrqWindowOpen: 7,
  Shutdown: 8,
  FailEntry: 9,
  Intr: 10,
  SetTpr: 11,
  TprAccess: 12,
  Nmi: 16,
  InternalError: 17,
  SystemEvent: 24,
  IoapicEoi: 26,
  Hyperv: 27,
  X86Rdmsr: 29,
  X86Wrmsr: 30,
  DirtyRingFull: 31,
  ApResetHold: 32,
  X86BusLock: 33,
  Notify: 37,
} as const;
/** A KVM_EXIT_* number of ExitReason. */
export type ExitReasonNumber = (typeof ExitReason)[keyof typeof ExitReason];

/** KVM_EXIT_IO_IN / KVM_EXIT_IO_OUT. */
export const IoDirection = { In: 0, Out: 1 } as const;

/** KVM_CAP_* numbers for checkExtension() and enableCap(). */
export const Cap = {
  Irqchip: 0,
  Hlt: 1,
  UserMemory: 3,
  SetTssAddr: 4,
  ExtCpuid: 7,
  NrVcpus: 9,
  NrMemslots: 10,
  Pit: 11,
  MpState: 14,
  CoalescedMmio: 15,
  IrqRouting: 25,
  Irqfd: 32,
  Pit2: 33,
  SetIdentityMapAddr: 37,
  AdjustClock: 39,
  VcpuEvents: 41,
  Ioeventfd: 36,
  SetGuestDebug: 23,
  Debugregs: 50,
  Xsave: 55,
  Xcrs: 56,
  TscControl: 60,
  GetTscKhz: 61,
  MaxVcpus: 66,
  TscDeadlineTimer: 72,
  SignalMsi: 77,
  ReadonlyMem: 81,
  IrqfdResample: 82,
  KvmclockCtrl: 76,
  SplitIrqchip: 121,
  MultiAddressSpace: 118,
  X2apicApi: 129,
  MaxVcpuId: 128,
  HypervEnlightenedVmcs: 163,
  ImmediateExit: 136,
  GetMsrFeatures: 153,
  NestedState: 157,
  SyncRegs: 74,
  CoalescedPio: 162,
  ManualDirtyLogProtect2: 168,
  X86UserSpaceMsr: 188,
  X86DisableExits: 143,
  ExitOnEmulationFailure: 204,
  DirtyLogRing: 192,
  Xsave2: 208,
  DirtyLogRingAcqRel: 223,
} as const;
/** A KVM_CAP_* number of Cap. */
export type CapNumber = (typeof Cap)[keyof typeof Cap];

/** KVM_MEM_* memory region flags. */
export const MemoryFlag = { LogDirtyPages: 1, Readonly: 2 } as const;

/** Flags for enableCap(Cap.ManualDirtyLogProtect2, [flags]). */
export const DirtyLogManual = { ProtectEnable: 1, InitiallySet: 2 } as const;

/** KVM_IRQCHIP_* chip ids for getIrqChip()/setIrqChip(). */
export const IrqChip = { PicMaster: 0, PicSlave: 1, Ioapic: 2 } as const;

/** KVM_IRQ_ROUTING_* entry types. */
export const IrqRoutingType = { Irqchip: 1, Msi: 2 } as const;

/** KVM_PIT_SPEAKER_DUMMY, for createPit2({ speakerDummy }). */
export const PIT_SPEAKER_DUMMY = 1;

/** KVM_MP_STATE_* values. */
export const MpState = {
  Runnable: 0,
  Uninitialized: 1,
  InitReceived: 2,
  Halted: 3,
  SipiReceived: 4,
} as const;

/** KVM_GUESTDBG_* flags for setGuestDebug(). */
export const GuestDebugFlag = {
  Enable: 0x1,
  Singlestep: 0x2,
  UseSwBp: 0x10000,
  UseHwBp: 0x20000,
  InjectDb: 0x40000,
  InjectBp: 0x80000,
} as const;

/** KVM_SYSTEM_EVENT_* types in a 'system-event' exit. */
export const SystemEventType = { Shutdown: 1, Reset: 2, Crash: 3 } as const;

/** KVM_INTERNAL_ERROR_* suberrors. */
export const InternalErrorSuberror = { Emulation: 1, SimulEx: 2, DeliveryEv: 3 } as const;

/** KVM_VCPUEVENT_VALID_* flags in kvm_vcpu_events.flags. */
export const VcpuEventValid = {
  NmiPending: 0x1,
  SipiVector: 0x2,
  Shadow: 0x4,
  Smm: 0x8,
  Payload: 0x10,
  TripleFault: 0x20,
} as const;

/** KVM_CLOCK_* flags in kvm_clock_data. */
export const ClockFlag = { TscStable: 2, Realtime: 4, HostTsc: 8 } as const;

/** kvm_dirty_gfn flags, for the dirty ring. */
export const DirtyGfnFlag = { Dirty: 1, Reset: 2 } as const;

/** KVM_COALESCED_MMIO_PAGE_OFFSET: the coalesced MMIO/PIO ring's page in a vCPU's mapping (x86). */
export const COALESCED_MMIO_PAGE_OFFSET = 2;

/** KVM_DIRTY_LOG_PAGE_OFFSET: the dirty ring's mmap offset in a vCPU fd, in pages. */
export const DIRTY_LOG_PAGE_OFFSET = 64;

/** KVM_IRQFD_FLAG_* in kvm_irqfd.flags. */
export const IrqfdFlag = { Deassign: 1, Resample: 2 } as const;

/** KVM_IOEVENTFD_FLAG_* in kvm_ioeventfd.flags. */
export const IoeventfdFlag = { Datamatch: 1, Pio: 2, Deassign: 4 } as const;

/** x86 MSR indices a VMM saves, restores or sets up. */
export const Msr = {
  IA32_TSC: 0x10,
  IA32_APIC_BASE: 0x1b,
  IA32_FEATURE_CONTROL: 0x3a,
  IA32_TSC_ADJUST: 0x3b,
  IA32_SPEC_CTRL: 0x48,
  IA32_ARCH_CAPABILITIES: 0x10a,
  IA32_SYSENTER_CS: 0x174,
  IA32_SYSENTER_ESP: 0x175,
  IA32_SYSENTER_EIP: 0x176,
  IA32_MISC_ENABLE: 0x1a0,
  IA32_PAT: 0x277,
  IA32_TSC_DEADLINE: 0x6e0,
  IA32_EFER: 0xc0000080,
  IA32_STAR: 0xc0000081,
  IA32_LSTAR: 0xc0000082,
  IA32_CSTAR: 0xc0000083,
  IA32_FMASK: 0xc0000084,
  IA32_FS_BASE: 0xc0000100,
  IA32_GS_BASE: 0xc0000101,
  IA32_KERNEL_GS_BASE: 0xc0000102,
  IA32_TSC_AUX: 0xc0000103,
  KVM_SYSTEM_TIME_NEW: 0x4b564d01,
  KVM_WALL_CLOCK_NEW: 0x4b564d00,
  KVM_ASYNC_PF_EN: 0x4b564d02,
  KVM_STEAL_TIME: 0x4b564d03,
  KVM_PV_EOI_EN: 0x4b564d04,
  KVM_POLL_CONTROL: 0x4b564d05,
  KVM_ASYNC_PF_INT: 0x4b564d06,
} as const;

/** Guest page size for memory slots and dirty logs. */
export const PAGE_SIZE = 4096;
