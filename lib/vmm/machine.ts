// A machine: a VM, its guest RAM, its devices and one thread per vCPU, through its lifecycle
// (created, running, paused, stopping, stopped). The main thread only controls (start, pause,
// resume, stop, serial input); each vCPU thread runs and handles its own exits. Building one is
// builder.ts's; snapshots and migrations are lib/migration's, over the few internals
// machineInternals() lends.
import { EventEmitter } from 'node:events';
import { readFileSync } from 'node:fs';
import { receiveMessageOnPort, type MessagePort } from 'node:worker_threads';
import { isBzImage, planBoot, writeBootPlan, type BootPlan, type MultibootModule } from '../boot/index.js';
import type { ByteRing } from '../devices/byte-ring.js';
import { VIRTIO_FIRST_GSI, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE } from '../devices/virtio-mmio.js';
import { argTypeError, argValueError, systemError } from '../kvm/errors.js';
import { GuestMemory, kickVcpu, type Kvm, type Vm, type VcpuKickHandle, type Regs, type Sregs, type Fpu } from '../kvm/index.js';
import { restoreParkedVcpu, saveParkedVcpu } from '../kvm/vcpu.js';
import { buildParts, disksMismatch, RAM_SLOT, type MachineParts, type SerialOutputTarget } from './builder.js';
import {
  checkMemoryBytes, checkVcpus, describeShape, type BuildPlan, type MachineConfig, type MultibootModuleConfig, type MachineRunState, type MachineShape, type MachineState, type CpuState,
} from './config.js';
import { createConsole, type ConsoleFeed, type MachineConsole } from './console.js';
import { HALTED, PARKED, RunState, STATE, ringDoorbell, setRunState, stoppedAtTimes } from './control.js';
import { MachineDevices, type DeviceStates, type DeviceStatesAhead } from './devices.js';
import { DirtyBitmap } from './dirty-bitmap.js';
import { DirtyTracker, type DirtyLogMode } from './dirty-tracker.js';
import { createExitStatsBuffer, readExitStats, type ExitStats } from './exit-stats.js';
import { openTraceFile } from './exit-trace.js';
import { closeSync } from 'node:fs';
import { HaltWatch, isStuckState } from './halt-watch.js';
import { checkDiskConfigs } from './disks.js';
import { VsockHost } from './vsock-host.js';
import { checkVirtioConfig, virtioMismatch, virtioShape, virtioSlotCount } from './virtio-devices.js';
import { checkNetConfigs } from './nets.js';
import { abortError, fromThreadFailure, machineStateError, threadFailure } from './errors.js';
import { VcpuStateFlag, VcpuStateTag, vcpuSaveInputs, vcpuStateBlobHeader, vcpuStateBlobSections, type VcpuSaveInputs } from '../kvm/vcpu-state-blob.js';
import type { VcpuThread } from './pool.js';
import type { MachineExit, StateWriteOut, StateWrittenOut, VcpuReply, VcpuRequest, VcpuRequestBody, WorkerMessage } from './types.js';
import { vcpuStateFromRaw, type RawVcpuState, type VcpuState } from './vcpu-state.js';
import { restoreVmState, saveRawVmState, vmStateFromRaw, type VmState } from './vm-state.js';
import { VcpuThrottle } from './throttle.js';
import { markPhase, phaseTimingEnabled } from './phase-timing.js';
import { writeStateOut } from './state-write-out.js';

export type { MachineExit, MachineExitReason } from './types.js';
export type { RawVcpuState, VcpuState } from './vcpu-state.js';
export type { RawVmState, VmState } from './vm-state.js';
export type { DiskConfig, DiskShape } from './disks.js';
export type { NetConfig, NetShape } from './nets.js';
export type { DeviceStates } from './devices.js';
export type { ExitStats, VcpuExitStats, ExitCount } from './exit-stats.js';
export {
  MAX_MEMORY_BYTES, MAX_VCPUS, type MachineConfig, type MachineRuntimeConfig, type MachineRunState, type MachineShape, type MachineState, type CpuState,
  type MultibootModuleConfig,
} from './config.js';
export type { MachineConsole } from './console.js';

/** The events a Machine emits, each with its listener's arguments. */
export interface MachineEvents {
  /** The machine has ended and released everything (state 'stopped'); wait() resolves with the same exit. */
  exit: [exit: MachineExit];
  /** The running guest has paused (pause(), a snapshot or migration pausing it, or a debugger's breakpoint or step): state 'paused'. */
  paused: [];
  /** The paused guest runs again (resume()): state 'running'. */
  resumed: [];
  /** reset() has rebooted the guest (before it resolves; a running guest resumes just after). */
  reset: [];
}

/** The machine's lifecycle states, in the order of RunState (control.ts). */
const RUN_STATES: readonly MachineRunState[] = ['created', 'running', 'paused', 'stopping', 'stopped'];

const MIB = 1024 * 1024;
/** How long after its first start() a machine makes its RAM's ArrayBuffer (see #exposeMemorySoon()). */
const EXPOSE_MEMORY_AFTER_MS = 50;
/** Work for a little after the next machine of this thread starts (see afterNextMachineStart()). */
const afterNextStart: ((machine: Machine) => void)[] = [];

/**
 * Runs `work(machine)` once, a little after the next machine of this thread is started with start()
 * (with its RAM's ArrayBuffer: see #exposeMemorySoon()); a throw is ignored. Not after the start of a
 * machine a migration or a restore brought in: its process is busy then (a post-copy destination
 * serves the guest's page faults on its main thread). For rehearsals of what later operations on a
 * machine run, paid while a guest runs instead of inside them: lib/migration registers its
 * source's as it loads, so the first machine a process boots runs it.
 */
export function afterNextMachineStart(work: (machine: Machine) => void): void {
  afterNextStart.push(work);
}

/** How long a pause that saves the vCPUs for a migration waits for them with the main thread blocked. */
const PAUSE_BLOCKING_WAIT_MS = 2;
/** A write-out of the vCPU state as a live migration's stop asks for one, to no fd: for warm-ups. */
const NO_FD_WRITE_OUT: StateWriteOut = { fd: -1, prefix: new Uint8Array(0), vmRecordType: 0, vcpuRecordType: 0 };

/**
 * What snapshots and migrations (lib/migration) need of a machine beyond its public face. Lent by
 * machineInternals(); the machine never calls them itself.
 */
