// Messages and shapes shared by the machine (main thread) and its vCPU threads.
import type { BootState } from '../boot/index.js';
import type { CpuidEntry, Fpu, GuestDebugOptions, MsrEntry, Regs, ReleasedVcpu, Sregs, VcpuKickHandle, GuestMemoryHandle } from '../kvm/index.js';
import type { MessagePort } from 'node:worker_threads';
import type { DevicesShared } from './devices.js';
import type { ThreadFailure } from './errors.js';
import type { RawVcpuState, VcpuState } from './vcpu-state.js';

/** Why a machine ended (MachineExit.reason). */
export type MachineExitReason =
  | 'debug-exit' // the guest wrote to the debug-exit port; `code` is the value
  | 'hlt' // every vCPU halted for good: HLT without an irqchip; with one, halted with interrupts off (halt-watch.ts)
  | 'reset' // the guest asked for a CPU reset (i8042 0xFE, or a KVM reset event)
  | 'poweroff' // the guest powered off through ACPI (SLP_EN with the _S5 type to PM1a control)
  | 'shutdown' // a triple fault, or a KVM shutdown event
  | 'internal-error' // KVM could not run the guest (emulation failure, entry failure)
  | 'unhandled-exit' // an exit this VMM does not handle
  | 'error' // the VMM itself failed
  | 'stopped' // stop() was called
  | 'migrated'; // the guest moved to another machine (migrate()), which runs it now

/** How a machine ended (machine.wait(), the 'exit' event): the reason, a debug-exit code, and for a failure the vCPU, a detail and its registers. */
export interface MachineExit {
  reason: MachineExitReason;
  /** The debug-exit value. */
  code?: number;
  /** The vCPU that caused the exit. */
  vcpu?: number;
  /** Register dump of that vCPU, for faults. */
  registers?: { regs: Regs; sregs: Sregs };
  /** Details: the KVM exit, the error message. */
  detail?: string;
}

export interface VcpuAssignment {
  vmFd: number;
  memory: GuestMemoryHandle;
  vcpuId: number;
  vcpuCount: number;
  boot: BootState | null;
  /**
   * The vCPU's CPUID and boot MSRs as the ioctls take them (encodeCpuid(), encodeMsrs()): the
   * main thread encodes them while this thread starts. Null for a restore.
   */
  cpuid: Uint8Array | null;
  msrs: Uint8Array | null;
  control: SharedArrayBuffer;
  devices: DevicesShared;
  irqchip: boolean;
  /** With the irqchip: where this vCPU answers whether it is halted for good (halt-watch.ts). */
  haltProbe: SharedArrayBuffer | null;
  affinity: number[] | null;
  /** The main thread's requests to this vCPU (save, restore), served while it is parked. */
  requests: MessagePort;
  /** The VMM's own dirty bitmap (DirtyBitmap.shared), one bit per guest page. */
  dirtyBitmap: SharedArrayBuffer;
  memoryPages: number;
  /** [slot, first guest frame] of every memory slot, for dirty-ring entries. */
  slotBasePages: [number, number][];
  /** KVM_GET_MSR_INDEX_LIST: the MSRs a saved state may hold. */
  msrIndexList: number[];
  /** A restore: the saved state this vCPU starts in (instead of boot state). */
  restore: VcpuState | RawVcpuState | null;
  /**
   * A vCPU made ahead (a spare VM's, its CPUID in `cpuid`), adopted by this thread rather than
   * created; null: the thread creates its own.
   */
  vcpu: ReleasedVcpu | null;
  /** The main thread has put `restore` (raw) on that vCPU already: this thread only notes what it holds now. */
  restoredAhead: boolean;
}

/**
 * Where a one-vCPU machine's pause (a live migration's stop-copy) writes the VM's and the vCPU's
 * saved state the moment the vCPU has parked, before the pause returns: `prefix`, then the VM's
 * raw state and the vCPU's, each a record (records.ts) of the type given, to `fd` (a socket
 * nothing else writes to meanwhile). What the socket did not take at once is left to the caller.
 */
export interface StateWriteOut {
  /** -1: a warm-up, which writes nothing. */
  fd: number;
  prefix: Uint8Array;
  vmRecordType: number;
  vcpuRecordType: number;
}

/** What a pause wrote out (StateWriteOut): how much of it went, and all of it if not all went. */
export interface StateWrittenOut {
  /** All it meant to write where some is left (writtenBytes < totalBytes), else empty. */
  bytes: Uint8Array;
  totalBytes: number;
  writtenBytes: number;
  /** The VM's raw state it saved and wrote. */
  vm: Uint8Array;
  /** With NODE_KVM_PHASE_TIMING=1: when the write returned (phase-timing.ts clock). */
  atMs?: number;
}

export type VcpuRequest =
  | { type: 'save'; seq: number }
  | { type: 'restore'; seq: number; state: VcpuState | RawVcpuState }
  /** The main thread restored this parked vCPU itself (restoreParkedVcpu): what it has now. */
  | { type: 'restored'; seq: number; cpuid: Uint8Array | null; vmmHalted: boolean }
  // A debugger's (lib/debug): registers read and written while the machine is paused, and the
  // guest-debug settings (KVM_SET_GUEST_DEBUG), also between two runs.
  | { type: 'debug-read'; seq: number }
  | { type: 'debug-write'; seq: number; regs?: Regs; sregs?: Sregs; fpu?: Fpu }
  | { type: 'guest-debug'; seq: number; options: GuestDebugOptions | null; registersAtStop?: boolean }
  // Exit statistics (exit-stats.ts: a buffer to count into, null: stop) and the exit trace
  // (exit-trace.ts: the file's fd, null: stop), taken at a kick or while parked.
  | { type: 'exit-stats'; seq: number; buffer: SharedArrayBuffer | null }
  | { type: 'exit-trace'; seq: number; fd: number | null; startMs: number }
  // A reboot (machine.reset()): the vCPU back in the state it had before it first ran.
  | { type: 'reboot'; seq: number };

/** A request without its sequence number, as the machine's side makes it. */
export type VcpuRequestBody = VcpuRequest extends infer R ? (R extends VcpuRequest ? Omit<R, 'seq'> : never) : never;

export type VcpuReply =
  | { seq: number; type: 'saved'; state: RawVcpuState }
  | { seq: number; type: 'restored'; refusedMsrs: number[] }
  | { seq: number; type: 'debug-state'; regs: Regs; sregs: Sregs; fpu: Fpu }
  | { seq: number; type: 'debug-done' }
  | { seq: number; type: 'done' }
  | ({ seq: number; type: 'failed' } & ThreadFailure);

export type WorkerMessage =
  | { type: 'idle' }
  | { type: 'ready'; vcpuId: number; kick: VcpuKickHandle }
  | { type: 'exit'; exit: MachineExit }
  /** A KVM_EXIT_DEBUG (a breakpoint or a step, with guest debugging on): this vCPU paused the machine. */
  | { type: 'debug-stop'; vcpuId: number; exception: number; dr6: bigint; pc: bigint; state?: { regs: Regs; sregs: Sregs; fpu: Fpu } }
  | { type: 'log'; message: string }
  /** The thread left its assignment; with `failure` if it could not create or run its vCPU. */
  | { type: 'done'; vcpuId: number; failure?: ThreadFailure };

export type MainMessage = { type: 'assign'; assignment: VcpuAssignment } | { type: 'quit' };
