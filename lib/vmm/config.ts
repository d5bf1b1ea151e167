// What a machine is made of, as its owner describes it (MachineConfig) and as a snapshot or a
// migration records it (MachineShape, MachineState), and the limits both are checked against.
import type { BootPlan, CpuMode } from '../boot/index.js';
import type { DiskConfig } from '../devices/virtio-blk.js';
import type { VsockConfig } from '../devices/virtio-vsock.js';
import type { GuestMemory } from '../kvm/memory.js';
import type { DeviceStates } from './devices.js';
import type { DirtyLogMode } from './dirty-tracker.js';
import type { DiskShape } from './disks.js';
import type { NetConfig, NetShape } from './nets.js';
import type { VcpuWorkerPool } from './pool.js';
import type { RawVcpuState, VcpuState } from './vcpu-state.js';
import type { RawVmState, VmState } from './vm-state.js';
import { argTypeError, outOfRangeError } from '../kvm/errors.js';

const MIB = 1024 * 1024;
/** Guest RAM above this would need the PCI hole below 4 GiB: not supported yet. */
export const MAX_MEMORY_BYTES = 3 * 1024 * MIB;
/** vCPUs of one machine at most (the xAPIC's 8-bit IDs, less the broadcast ID). */
export const MAX_VCPUS = 255;

/**
 * Where a machine is in its life (machine.state):
 * - 'created': built, its vCPUs waiting; start() runs it (or start({ paused: true }) pauses it).
 * - 'running': the guest runs; pause() parks every vCPU.
 * - 'paused': every vCPU parked, the disks idle; resume() runs it again.
 * - 'stopping': ending (stop(), the guest's own exit, a migration away): the vCPU threads leave
 *   and everything the machine holds is released.
 * - 'stopped': everything is released; wait() resolves and 'exit' is emitted after this.
 */
export type MachineRunState = 'created' | 'running' | 'paused' | 'stopping' | 'stopped';

/** How a machine runs, whatever it was built from (an image, a snapshot, a migration). */
export interface MachineRuntimeConfig {
  serial?: {
    /**
     * Where the guest's COM1 output goes. Absent (the default): the machine's console
     * (machine.console), which keeps the latest output while nobody reads it. An fd: written
     * directly from the vCPU threads (1 for this process's stdout, as before the console). A
     * stream: written from the main thread. null: discarded.
     */
    output?: number | NodeJS.WritableStream | null;
    /** Bytes from this stream reach the guest's COM1 (as does writing to machine.console). */
    input?: NodeJS.ReadableStream | null;
  };
  /** Host CPUs per vCPU (index = vCPU id). */
  affinity?: (readonly number[] | undefined)[];
  /** Borrow vCPU threads from here instead of starting new ones. */
  pool?: VcpuWorkerPool;
  /** Where the VMM's own warnings go (unknown ports, ...). Default: stderr. */
  log?: (message: string) => void;
  /** Default '/dev/kvm'. */
  kvmPath?: string;
  /**
   * How snapshots and migrations learn which pages the guest wrote: 'bitmap' (KVM_GET_DIRTY_LOG,
   * the default) or 'ring' (KVM_CAP_DIRTY_LOG_RING, where the host offers it).
   */
  dirtyLog?: DirtyLogMode;
  /** Count exits per vCPU and reason from the start (machine.exitStats()); startExitStats() turns it on later. */
  exitStats?: boolean;
  /**
   * Write every exit to this file in the binary trace format (exit-trace.ts; read it with
   * `node-kvm trace FILE` or readExitTrace()). The file is created or truncated.
   */
  traceExits?: string;
  /**
   * virtio-blk disks backed by raw image files, at virtio-mmio slots 0, 1, ... For a restore or an
   * incoming migration: where this host finds the disks the saved machine had, in the same order
   * (default: the paths the saved machine used, as with storage both hosts share).
   */
  disks?: DiskConfig[];
  /**
   * virtio-net cards over TAP devices, in the virtio-mmio slots after the disks. For a restore or an
   * incoming migration: the TAPs this host gives the saved machine's cards, in the same order
   * (required: a TAP serves one machine; the MACs are the saved ones).
   */
  net?: NetConfig[];
  /**
   * A virtio-vsock device (after the disks) with Firecracker's hybrid host side on the unix socket
   * `uds` (see machine.vsock). For a restore or an incoming migration: this host's socket (the
   * guest keeps its CID; `cid` may be left out).
   */
  vsock?: VsockConfig | { uds: string; cid?: number };
}