export interface MachineInternals {
  readonly log: (message: string) => void;
  /**
   * Pauses the running machine; with `saveVcpus`, each vCPU's state is saved as it stops and
   * comes back with the pause (one round trip to the vCPU threads less).
   */
  pause(saveVcpus: boolean, writeOut?: StateWriteOut, writtenOut?: (out: StateWrittenOut | null) => void): Promise<RawVcpuState[] | null>;
  /** The whole state (the machine paused or not yet started), with the vCPU states given if any. */
  saveState(vcpuStates?: RawVcpuState[] | null): Promise<MachineState>;
  /** saveState() but the devices' (a migration sends that first), with the vCPU states given if any. */
  saveCpuState(vcpuStates?: RawVcpuState[] | null): Promise<CpuState>;
  /** The devices' state (the machine paused or not yet started): the rest of saveState(). */
  saveDeviceState(): DeviceStates;
  /** The devices' state a migration sends ahead of its pause, the guest running on (MachineDevices.saveStateAhead()). */
  saveDeviceStateAhead(): DeviceStatesAhead & Pick<DeviceStates, 'serial' | 'postCode'>;
  /** Puts a saved state on this machine (built with the same shape, not yet started). */
  applyState(state: MachineState): Promise<void>;
  /** applyState() in two steps, the devices' state last: a migration applies the first while the second comes. */
  applyCpuState(state: CpuState): Promise<void>;
  /** `appliedAhead`: devices left as applyDeviceStateAhead() put them (their state unchanged since). */
  applyDeviceState(devices: DeviceStates, appliedAhead?: ReadonlySet<string>): void;
  /** A migration's devices' state sent ahead of its pause, put on this machine (not yet started) before the rest comes. */
  applyDeviceStateAhead(part: DeviceStatesAhead): void;
  /**
   * start({ paused }), calling `onRunning` at the moment the vCPUs are set running, just before
   * their threads wake (a migration's answer). A `rehearsal` makes only its checks and starts
   * nothing: V8 compiles a function at its first call, and a migration's destination makes that
   * call before its downtime rather than inside it.
   */
  start(paused: boolean, onRunning: (() => void) | null, rehearsal?: boolean): void;
  /**
   * Has every vCPU thread save its state once, between two runs, and the VM and devices theirs: a
   * save inside a later downtime then runs warm code. The state (stale at once: the guest runs
   * on) serves to warm what sends it; null if a vCPU did not answer soon.
   */
  warmUpSave(): Promise<MachineState | null>;
  /**
   * Stops the guest a moment it does not see (as the halt watch does: no event, clocks and disks
   * running on) the way a migration's stop does: each vCPU asked for its state and to write it out
   * (to no fd) as it stops, the main thread waiting for them blocked. V8 then has that path
   * compiled before a first migration's pause. Whether every vCPU answered; false, with nothing
   * stopped, unless the machine runs with no snapshot or migration under way.
   */
  warmUpPause(): Promise<boolean>;
  /**
   * The machine's dirty tracker, started for `owner` (a new one if another owner had it): which
   * pages changed since the last harvest, the guest's writes and the VMM's own.
   */
  startDirtyTracking(owner: string): DirtyTracker;
  /** Who has the dirty tracker, if anyone. */
  readonly dirtyTrackingOwner: string | null;
  stopDirtyTracking(): void;
  /** Takes the disk images' locks; throws if another machine holds one. */
  lockDisks(): void;
  /** lockDisks(), tried again for up to `waitMs` while another machine holds an image. */
  lockDisksWithin(waitMs: number): Promise<void>;
  /** Lets go of the disk images' locks, keeping them open (the machine paused, its disks flushed). */
  unlockDisks(): void;
  /** How many virtio devices (disks and others) the machine has: each has a thread that may raise interrupts. */
  readonly virtioDeviceCount: number;
  /** The fds a migration on this host hands over, in slot order: disk images (with their locks) and TAPs. */
  handoverFds(): { disks: number[]; net: number[] };
  /** Ends the machine with this exit (a migration's source: 'migrated'). */
  end(exit: MachineExit): void;
  /**
   * While set, resume() (and reset()) throw ERR_MACHINE_STATE with this reason: a post-copy
   * source's guest may run elsewhere. null lifts it; stop() is never refused.
   */
  refuseResume(reason: string | null): void;
  /** The reason refuseResume() set, or null. */
  readonly resumeRefusal: string | null;
  /** Runs `work` as the machine's one long operation (a snapshot, a migration) at a time. */
  exclusive<T>(what: string, work: () => Promise<T>): Promise<T>;
  /**
   * A debugger's request to one vCPU (lib/debug): served while it is parked, or (kicked) between
   * two runs for the guest-debug settings.
   */
  vcpuRequest(vcpuId: number, request: VcpuRequestBody): Promise<VcpuReply>;
  /** Who hears of debug exits, once the vCPU that took one has paused the machine (null: nobody). */
  onDebugStop(listener: ((stop: DebugStop) => void) | null): void;
  /**
   * Runs `work` (an inspection: registers, memory) with every vCPU stopped: a running machine is
   * paused quietly for it (no 'paused' or 'resumed' event, its clocks and disks run on, state
   * still 'running') and runs again after; a paused or created one stays as it is.
   */
  stopped<T>(work: () => Promise<T>): Promise<T>;
  /**
   * The vCPU throttle (a migration's auto-converge, throttle.ts): set(percent) has each vCPU
   * sleep that share (0..99) of every 10 ms, 0 ends it (so does the machine's end); prepare()
   * starts its ticker thread ahead; the share now, and how long the vCPUs were throttled (ms).
   */
  readonly vcpuThrottle: VcpuThrottle;
}

/** A vCPU's KVM_EXIT_DEBUG: which vCPU, the exception (1: #DB, 3: #BP), its DR6 (which breakpoint, or a step) and RIP. */
export interface DebugStop {
  vcpu: number;
  exception: number;
  dr6: bigint;
  pc: bigint;
  /** That vCPU's registers as it stopped. */
  state?: { regs: Regs; sregs: Sregs; fpu: Fpu };
}

let internalsOf!: (machine: Machine) => MachineInternals;
let assemble!: (parts: MachineParts) => Machine;

/** The internals of `machine` that persistence needs (not part of the package's public API). */
export function machineInternals(machine: Machine): MachineInternals {
  if (!(machine instanceof Machine)) throw argTypeError('machine must be a Machine');
  return internalsOf(machine);
}

/**
 * A machine from a build plan: booted from an image, or created straight into a saved state
 * (lib/migration builds its restored and incoming machines here).
 */
export async function buildMachine(plan: BuildPlan): Promise<Machine> {
  if (plan.signal !== undefined && !(plan.signal instanceof AbortSignal)) throw argTypeError('signal must be an AbortSignal');
  const parts = await buildParts(plan);
  try {
    return assemble(parts);
  } catch (error) {
    await parts.dispose();
    throw error;
  }
}

export declare interface Machine {
  /** Once the machine has ended and released everything (state 'stopped'). */
  on(event: 'exit', listener: (exit: MachineExit) => void): this;
  /** Each time the running guest has paused: pause() (just before it resolves), or a snapshot or migration pausing it. */
  on(event: 'paused', listener: () => void): this;
  /** Each time the paused guest runs again: resume() (before it returns). */
  on(event: 'resumed', listener: () => void): this;
  /** Each time reset() has rebooted the guest (before it resolves). */
  on(event: 'reset', listener: () => void): this;
  /** As on('exit'), for the one exit. */
  once(event: 'exit', listener: (exit: MachineExit) => void): this;
  /** As on('paused'), for the next pause only. */
  once(event: 'paused', listener: () => void): this;
  /** As on('resumed'), for the next resume only. */
  once(event: 'resumed', listener: () => void): this;
  /** As on('reset'), for the next reboot only. */
  once(event: 'reset', listener: () => void): this;
  /** Removes a listener on('exit') added. */
  off(event: 'exit', listener: (exit: MachineExit) => void): this;
  /** Removes a listener on('paused') added. */
  off(event: 'paused', listener: () => void): this;
  /** Removes a listener on('resumed') added. */
  off(event: 'resumed', listener: () => void): this;
  /** Removes a listener on('reset') added. */
  off(event: 'reset', listener: () => void): this;
}

/**
 * A virtual machine with one thread per vCPU. Its life (`state`):
 *
 *     created --start()--> running --pause()--> paused --resume()--> running
 *     created --start({ paused: true })--> paused
 *     created | running | paused --stop(), the guest's exit, a migration away--> stopping --> stopped
 *
 * - 'stopping' lasts while the vCPU threads leave and the VM, guest RAM, disks and threads are
 *   released; 'stopped' follows once all are, before wait() resolves and 'exit' is emitted.
 * - 'paused' is emitted when pause() has parked every vCPU (before pause() resolves), 'resumed'
 *   when resume() has set the guest running (before it returns); start() emits neither.
 * - A call the state does not allow throws (or rejects) with code ERR_MACHINE_STATE and a message
 *   that names the state: start() unless created, pause() unless running, resume() unless
 *   paused, saveState() unless created or paused, writeMemory() and sendSerialInput() once
 *   stopping or stopped. stop() is allowed in every state: once the machine is ending, it
 *   resolves with the exit it ends with, as wait() does.
 */
