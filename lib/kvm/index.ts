// The typed KVM binding. Usable on its own, without the VMM.
export { Kvm, KVM_API_VERSION } from './kvm.js';
export { Vm, type MemoryRegion, type GsiRoute, type IoeventfdOptions, type Fd } from './vm.js';
export {
  Vcpu, kickVcpu, harvestDirtyRing, adoptVcpu, closeReleasedVcpu, type ReleasedVcpu, type VcpuKickHandle, type GuestDebugOptions, type Translation,
} from './vcpu.js';
export { GuestMemory, type GuestMemoryHandle, type GuestMemoryOptions, type GuestMemoryBacking, type MapFileOptions } from './memory.js';
export { EventFd, type EventFdOptions } from './eventfd.js';
export { setThreadName, setThreadAffinity, setThreadBatch } from './thread.js';
export { watchFd, type FdWatch } from './fd-watch.js';
export { Userfaultfd } from './userfaultfd.js';
export { openTap, adoptTap, type Tap, type OpenTapOptions } from './tap.js';
export { KvmError, NodeKvmError, ErrorCode } from './errors.js';
export { KvmRun, KvmRunOffset } from './kvm-run.js';
export { decodeExit, type VcpuExit } from './exit.js';
export { encodeCpuid, encodeMsrs } from './lists.js';
export * from './constants.js';
export * as structs from './structs.js';
export type {
  Regs, Sregs, Segment, Dtable, Fpu, MsrEntry, CpuidEntry, LapicState, Xcr, VcpuEvents, DebugRegs,
  PitState2, PitChannelState, IrqchipState, Msi, ClockData, CoalescedMmio,
} from './structs.js';
export type { Handle } from './handle.js';
export type { FieldType, Fields, StructValue, StructType } from './struct.js';