export interface MachineConfig extends MachineRuntimeConfig {
  /** A guest image (flat binary, ELF32/64, Multiboot, PVH or a Linux bzImage): bytes or a file path. */
  image: Uint8Array | string;
  /** Guest RAM in bytes (a multiple of 1 MiB). Default 64 MiB. */
  memoryBytes?: number;
  /** Default 1. */
  vcpus?: number;
  /** Entry mode for a flat binary (default 'real'); formats that say their own mode ignore it. */
  mode?: CpuMode;
  /** Load address of a flat binary (default 0x7c00). */
  loadAddr?: number;
  /** Kernel command line (Multiboot, PVH, Linux). */
  cmdline?: string;
  /** An initial ramdisk for a Linux bzImage (an initramfs, see buildInitramfs()): bytes or a file path. */
  initrd?: Uint8Array | string;
  /**
   * Boot modules for a Multiboot kernel, loaded in order on page boundaries above it and listed in
   * its multiboot_info (what QEMU's -initrd "FILE ARGS,FILE2 ..." gives one).
   */
  modules?: MultibootModuleConfig[];
  /**
   * In-kernel interrupt controllers and timer (PIC, IOAPIC, a local APIC per vCPU, PIT), as every
   * PC has them. Default: on. With them a vCPU halted with interrupts enabled waits for an
   * interrupt, and the machine ends (status 0) once every vCPU is halted with interrupts disabled
   * and no NMI pending, or waits for an INIT/SIPI (found within about 100 ms: halt-watch.ts).
   * Without them a HLT exits to the VMM, and the machine ends when every vCPU has halted.
   */
  irqchip?: boolean;
  /**
   * Aborts the build: Machine.create() then rejects with code ABORT_ERR once everything it took
   * (threads, fds, mappings, disks) is given back. Aborting after it resolved does nothing.
   */
  signal?: AbortSignal;
  /** A virtio-rng device (after the disks) that fills the guest's buffers from the host kernel's CSPRNG. Default false. */
  rng?: boolean;
}

/** One Multiboot module of MachineConfig.modules. */
export interface MultibootModuleConfig {
  /** The module: bytes or a file path. */
  data: Uint8Array | string;
  /** Its string: by convention its file name and arguments. Default: the path, or '' for bytes. */
  cmdline?: string;
}

/** The hardware of a machine: what another process needs to build one the state fits. */
export interface MachineShape {
  memoryBytes: number;
  vcpus: number;
  irqchip: boolean;
  /** The machine's disks (absent: none). Their contents are the host's files, not part of the state. */
  disks?: DiskShape[];
  /** A virtio-rng device after the disks (absent: none). */
  rng?: boolean;
  /** Network cards after the disks (absent: none): their MACs. The TAPs are the host's, not part of the state. */
  net?: NetShape[];
  /** A virtio-vsock device after the disks, and the guest's CID (absent: none). */
  vsock?: { cid: number };
}

/** Everything but RAM: what a snapshot or a migration carries besides memory. */
export interface MachineState {
  shape: MachineShape;
  /** Structured, or raw as Vm.saveState() writes it (RawVmState: what a migration sends). */
  vm: VmState | RawVmState;
  /** Each vCPU's, structured, or raw as the vCPU threads save it (RawVcpuState: what a migration sends). */
  vcpus: (VcpuState | RawVcpuState)[];
  devices: DeviceStates;
  /** Whether the guest was running (not paused by its owner) when the state was taken. */
  running?: boolean;
}

/**
 * A machine's state but its devices': the VM's (interrupt controllers, PIT, clock) and the
 * vCPUs'. A migration sends, checks and applies it first, the devices' state after it.
 */
export type CpuState = Omit<MachineState, 'devices'>;

/** How a machine's parts are made: from an image (boot) or for a saved state (no boot). */
export interface BuildPlan {
  shape: MachineShape;
  boot: BootPlan | null;
  /** The kernel command line the guest was booted with, for fw_cfg (a restore brings its own). */
  cmdline?: string;
  /** Makes guest RAM: a new memfd, or a copy-on-write map of a snapshot. */
  memory: (size: number) => GuestMemory | Promise<GuestMemory>;
  /**
   * Puts guest RAM over memory made ahead (a spare VM's placeholder, already in its slot), in
   * place of memory(): given, a build may take its pool's spare VM (a restore).
   */
  mapMemoryOver?: (memory: GuestMemory) => void;
  runtime: MachineRuntimeConfig;
  /** A saved state to build the machine in (a restore): each vCPU is created straight into its own. */
  state?: MachineState;
  /** The disks of a saved machine (restore, migration): opened where runtime.disks says, else at their paths. */
  savedDisks?: DiskShape[];
  /** Built to receive a migration: its disks are locked once the source has let go of them. */
  incoming?: boolean;
  /**
   * Aborts the build: buildMachine() rejects with code ABORT_ERR once everything it took is
   * given back. Aborting after it resolved does nothing.
   */
  signal?: AbortSignal;
}

export function checkMemoryBytes(memoryBytes: number): number {
  if (!Number.isSafeInteger(memoryBytes) || memoryBytes < MIB || memoryBytes % MIB !== 0) {
    throw (typeof memoryBytes === 'number' ? outOfRangeError : argTypeError)(`memoryBytes must be a positive multiple of 1 MiB, got ${String(memoryBytes)}`);
  }
  if (memoryBytes > MAX_MEMORY_BYTES) throw outOfRangeError(`memoryBytes above ${MAX_MEMORY_BYTES / MIB} MiB is not supported`);
  return memoryBytes;
}

export function checkVcpus(vcpus: number): number {
  if (!Number.isInteger(vcpus) || vcpus < 1 || vcpus > MAX_VCPUS) throw (typeof vcpus === 'number' ? outOfRangeError : argTypeError)(`vcpus must be an integer 1..${MAX_VCPUS}, got ${String(vcpus)}`);
  return vcpus;
}

export function describeShape(shape: MachineShape): string {
  return `${shape.memoryBytes / MIB} MiB, ${shape.vcpus} vCPU${shape.vcpus === 1 ? '' : 's'}, ${shape.irqchip ? 'in-kernel irqchip' : 'no irqchip'}`;
}