export class Machine extends EventEmitter {
  readonly vcpuCount: number;
  readonly memoryBytes: number;
  /** How the guest was booted; null for a machine restored from a snapshot or a migration. */
  readonly boot: BootPlan | null;
  readonly irqchip: boolean;
  readonly dirtyLogMode: DirtyLogMode;
  readonly #kvm: Kvm;
  readonly #vm: Vm;
  readonly #memory: GuestMemory;
  readonly #dirty: DirtyBitmap;
  /** What a reboot puts back (a booted machine's; null for a restored or received one). */
  readonly #powerOn: { vm: VmState | null; devices: DeviceStates } | null;
  readonly #control: Int32Array;
  readonly #threads: VcpuThread[];
  /** Resolve as each vCPU thread leaves this machine's assignment (or ends). */
  readonly #threadsLeft: Promise<void>[];
  readonly #kicks: VcpuKickHandle[];
  /** With the irqchip: finds a guest halted for good (halt-watch.ts). */
  readonly #haltWatch: HaltWatch | null;
  /** A pause the owner does not see (#whileStopped: the halt watch's check, a debugger's read). */
  #quietPause: Promise<void> | null = null;
  /** Why resume() is refused now (machineInternals().refuseResume), if it is. */
  #resumeRefusal: string | null = null;
  readonly #requestPorts: MessagePort[];
  /** The CPUID each vCPU holds, as a kvm_cpuid2, where known (null: ask KVM). */
  readonly #cpuids: (Uint8Array | null)[];
  /** Per vCPU, what saving it on this thread needs (saveParkedVcpu): from its thread's last save; null until one, and after a restore. */
  readonly #saveInputs: (VcpuSaveInputs | null)[];
  readonly #pendingRequests = new Map<number, { resolve: (reply: VcpuReply) => void; reject: (error: Error) => void }>();
  #requestSeq = 0;
  #debugListener: ((stop: DebugStop) => void) | null = null;
  readonly #pool: MachineParts['plan']['runtime']['pool'];
  readonly #devices: MachineDevices;
  readonly #log: (message: string) => void;
  /** Serial output bound for the console or a stream (or discarded): the vCPU threads fill it, we drain it. */
  readonly #outputRing: ByteRing | null;
  readonly #outputTarget: SerialOutputTarget | null;
  readonly #console: MachineConsole;
  readonly #consoleFeed: ConsoleFeed;
  readonly #input: NodeJS.ReadableStream | null;
  readonly #onInput: (chunk: Buffer | string) => void;
  #tracker: DirtyTracker | null = null;
  readonly #throttle: VcpuThrottle;
  /** Each vCPU's exit counters, once counting started. */
  #exitStats: SharedArrayBuffer[] | null = null;
  #traceFd: number | null = null;
  #tracePath: string | null = null;
  /** Stopped traces' files, open until every vCPU has let go of them. */
  readonly #tracesClosing = new Set<number>();
  #trackerOwner: string | null = null;
  /** A snapshot or migration is under way: one at a time. */
  #busy: string | null = null;
  #exit: MachineExit | null = null;
  #tornDown = false;
  #finished: Promise<MachineExit>;
  #finish!: (exit: MachineExit) => void;

  static {
    internalsOf = (machine) => machine.#internals();
    assemble = (parts) => {
      const { exitStats, traceExits } = parts.plan.runtime;
      if (traceExits !== undefined && (typeof traceExits !== 'string' || traceExits === '')) throw argTypeError('traceExits must be a file path');
      // Before the machine exists: a file that cannot be made fails the build, which releases the rest.
      const trace = traceExits === undefined ? null : openTraceFile(traceExits, parts.threads.length);
      const machine = new Machine(parts);
      if (parts.plan.state) machine.#devices.restoreState(parts.plan.state.devices);
      machine.#watch();
      parts.threadsReady?.catch((error: Error) => machine.#end({ reason: 'error', detail: error.message }));
      if (trace) void machine.#startTrace(trace, traceExits!);
      if (exitStats) void machine.startExitStats();
      return machine;
    };
  }

  private constructor(parts: MachineParts) {
    super();
    this.#outputTarget = parts.outputTarget;
    this.#kvm = parts.kvm;
    this.#vm = parts.vm;
    this.#memory = parts.memory;
    this.#dirty = parts.dirty;
    this.#control = parts.control;
    this.#threads = parts.threads;
    this.#threadsLeft = parts.threadsLeft;
    this.#kicks = parts.kicks;
    this.#haltWatch = parts.haltProbe
      ? new HaltWatch(parts.haltProbe, { vcpus: parts.threads.length, kick: () => this.#kickAll(), confirm: () => void this.#confirmHalt() })
      : null;
    this.#requestPorts = parts.requestPorts;
    this.#cpuids = parts.cpuids;
    this.#saveInputs = parts.cpuids.map(() => null);
    this.#throttle = new VcpuThrottle(parts.control, parts.kicks);
    this.#pool = parts.plan.runtime.pool;
    this.#log = parts.log;
    this.#outputRing = parts.outputRing;
    this.boot = parts.plan.boot;
    this.irqchip = parts.plan.shape.irqchip;
    this.dirtyLogMode = parts.dirtyLog;
    this.vcpuCount = parts.threads.length;
    this.memoryBytes = parts.memory.size;
    const vm = parts.vm;
    this.#devices = new MachineDevices(parts.devices, parts.virtio, this.irqchip ? (gsi, level) => vm.setIrqLine(gsi, level) : null);
    this.#powerOn = parts.plan.boot ? { vm: parts.powerOnVm, devices: this.#devices.saveState() } : null;
    this.#finished = new Promise((resolve) => (this.#finish = resolve));
    this.#input = parts.plan.runtime.serial?.input ?? null;
    const vsock = parts.plan.runtime.vsock;
    this.vsock = vsock ? new VsockHost(vsock.uds) : null;
    this.#onInput = (chunk) => {
      this.#devices.serial.receive(typeof chunk === 'string' ? Buffer.from(chunk) : chunk);
    };
    const { console, feed } = createConsole({
      type: (bytes) => this.#devices.serial.receive(bytes),
      refusal: () => (this.#exit ? machineStateError(`machine is ${this.state}: its console takes no more input`) : null),
    });
    this.#console = console;
    this.#consoleFeed = feed;
    for (const port of this.#requestPorts) {
      port.on('message', (reply: VcpuReply) => this.#onReply(reply));
      port.unref();
    }
  }

  /**
   * Validates the image, builds the VM and starts one thread per vCPU (all before the guest
   * runs). A bad image fails here, before any VM exists. An image, initrd or module that cannot be read
   * rejects with the file system's code ('ENOENT') and its error as cause; `config.signal`
   * aborts the build (code ABORT_ERR, once everything it took is given back).
   */
  static async create(config: MachineConfig): Promise<Machine> {
    if (typeof config !== 'object' || config === null) throw argTypeError('config must be an object');
    const signal = config.signal;
    if (signal !== undefined && !(signal instanceof AbortSignal)) throw argTypeError('signal must be an AbortSignal');
    if (signal?.aborted) throw abortError(signal, 'the machine was not built: aborted');
    const memoryBytes = checkMemoryBytes(config.memoryBytes ?? 64 * MIB);
    const vcpus = checkVcpus(config.vcpus ?? 1);
    const image = typeof config.image === 'string' ? readFile(config.image, 'image') : config.image;
    if (!(image instanceof Uint8Array)) throw argTypeError('image must be a Uint8Array or a file path');
    const initrd = typeof config.initrd === 'string' ? readFile(config.initrd, 'initrd') : config.initrd;
    if (initrd !== undefined && !(initrd instanceof Uint8Array)) throw argTypeError('initrd must be a Uint8Array or a file path');
    const modules = config.modules === undefined ? undefined : readModules(config.modules);
    const disks = checkDiskConfigs(config.disks);
    const virtio = checkVirtioConfig(disks, config.rng, checkNetConfigs(config.net), config.vsock);
    const linux = isBzImage(image);
    // Linux finds virtio-mmio devices on its command line (as with QEMU microvm and Firecracker).
    let cmdline = config.cmdline;
    if (linux && virtioSlotCount(virtio) > 0) {
      const devices = Array.from({ length: virtioSlotCount(virtio) }, (_, slot) => `virtio_mmio.device=4K@0x${(VIRTIO_MMIO_BASE + slot * VIRTIO_MMIO_SIZE).toString(16)}:${VIRTIO_FIRST_GSI + slot}`);
      cmdline = [cmdline, ...devices].filter((part) => part).join(' ');
    }
    // Every PC has its interrupt controllers and timer; with them, the plan also writes the ACPI
    // and MP tables that describe them.
    const irqchip = config.irqchip ?? true;
    const boot = planBoot(image, { memoryBytes, vcpus, mode: config.mode, loadAddr: config.loadAddr, cmdline, initrd, modules, irqchip });
    return buildMachine({
      shape: { memoryBytes, vcpus, irqchip, ...virtioShape(virtio) },
      boot,
      cmdline,
      memory: (size) => GuestMemory.create(size, { backing: 'memfd' }),
      runtime: config,
      signal,
    });
  }

  /** Where the machine is in its life: see the class's description for the transitions. */
  get state(): MachineRunState {
    const state = Atomics.load(this.#control, STATE);
    // The halt watch's quiet pause is not the owner's: to the owner the guest runs.
    if (state === RunState.Paused && this.#quietPause) return 'running';
    return RUN_STATES[state]!;
  }

  /**
   * The serial console (COM1) as a stream this machine owns. Reading it gives the guest's output
   * when the machine was given no `serial.output` (it ends once the machine has stopped and all
   * of it was read; output nobody reads is kept up to 64 KiB, the oldest dropped first, and the
   * guest never waits for a reader). Writing to it types into COM1.
   */
  get console(): MachineConsole {
    return this.#console;
  }

  /**
   * The host end of the machine's vsock device (null without one): connect(port) to the guest's
   * listeners, listen(port) for its connections to the host. Programs outside this process speak
   * the same protocol on the device's unix socket (vsock.uds).
   */
  readonly vsock: VsockHost | null;

  /** The hardware: what a snapshot or a migration needs to rebuild this machine elsewhere. */
  get shape(): MachineShape {
    const shape: MachineShape = { memoryBytes: this.memoryBytes, vcpus: this.vcpuCount, irqchip: this.irqchip };
    if (this.#devices.virtio.diskShapes.length > 0) shape.disks = this.#devices.virtio.diskShapes;
    Object.assign(shape, this.#devices.virtio.shape);
    return shape;
  }

  /** Guest RAM, shared with the guest (no copy). Write through writeMemory() so migrations see it. */
  get memory(): GuestMemory {
    return this.#memory;
  }

  /** The VMM's own dirty bitmap: every write our code makes to guest RAM is marked here. */
  get vmmDirtyBitmap(): DirtyBitmap {
    return this.#dirty;
  }

  /**
   * Writes guest RAM from the VMM and marks the pages dirty, so snapshots and migrations carry
   * them. Refused (ERR_MACHINE_STATE) once the machine is stopping or stopped.
   */
  writeMemory(guestPhysAddr: number, data: Uint8Array): void {
    if (this.#exit) throw machineStateError(`machine is ${this.state}: its memory is released`);
    this.#memory.write(guestPhysAddr, data);
    this.#dirty.mark(guestPhysAddr, data.length);
  }

  /** Unknown port and MMIO accesses the guest has made. */
  get unknownAccesses(): { ports: number; mmio: number } {
    const { ports, mmio } = this.#devices.unknownAccesses;
    return { ports, mmio };
  }

  /** The last POST code the guest wrote to port 0x80, and how many writes it made there. */
  get postCode(): { last: number; writes: number } {
    return { last: this.#devices.postCode.lastCode, writes: this.#devices.postCode.writes };
  }

  /**
   * Bytes for the guest's COM1 (as if typed); returns how many fitted in its input buffer.
   * Refused (ERR_MACHINE_STATE) once the machine is stopping or stopped.
   */
  sendSerialInput(bytes: Uint8Array): number {
    if (!(bytes instanceof Uint8Array)) throw argTypeError('bytes must be a Uint8Array');
    if (this.#exit) throw machineStateError(`machine is ${this.state}: it takes no more serial input`);
    return this.#devices.serial.receive(bytes);
  }

  /** Resolves with the exit once the machine has ended and released everything. */
  wait(): Promise<MachineExit> {
    return this.#finished;
  }

  /**
   * Runs the guest (created -> running); with `{ paused: true }`, sets it up paused instead
   * (created -> paused; resume() runs it). Throws ERR_MACHINE_STATE unless created.
   */
  start(options: { paused?: boolean } = {}): void {
    if (typeof options !== 'object' || options === null) throw argTypeError('options must be an object');
    this.#start(options.paused === true, null);
    // After #exposeMemorySoon()'s timer (same delay, set first).
    if (afterNextStart.length > 0) setTimeout(() => this.#runAfterStartWork(), EXPOSE_MEMORY_AFTER_MS).unref();
  }

  /** The work afterNextMachineStart() holds, each once; a throw is ignored. */
  #runAfterStartWork(): void {
    for (const work of afterNextStart.splice(0)) {
      try {
        work(this);
      } catch {
        // Only ahead of time.
      }
    }
  }

  /**
   * `onRunning`: called at the moment the vCPUs are set running (or paused), just before their
   * threads are woken, and before the rest of the bookkeeping.
   */
  #start(paused: boolean, onRunning: (() => void) | null, rehearsal = false): void {
    if (Atomics.load(this.#control, STATE) !== RunState.Created) throw machineStateError(`machine is ${this.state}, not created`);
    if (rehearsal) return;
    // A migration's destination answers here, nothing left that can fail: its write goes before
    // the vCPU threads wake, which on a busy host would take the CPU from it first. What follows
    // is not the guest's downtime.
    onRunning?.();
    setRunState(this.#control, paused ? RunState.Paused : RunState.Running);
    if (this.#input) {
      this.#input.on('data', this.#onInput);
      this.#input.resume();
    }
    if (!paused) {
      this.#devices.virtio.resume();
      this.#haltWatch?.start();
      this.#devices.runTimers();
    }
    this.#exposeMemorySoon();
  }

  /**
   * Makes guest RAM's ArrayBuffer a little after the machine first runs. V8 counts a large
   * external ArrayBuffer into its old generation and marks the whole JavaScript heap when one
   * appears (25 ms of marking steps on the main thread for a 40 MB heap): paid here, in the
   * background, it is not paid inside the first migration's or snapshot's rounds. Not at build:
   * a restore or a boot would wait for it.
   */
  #exposeMemorySoon(): void {
    setTimeout(() => {
      try {
        if (!this.#exit) void this.memory.buffer;
      } catch {
        // Only ahead of time: the first reader makes it, and hears why it cannot be made.
      }
    }, EXPOSE_MEMORY_AFTER_MS).unref();
  }

  /**
   * Stops every vCPU at its next exit (kicking those inside the guest) and waits until all are
   * parked and the disks idle (running -> paused); emits 'paused' just before it resolves.
   * Rejects with ERR_MACHINE_STATE unless running, or if the machine is resumed or stopped
   * before every vCPU has parked.
   */
  async pause(): Promise<void> {
    await this.#pause(false);
  }

  /**
   * Every vCPU answered the halt watch that it is halted for good: pause (quietly: no event, no
   * disks paused), check their saved states while none runs, and end with status 0 if all still
   * are, or run on.
   */
  async #confirmHalt(): Promise<void> {
    // A snapshot or migration under way pauses the machine itself: ask again later. A machine not
    // running has its watch started again when it runs.
    if (this.#busy) {
      this.#haltWatch!.start();
      return;
    }
    await this.#whileStopped(async (states) => {
      if (states?.every((raw) => isStuckState(vcpuStateFromRaw(raw)))) this.#end({ reason: 'hlt', code: 0, vcpu: 0 });
    }, { saveVcpus: true }).catch(() => {
      // Stopped meanwhile: nothing left to check.
    });
  }

  /**
   * pause(); with `saveVcpus`, each vCPU thread is also asked for its state as it stops, and
   * serves that at the kick's exit or as it parks (the machine is paused by then, so the state is
   * final): the states come back with the pause, one round trip to the threads less inside a
   * migration's downtime.
   */
  async #pause(saveVcpus: boolean, options: { quiet?: boolean; writeOut?: StateWriteOut; writtenOut?: (out: StateWrittenOut | null) => void } = {}): Promise<RawVcpuState[] | null> {
    // A pause of the owner's waits out the halt watch's (the guest may end meanwhile).
    if (!options.quiet) while (this.#quietPause) await this.#quietPause;
    if (Atomics.load(this.#control, STATE) !== RunState.Running) throw machineStateError(`machine is ${this.state}, not running`);
    this.#haltWatch?.stop();
    setRunState(this.#control, RunState.Paused);
    // A one-vCPU machine whose state goes out as it stops (writeOut) has its vCPU saved on this
    // thread once it has parked, where what that needs is known from an earlier save (a migration's
    // warm-up): no round trip to the vCPU's thread, and this thread goes on at once to what
    // follows (a migration's devices and last pages) rather than waking for that thread's answer
    // (0.2 ms here).
    const writeOut = saveVcpus && this.vcpuCount === 1 ? options.writeOut ?? null : null;
    const saveInputs = writeOut ? this.#saveInputs[0] : null;
    // Else each thread saves: asked only now that the machine is paused, so a thread that serves
    // it has run for the last time; and before the kick, so that each thread has it at the kick's
    // exit rather than parking first and being woken for it (0.1-0.15 ms here).
    const saved = saveVcpus && !saveInputs ? this.#saveVcpus() : null;
    saved?.catch(() => {});
    // Kicked at once: the kick's exit is the longest wait of the pause (0.2 ms here), and what
    // follows is done meanwhile rather than before it (0.09 ms).
    this.#kickAll();
    // The halt watch's pause is a moment the guest does not see: its clocks run on.
    if (!options.quiet) this.#devices.haltTimers();
    // The owner's pause, or a quiet one that stops as a migration does (its state written out).
    await this.#parkAll(saveVcpus && (!options.quiet || options.writeOut) ? PAUSE_BLOCKING_WAIT_MS : 0, true);
    markPhase('vCPUs parked');
    let written: RawVcpuState[] | null = null;
    if (writeOut) {
      const state = saveInputs ? this.#saveHere(saveInputs) : (await saved!)[0]!;
      options.writtenOut?.(this.#writeOut(state, writeOut));
      written = [state];
    } else if (options.writeOut) {
      options.writtenOut?.(null);
    }
    // The halt watch reads the vCPUs' states only: the disks run on.
    if (options.quiet) return written ?? (saved ? await saved : null);
    // The disks after the vCPUs: no new request can come, and the ones under way finish (their
    // writes into guest RAM marked dirty) before anyone saves the state.
    await this.#devices.virtio.pause();
    const vcpuStates = written ?? (saved ? await saved : null);
    if (Atomics.load(this.#control, STATE) !== RunState.Paused) throw machineStateError(`machine is ${this.state}, not paused`);
    this.emit('paused');
    return vcpuStates;
  }

  #onReply(reply: VcpuReply): void {
    const pending = this.#pendingRequests.get(reply.seq);
    this.#pendingRequests.delete(reply.seq);
    pending?.resolve(reply);
  }

  /**
   * Kicks the vCPUs until every one is parked on the paused state; throws if it ends meanwhile.
   * `blockMs`: first wait that long at most with this thread blocked (see #waitParkedBlocking()).
   */
  async #parkAll(blockMs = 0, kicked = false): Promise<void> {
    if (!kicked) this.#kickAll();
    if (blockMs > 0) this.#waitParkedBlocking(blockMs);
    while (Atomics.load(this.#control, PARKED) < this.vcpuCount && Atomics.load(this.#control, STATE) === RunState.Paused) {
      const parked = Atomics.load(this.#control, PARKED);
      const result = Atomics.waitAsync(this.#control, PARKED, parked, 50);
      if (result.async) await result.value;
      this.#kickAll();
    }
    if (Atomics.load(this.#control, STATE) !== RunState.Paused) throw machineStateError(`machine is ${this.state}, not paused`);
  }

  /**
   * Waits for the kicked vCPUs to park with this thread blocked, for `ms` at most, then takes the
   * replies they posted before parking (their saved states) at once: inside a migration's
   * downtime, two turns of the event loop (the park's notification, each reply's message) would
   * come on top of the wait itself (the kick's exit and the vCPU's save: 0.25 ms here).
   */
  #waitParkedBlocking(ms: number): void {
    const deadline = performance.now() + ms;
    for (;;) {
      const parked = Atomics.load(this.#control, PARKED);
      if (parked >= this.vcpuCount || Atomics.load(this.#control, STATE) !== RunState.Paused) break;
      const left = deadline - performance.now();
      if (left <= 0) break;
      Atomics.wait(this.#control, PARKED, parked, left);
    }
    for (const port of this.#requestPorts) {
      for (let received = receiveMessageOnPort(port); received; received = receiveMessageOnPort(port)) this.#onReply(received.message as VcpuReply);
    }
  }

  /** A vCPU took a debug exit and paused the machine (control.ts pauseFromVcpu): park the rest, then tell the debugger. */
  async #debugStopped(stop: DebugStop): Promise<void> {
    this.#haltWatch?.stop();
    try {
      await this.#parkAll();
      await this.#devices.virtio.pause();
    } catch {
      return; // ended meanwhile
    }
    if (Atomics.load(this.#control, STATE) !== RunState.Paused) return;
    this.emit('paused');
    this.#debugListener?.(stop);
  }

  /**
   * Starts counting exits per vCPU and reason (a no-op when counting already): see exitStats().
   * Each vCPU starts at its next exit to the VMM (it is kicked for it); the promise resolves once
   * every vCPU that runs has.
   */
  async startExitStats(): Promise<void> {
    if (this.#exitStats || this.#exit) return;
    const buffers = this.#requestPorts.map(() => createExitStatsBuffer());
    this.#exitStats = buffers;
    await this.#askEveryVcpu((id) => ({ type: 'exit-stats', buffer: buffers[id]! }));
  }

  /**
   * Exit statistics, like `perf kvm stat`: per vCPU, exits by KVM reason, port I/O by port and
   * direction, MMIO by 4 KiB page, each with a count and the time the VMM spent handling them,
   * since counting started (MachineConfig.exitStats, or startExitStats()); `enabled` false and
   * nothing counted before. Counting costs a clock read or two per exit; not counting costs nothing.
   */
  exitStats(): ExitStats {
    return readExitStats(this.#exitStats ?? this.#requestPorts.map(() => null));
  }

  /**
   * Sets every count and time back to zero (`since`: now) and counts on: each vCPU takes fresh
   * counters at its next exit to the VMM (it is kicked for it; that kick is not counted). Resolves
   * once every vCPU that runs has; a machine that does not count stays so.
   */
  async resetExitStats(): Promise<void> {
    if (!this.#exitStats || this.#exit) return;
    const buffers = this.#requestPorts.map(() => createExitStatsBuffer());
    this.#exitStats = buffers;
    await this.#askEveryVcpu((id) => ({ type: 'exit-stats', buffer: buffers[id]! }));
  }

  /**
   * Starts writing every exit to the file `path` (replaced if it exists), as
   * MachineConfig.traceExits does from the start: each vCPU from its next exit to the VMM (it is
   * kicked for it; that kick is not traced). Resolves once every vCPU that runs has started.
   * Throws ERR_MACHINE_STATE while a trace is written already, or the machine is ending; a file
   * that cannot be created throws with the file system's code.
   */
  async startExitTrace(path: string): Promise<void> {
    if (typeof path !== 'string' || path === '') throw argTypeError('path must be a file path');
    if (this.#exit) throw machineStateError(`machine is ${this.state}: it has no exits left to trace`);
    if (this.#tracePath !== null) throw machineStateError(`the machine writes an exit trace to ${this.#tracePath} already`);
    const trace = openTraceFile(path, this.vcpuCount);
    await this.#startTrace(trace, path);
  }

  /**
   * Stops the exit trace: each vCPU writes out what it holds at its next exit to the VMM (it is
   * kicked for it) and runs on without tracing. Resolves with the file's path once every vCPU
   * that runs has (one halted without an irqchip wrote its records as it halted), the file
   * complete; null when no trace was being written.
   */
  async stopExitTrace(): Promise<string | null> {
    const fd = this.#traceFd;
    const path = this.#tracePath;
    if (fd === null || this.#exit) return null;
    this.#traceFd = null;
    this.#tracePath = null;
    // Closed once no vCPU holds it any more (or at the machine's end).
    this.#tracesClosing.add(fd);
    const { all } = await this.#askEveryVcpu(() => ({ type: 'exit-trace', fd: null, startMs: 0 }));
    void all.then(() => {
      if (this.#tracesClosing.delete(fd)) closeSync(fd);
    });
    return path;
  }

  /** Where the exit trace is being written (MachineConfig.traceExits, startExitTrace()); null: nowhere. */
  get exitTracePath(): string | null {
    return this.#tracePath;
  }

  #startTrace({ fd, startMs }: { fd: number; startMs: number }, path: string): Promise<unknown> {
    this.#traceFd = fd;
    this.#tracePath = path;
    return this.#askEveryVcpu(() => ({ type: 'exit-trace', fd, startMs }));
  }

  /**
   * Sends each vCPU its request (kicked to take it at its next exit) and resolves once every vCPU
   * that runs has answered; one halted without an irqchip answers only as it wakes, before it
   * runs again. `all`: every answer.
   */
  async #askEveryVcpu(request: (vcpuId: number) => VcpuRequestBody): Promise<{ all: Promise<unknown> }> {
    let answered = 0;
    const replies = this.#requestPorts.map((_, id) => {
      const reply = this.#request(id, request(id));
      kickVcpu(this.#kicks[id]!);
      reply.then(() => void answered++, () => {});
      return reply;
    });
    const all = Promise.allSettled(replies);
    while (answered < this.vcpuCount - Atomics.load(this.#control, HALTED) && !this.#exit) {
      await Promise.race([all, new Promise((resolve) => setTimeout(resolve, 20))]);
    }
    return { all };
  }

  /**
   * Runs the paused guest again (paused -> running) and emits 'resumed' before it returns.
   * Throws ERR_MACHINE_STATE unless paused, and while a post-copy migration holds the guest
   * (from the moment its state went out, also after migrate() failed with EPOSTCOPY: the guest
   * may run at the destination).
   */
  resume(): void {
    if (this.#resumeRefusal !== null) throw machineStateError(this.#resumeRefusal);
    if (Atomics.load(this.#control, STATE) !== RunState.Paused || this.#quietPause) throw machineStateError(`machine is ${this.state}, not paused`);
    this.#devices.virtio.resume();
    setRunState(this.#control, RunState.Running);
    this.#haltWatch?.start();
    this.#devices.runTimers();
    this.emit('resumed');
  }

  /**
   * Reboots the guest, as QEMU's `system_reset` does: every vCPU, the interrupt controllers, the PIT
   * and the devices go back to their state at power-on (virtio devices to reset, as their drivers
   * must set them up again), guest RAM is cleared and the image loaded again, and the guest starts
   * over from its entry point. The RTC keeps the time; the console keeps what it printed. A running
   * machine is paused for it ('paused', 'reset', 'resumed'); a paused one stays paused. Only a
   * machine booted from an image can reboot: a restored or received one rejects with
   * ERR_MACHINE_STATE, and so does one busy with a snapshot or migration.
   */
  async reset(): Promise<void> {
    const powerOn = this.#powerOn;
    const boot = this.boot;
    if (!powerOn || !boot) throw machineStateError('this machine was restored or received: it has no image to boot again');
    return this.#exclusive('reset', async () => {
      if (this.#resumeRefusal !== null) throw machineStateError(this.#resumeRefusal);
      const state = Atomics.load(this.#control, STATE);
      if (state !== RunState.Running && state !== RunState.Paused) throw machineStateError(`machine is ${this.state}, not running`);
      const wasRunning = state === RunState.Running;
      if (wasRunning) await this.#pause(false);
      // RAM as at power-on: cleared (the pages given back), then the image again. All of it
      // changed, as far as a later migration is concerned.
      // (On libuv's pool: freeing a populated GiB takes the kernel 70 ms. The guest is paused.)
      await this.#memory.dontneedAsync(0, this.#memory.size);
      writeBootPlan(boot, this.#memory);
      this.#dirty.markPages(0, this.#memory.size / 4096);
      if (powerOn.vm) {
        // The clock runs on: only the interrupt controllers and the PIT go back.
        restoreVmState(this.#vm, { ...powerOn.vm, clock: this.#vm.getClock() }, this.irqchip);
      }
      await Promise.all(this.#threads.map(async (_, id) => {
        const reply = await this.#request(id, { type: 'reboot' });
        if (reply.type === 'failed') throw fromThreadFailure(`vCPU ${id}: cannot reboot: `, reply);
      }));
      const { cmosRtc: _time, ...devices } = powerOn.devices;
      this.#devices.restoreState(devices);
      this.emit('reset');
      if (wasRunning) this.resume();
    });
  }

  /**
   * Ends the machine (created, running or paused -> stopping -> stopped) and resolves with its
   * exit once everything is released. Once the machine is ending already (stopped before, or
   * the guest exited), it resolves with that exit.
   */
  async stop(): Promise<MachineExit> {
    this.#end({ reason: 'stopped' });
    return this.#finished;
  }

  /**
   * The state of every vCPU, the VM and the devices. The machine must be paused (or not yet
   * started): a running vCPU's state would be stale at once. Rejects with ERR_MACHINE_STATE in
   * any other state.
   */
  async saveState(): Promise<MachineState> {
    // The raw forms are for streams; a caller gets the structured ones, as before.
    const state = await this.#saveState(null);
    return {
      ...state,
      vm: state.vm instanceof Uint8Array ? vmStateFromRaw(state.vm) : state.vm,
      vcpus: state.vcpus.map((vcpu) => (vcpu instanceof Uint8Array ? vcpuStateFromRaw(vcpu) : vcpu)),
    };
  }

  #internals(): MachineInternals {
    const machine = this;
    return {
      log: this.#log,
      pause: (saveVcpus, writeOut, writtenOut) => this.#pause(saveVcpus, { writeOut, writtenOut }),
      saveState: (vcpuStates) => this.#saveState(vcpuStates ?? null),
      saveCpuState: (vcpuStates) => this.#saveCpuState(vcpuStates ?? null),
      saveDeviceState: () => this.#devices.saveState(),
      saveDeviceStateAhead: () => {
        if (this.#exit) throw machineStateError(`machine is ${this.state}: it has no state left to save`);
        return this.#devices.saveStateAhead();
      },
      applyState: (state) => this.#applyState(state),
      applyCpuState: (state) => this.#applyCpuState(state),
      applyDeviceState: (devices, appliedAhead) => this.#applyDeviceState(devices, appliedAhead),
      applyDeviceStateAhead: (part) => {
        if (this.state !== 'created') throw machineStateError(`machine is ${this.state}: a state goes only on a machine not yet started`);
        this.#devices.restorePart(part);
      },
      start: (paused, onRunning, rehearsal) => this.#start(paused, onRunning, rehearsal),
      warmUpSave: () => this.#warmUpSave(),
      // Not while a snapshot or migration is under way: it pauses the machine itself.
      warmUpPause: async () => this.#busy === null && (await this.#whileStopped(async (states) => states !== null, { saveVcpus: true, writeOut: NO_FD_WRITE_OUT })),
      startDirtyTracking: (owner) => this.#startDirtyTracking(owner),
      get dirtyTrackingOwner() {
        return machine.#trackerOwner;
      },
      stopDirtyTracking: () => this.#stopDirtyTracking(),
      lockDisks: () => this.#devices.virtio.lock(),
      lockDisksWithin: (waitMs) => this.#devices.virtio.lockWithin(waitMs),
      unlockDisks: () => this.#devices.virtio.unlock(),
      virtioDeviceCount: this.#devices.virtio.count,
      handoverFds: () => this.#devices.virtio.handoverFds(),
      end: (exit) => this.#end(exit),
      refuseResume: (reason) => void (this.#resumeRefusal = reason),
      get resumeRefusal() {
        return machine.#resumeRefusal;
      },
      exclusive: (what, work) => this.#exclusive(what, work),
      vcpuRequest: async (vcpuId, request) => {
        const reply = this.#request(vcpuId, request);
        kickVcpu(this.#kicks[vcpuId]!);
        return reply;
      },
      onDebugStop: (listener) => void (this.#debugListener = listener),
      stopped: (work) => this.#whileStopped(work),
      vcpuThrottle: this.#throttle,
    };
  }

  /**
   * Runs `work` with every vCPU stopped (given their states with `saveVcpus`), in a pause the owner
   * does not see: no events, the state still 'running', clocks and disks running on; the owner's
   * own pause waits it out. The guest runs on afterwards unless `work` ended the machine. A machine
   * that is not running is not paused for it (`work` gets no states).
   */
  async #whileStopped<T>(work: (vcpus: RawVcpuState[] | null) => Promise<T>, options: { saveVcpus?: boolean; writeOut?: StateWriteOut } = {}): Promise<T> {
    while (this.#quietPause) await this.#quietPause;
    if (Atomics.load(this.#control, STATE) !== RunState.Running) return work(null);
    let done!: () => void;
    this.#quietPause = new Promise((resolve) => (done = resolve));
    try {
      const vcpus = await this.#pause(options.saveVcpus === true, { quiet: true, writeOut: options.writeOut });
      try {
        return await work(vcpus);
      } finally {
        if (Atomics.load(this.#control, STATE) === RunState.Paused) {
          setRunState(this.#control, RunState.Running);
          this.#haltWatch?.start();
        }
      }
    } finally {
      this.#quietPause = null;
      done();
    }
  }

  /** saveState(), with the vCPU states saved as the machine paused (#pause(true)) if given. */
  async #saveState(vcpuStates: RawVcpuState[] | null): Promise<MachineState> {
    return { ...(await this.#saveCpuState(vcpuStates)), devices: this.#devices.saveState() };
  }

  async #saveCpuState(vcpuStates: RawVcpuState[] | null): Promise<CpuState> {
    const state = this.state;
    if (state === 'running') throw machineStateError('machine is running: pause it before saving its state');
    if (state !== 'paused' && state !== 'created') throw machineStateError(`machine is ${state}: it has no state left to save`);
    const vcpus = vcpuStates ?? await this.#saveVcpus();
    return { shape: this.shape, vm: saveRawVmState(this.#vm, this.irqchip), vcpus };
  }

  /** Each vCPU's state from its thread (the save also tells this thread what a save here needs). */
  async #saveVcpus(): Promise<RawVcpuState[]> {
    const states = await Promise.all(this.#requestPorts.map(async (_, id) => {
      const reply = await this.#request(id, { type: 'save' });
      if (reply.type === 'failed') throw fromThreadFailure(`vCPU ${id}: cannot save its state: `, reply);
      if (reply.type !== 'saved') throw fromThreadFailure(`vCPU ${id}: cannot save its state: `, { error: `it answered '${reply.type}'` });
      this.#saveInputs[id] = vcpuSaveInputs(reply.state);
      return reply.state;
    }));
    this.#markStopped();
    return states;
  }

  /**
   * The one vCPU's state, saved on this thread while its own is parked (saveParkedVcpu), with the
   * MSRs and CPUID its thread's last save read.
   */
  #saveHere(inputs: VcpuSaveInputs): RawVcpuState {
    let state: RawVcpuState;
    try {
      state = saveParkedVcpu(this.#kicks[0]!, inputs.msrIndices, inputs.cpuid, { lapic: this.irqchip, vmmHalted: Atomics.load(this.#control, HALTED) > 0 });
    } catch (error) {
      throw fromThreadFailure('vCPU 0: cannot save its state: ', threadFailure(error));
    }
    this.#markStopped();
    return state;
  }

  /** Saves the VM's state and writes it and the vCPU's `state` out (state-write-out.ts). */
  #writeOut(state: RawVcpuState, writeOut: StateWriteOut): StateWrittenOut {
    const written = writeStateOut(this.#vm, this.irqchip, state, writeOut);
    if (written.atMs !== undefined) markPhase('VM and vCPU state written', written.atMs);
    return written;
  }

  /** With phase timing: the moment the guest stopped running, its last vCPU out (a pause's kick). */
  #markStopped(): void {
    if (!phaseTimingEnabled()) return;
    const stoppedAt = stoppedAtTimes(this.#control);
    let last = 0;
    for (let id = 0; id < this.vcpuCount; id++) {
      last = Math.max(last, stoppedAt[id]!);
      stoppedAt[id] = 0;
    }
    if (last > 0) markPhase('vCPUs stopped', last);
  }

  async #applyState(state: MachineState): Promise<void> {
    await this.#applyCpuState(state);
    this.#applyDeviceState(state.devices);
  }

  async #applyCpuState(state: CpuState): Promise<void> {
    const mine = this.shape;
    if (state.shape.memoryBytes !== mine.memoryBytes || state.shape.vcpus !== mine.vcpus || state.shape.irqchip !== mine.irqchip) {
      throw argValueError(`the saved state is for ${describeShape(state.shape)}, this machine is ${describeShape(mine)}`);
    }
    const fit = disksMismatch(state.shape.disks, mine.disks);
    if (fit) throw argValueError(`the saved state does not fit this machine's disks: ${fit}`);
    const devicesFit = virtioMismatch(state.shape, mine);
    if (devicesFit) throw argValueError(`the saved state does not fit this machine's devices: ${devicesFit}`);
    if (state.vcpus.length !== this.vcpuCount) throw argValueError(`the saved state has ${state.vcpus.length} vCPU states for ${this.vcpuCount} vCPUs`);
    // What the vCPUs hold now (their CPUID, the MSRs this host reads) is learnt again at their next save.
    this.#saveInputs.fill(null);
    restoreVmState(this.#vm, state.vm, this.irqchip);
    markPhase('VM state applied');
    const raw = state.vcpus.every((vcpu) => vcpu instanceof Uint8Array);
    if (raw && Atomics.load(this.#control, STATE) === RunState.Created) {
      // Not yet started: every vCPU thread is parked, so this thread restores them itself
      // (restoreParkedVcpu), sparing a round trip to each inside a migration's downtime. Each
      // thread hears what its vCPU now has before it first runs (its messages come before start()'s).
      (state.vcpus as RawVcpuState[]).forEach((vcpuState, id) => {
        let refused: number[];
        try {
          // Compared with the CPUID the vCPU holds: KVM's own answer differs from what it was given
          // (it folds in runtime bits), which would cost a KVM_SET_CPUID2 every time.
          refused = restoreParkedVcpu(this.#kicks[id]!, vcpuState, this.#cpuids[id] ?? null, this.irqchip);
        } catch (error) {
          throw fromThreadFailure(`vCPU ${id}: cannot restore its state: `, threadFailure(error));
        }
        if (refused.length > 0) this.#log(`vcpu${id}: the host refused MSRs ${refused.map((index) => `0x${index.toString(16)}`).join(', ')}`);
        const cpuid = vcpuStateBlobSections(vcpuState).get(VcpuStateTag.Cpuid)?.slice() ?? null;
        if (cpuid) this.#cpuids[id] = cpuid;
        const vmmHalted = (vcpuStateBlobHeader(vcpuState).flags & VcpuStateFlag.VmmHalted) !== 0;
        // Not woken for it: a thread woken now would take a CPU from the rest of the downtime.
        this.#request(id, { type: 'restored', cpuid, vmmHalted }, false).catch(() => {});
      });
    } else {
      await Promise.all(state.vcpus.map(async (vcpuState, id) => {
        const reply = await this.#request(id, { type: 'restore', state: vcpuState });
        // (MSRs the host refused are logged by the vCPU's thread.)
        if (reply.type === 'failed') throw fromThreadFailure(`vCPU ${id}: cannot restore its state: `, reply);
        // What the vCPU holds now is known only to its thread.
        this.#cpuids[id] = null;
      }));
    }
    markPhase('vCPU states applied');
  }

  #applyDeviceState(devices: DeviceStates, appliedAhead?: ReadonlySet<string>): void {
    this.#devices.restoreState(devices, appliedAhead);
    markPhase('device states applied');
  }

  /** `wake` false: the thread reads it at its next wake-up (start() rings for it), not at once. */
  #request(vcpuId: number, request: VcpuRequestBody, wake = true): Promise<VcpuReply> {
    if (this.#exit) return Promise.reject(machineStateError(`machine is ${this.state}: its vCPUs are gone`));
    const seq = ++this.#requestSeq;
    return new Promise((resolve, reject) => {
      this.#pendingRequests.set(seq, { resolve, reject });
      this.#requestPorts[vcpuId]!.ref();
      this.#requestPorts[vcpuId]!.postMessage({ ...request, seq } satisfies VcpuRequest);
      if (wake) ringDoorbell(this.#control);
    }).finally(() => {
      // Only an awaited reply may keep the process alive.
      if (this.#pendingRequests.size === 0) for (const port of this.#requestPorts) port.unref();
    }) as Promise<VcpuReply>;
  }

  async #warmUpSave(): Promise<MachineState | null> {
    // A vCPU that does not answer soon (halted without an irqchip) is simply not warmed.
    const vcpus = await Promise.all(this.#requestPorts.map((_, id) => {
      const reply = this.#request(id, { type: 'save' });
      kickVcpu(this.#kicks[id]!);
      return Promise.race([reply.catch(() => undefined), new Promise<undefined>((resolve) => setTimeout(() => resolve(undefined), 100).unref())]);
    }));
    if (this.#exit) return null;
    // The rest of a save too, the guest running on: a state to warm the code that sends it with.
    const states = vcpus.map((reply) => (reply?.type === 'saved' ? reply.state : null));
    states.forEach((state, id) => {
      if (state) this.#saveInputs[id] = vcpuSaveInputs(state);
    });
    if (states.some((state) => state === null)) return null;
    // What a live migration's pause writes out, to no fd (a one-vCPU machine's).
    if (this.vcpuCount === 1) writeStateOut(this.#vm, this.irqchip, states[0]!, NO_FD_WRITE_OUT);
    return { shape: this.shape, vm: saveRawVmState(this.#vm, this.irqchip), vcpus: states as RawVcpuState[], devices: this.#devices.saveState() };
  }

  async #exclusive<T>(what: string, work: () => Promise<T>): Promise<T> {
    if (this.#busy) throw machineStateError(`a ${this.#busy} is already under way`);
    if (this.#exit) throw machineStateError(`machine is ${this.state}, not running`);
    this.#busy = what;
    try {
      return await work();
    } finally {
      this.#busy = null;
    }
  }

  #startDirtyTracking(owner: string): DirtyTracker {
    if (this.#tracker && this.#trackerOwner !== owner) this.#stopDirtyTracking();
    if (!this.#tracker) {
      this.#tracker = new DirtyTracker({
        vm: this.#vm,
        slots: [{ slot: RAM_SLOT, guestPhysAddr: 0, memory: this.#memory }],
        mode: this.dirtyLogMode,
        vmmDirty: this.#dirty,
        vcpus: this.#kicks,
      });
      this.#tracker.start();
    }
    this.#trackerOwner = owner;
    return this.#tracker;
  }

  #stopDirtyTracking(): void {
    this.#tracker?.stop();
    this.#tracker = null;
    this.#trackerOwner = null;
  }

  #kickAll(): void {
    for (const kick of this.#kicks) kickVcpu(kick);
  }

  #end(exit: MachineExit): void {
    if (this.#exit) return;
    this.#exit = exit;
    this.#haltWatch?.stop();
    this.#throttle.set(0);
    setRunState(this.#control, RunState.Stopping);
    this.#devices.haltTimers();
    this.#kickAll();
    void this.#teardown();
  }

  readonly #onWorkerMessage = (message: WorkerMessage) => {
    if (message.type === 'exit') this.#end(message.exit);
    else if (message.type === 'debug-stop') void this.#debugStopped({ vcpu: message.vcpuId, exception: message.exception, dr6: message.dr6, pc: message.pc, state: message.state });
    else if (message.type === 'log') this.#log(message.message);
  };
  readonly #onWorkerError = (error: Error) => this.#end({ reason: 'error', detail: error.message });

  #watch(): void {
    for (const thread of this.#threads) {
      thread.worker.on('message', this.#onWorkerMessage);
      thread.worker.on('error', this.#onWorkerError);
    }
    if (this.#outputRing) void this.#pumpOutput();
  }

  async #pumpOutput(): Promise<void> {
    const ring = this.#outputRing!;
    // Drained whether or not anyone reads (the console keeps what it may), so that a vCPU never
    // waits for room. Teardown drains what is left itself, so the output is complete before the
    // exit event.
    while (!this.#tornDown) {
      await ring.waitForData(100);
      this.#forwardOutput(ring.drain());
    }
  }

  #forwardOutput(bytes: Uint8Array): void {
    if (bytes.length === 0) return;
    const target = this.#outputTarget;
    if (target?.kind === 'console') this.#consoleFeed.deliver(bytes);
    else if (target?.kind === 'stream') target.stream.write(bytes);
  }

  async #teardown(): Promise<void> {
    // Every vCPU thread leaves its loop (kicked, Stopping) and closes its vCPU; only then is it
    // safe to close the VM and hand the threads back.
    const kickUntilDone = setInterval(() => this.#kickAll(), 20);
    try {
      await Promise.all(this.#threadsLeft);
    } finally {
      clearInterval(kickUntilDone);
    }
    for (const thread of this.#threads) {
      thread.worker.off('message', this.#onWorkerMessage);
      thread.worker.off('error', this.#onWorkerError);
    }
    for (const pending of this.#pendingRequests.values()) pending.reject(machineStateError('machine is stopping: its vCPUs are gone'));
    this.#pendingRequests.clear();
    for (const port of this.#requestPorts) port.close();
    if (this.#input) this.#input.off('data', this.#onInput);
    await this.#devices.virtio.close();
    if (this.#traceFd !== null) closeSync(this.#traceFd);
    for (const fd of this.#tracesClosing) closeSync(fd);
    this.#tracesClosing.clear();
    this.#tracker = null;
    // Guest RAM goes after the VM: no vCPU is left, and KVM then has no slot over it.
    await this.#vm.closeAsync();
    this.#memory.close();
    this.#kvm.close();
    if (this.#pool) this.#pool.release(this.#threads);
    else for (const thread of this.#threads) thread.send({ type: 'quit' });
    this.#tornDown = true;
    if (this.#outputRing) {
      this.#outputRing.wake();
      this.#forwardOutput(this.#outputRing.drain());
    }
    this.#consoleFeed.end();
    const unknown = this.#devices.unknownAccesses;
    if (unknown.ports > 0 || unknown.mmio > 0) {
      const count = (n: number, one: string, many: string) => `${n} ${n === 1 ? one : many}`;
      this.#log(`the guest made ${count(unknown.ports, 'access', 'accesses')} to ${count(unknown.distinctPorts, 'unknown port', 'unknown ports')} and ${count(unknown.mmio, 'unknown MMIO access', 'unknown MMIO accesses')}`);
    }
    const exit = this.#exit!;
    setRunState(this.#control, RunState.Stopped);
    this.#finish(exit);
    this.emit('exit', exit);
  }
}

/** A guest file's bytes; an error keeps the file system's code ('ENOENT') and has its error as cause. */
function readFile(file: string, what: 'image' | 'initrd' | 'Multiboot module'): Uint8Array {
  try {
    return readFileSync(file);
  } catch (error) {
    const e = error as NodeJS.ErrnoException;
    throw systemError(`cannot read the ${what} ${file}: ${e.code ?? e.message}`, error);
  }
}

/** MachineConfig.modules with their files read; a path is the string of a module given none. */
function readModules(modules: MultibootModuleConfig[]): MultibootModule[] {
  if (!Array.isArray(modules)) throw argTypeError('modules must be an array of { data, cmdline }');
  return modules.map((module, index) => {
    if (typeof module !== 'object' || module === null) throw argTypeError(`modules[${index}] must be an object { data, cmdline }`);
    const { data, cmdline } = module;
    if (typeof data === 'string') return { data: readFile(data, 'Multiboot module'), cmdline: cmdline ?? data };
    if (!(data instanceof Uint8Array)) throw argTypeError(`modules[${index}].data must be a Uint8Array or a file path`);
    return { data, cmdline };
  });
}
