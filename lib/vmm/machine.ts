// A machine: a VM, its guest RAM, its devices and one thread per vCPU. The main thread only
// controls (start, pause, resume, stop, serial input); each vCPU thread runs and handles its own
// exits.
import { EventEmitter } from 'node:events';
import { readFileSync } from 'node:fs';
import { MessageChannel, type MessagePort } from 'node:worker_threads';
import { bootMsrs, guestCpuid, isBzImage, planBoot, writeBootPlan, type BootPlan, type CpuMode } from '../boot/index.js';
import { GuestMemory, Kvm, encodeCpuid, encodeMsrs, kickVcpu, type CpuidEntry, type Vm, type VcpuKickHandle } from '../kvm/index.js';
import { PostCode, type PostCodeState } from '../devices/post-code.js';
import { Serial, type SerialState } from '../devices/serial.js';
import { DirtyBitmap } from '../migration/dirty-bitmap.js';
import { DEFAULT_DIRTY_RING_BYTES, DirtyTracker, dirtyLogModesOffered, maxDirtyRingBytes, slotBasePages } from '../migration/dirty-tracker.js';
import type { DirtyLogMode, MigrateOptions, MigrationStats, PageRange, SnapshotInfo, SnapshotOptions } from '../migration/types.js';
import { createBusShared, IoBus, unknownAccesses, type BusShared } from './bus.js';
import { ByteRing, type ByteRingShared } from './byte-ring.js';
import { PARKED, RunState, STATE, createControl, ringDoorbell, setRunState } from './control.js';
import { SERIAL_GSI, type DevicesShared } from './devices.js';
import { checkDiskConfigs, Disks, type DiskConfig, type DiskShape } from './disks.js';
import { VIRTIO_FIRST_GSI, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE, type VirtioMmioState } from '../devices/virtio-mmio.js';
import { VcpuWorkerPool, startVcpuThread, type VcpuThread } from './pool.js';
import type { MachineExit, VcpuReply, VcpuRequest, WorkerMessage } from './types.js';
import type { VcpuState } from './vcpu-state.js';
import { restoreVmState, saveVmState, type VmState } from './vm-state.js';

export type { MachineExit, MachineExitReason } from './types.js';
export type { VcpuState } from './vcpu-state.js';
export type { VmState } from './vm-state.js';
export type { DiskConfig, DiskShape } from './disks.js';

/** Guest RAM above this would need the PCI hole below 4 GiB: not supported yet. */
export const MAX_MEMORY_BYTES = 3 * 1024 ** 3;
const MIB = 1024 * 1024;
const PAGE_BYTES = 4096;
// Three pages KVM may use for the real-mode TSS, and one for the EPT identity map (Intel), just
// below the BIOS area at the top of the 32-bit space, away from guest RAM.
const TSS_ADDR = 0xfffbd000;
const IDENTITY_MAP_ADDR = 0xfffbc000;
const RAM_SLOT = 0;
/**
 * How long a migration's source tries to take its disk images back after a failure: a
 * destination on this host that failed lets go of them as it says so, or as its process ends.
 */
const DISK_RETAKE_MS = 2000;

/** How a machine runs, whatever it was built from (an image, a snapshot, a migration). */
export interface MachineRuntimeConfig {
  serial?: {
    /** An fd (written directly from the vCPU threads; default 1), a stream, or null to discard. */
    output?: number | NodeJS.WritableStream | null;
    /** Bytes from this stream reach the guest's COM1. */
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
  /**
   * virtio-blk disks backed by raw image files, at virtio-mmio slots 0, 1, ... For a restore or an
   * incoming migration: where this host finds the disks the saved machine had, in the same order
   * (default: the paths the saved machine used, as with storage both hosts share).
   */
  disks?: DiskConfig[];
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
   * In-kernel interrupt controllers (PIC, IOAPIC, LAPICs, PIT). Default: on for more than one
   * vCPU. Without them a HLT exits to the VMM, and the machine ends when every vCPU has halted.
   */
  irqchip?: boolean;
}

export interface RestoreConfig extends MachineRuntimeConfig {
  /** Check the checksum of the saved RAM image before mapping it (reads the whole image). */
  verify?: boolean;
}

export interface IncomingConfig extends MachineRuntimeConfig {
  /** If given, the incoming stream must match it; by default the stream says. */
  memoryBytes?: number;
  vcpus?: number;
  /** Required for tcp: the secret the source was given too. */
  token?: string;
  /** Give up if no migration arrives, or the stream stalls, this long. Default: wait forever for it, 10 s per stall. */
  timeoutMs?: number;
  /** Called once listening, with the address (the real port for tcp port 0). */
  onListening?: (address: string) => void;
  /** With memoryBytes and vcpus, the machine is built before the stream arrives; default: with more than one vCPU. */
  irqchip?: boolean;
}

/** The hardware of a machine: what another process needs to build one the state fits. */
export interface MachineShape {
  memoryBytes: number;
  vcpus: number;
  irqchip: boolean;
  /** The machine's disks (absent: none). Their contents are the host's files, not part of the state. */
  disks?: DiskShape[];
}

export interface DeviceStates {
  serial: SerialState;
  postCode: PostCodeState;
  /** The virtio-mmio register state of each disk. */
  virtio?: VirtioMmioState[];
}

/** Everything but RAM: what a snapshot or a migration carries besides memory. */
export interface MachineState {
  shape: MachineShape;
  vm: VmState;
  vcpus: VcpuState[];
  devices: DeviceStates;
  /** Whether the guest was running (not paused by its owner) when the state was taken. */
  running?: boolean;
}

/** How the machine's parts are made: from an image (boot) or for a saved state (no boot). */
interface BuildPlan {
  shape: MachineShape;
  boot: BootPlan | null;
  /** Makes guest RAM: a new memfd, or a copy-on-write map of a snapshot. */
  memory: (size: number) => GuestMemory | Promise<GuestMemory>;
  runtime: MachineRuntimeConfig;
  /** A saved state to build the machine in (a restore): each vCPU is created straight into its own. */
  state?: MachineState;
  /** The disks of a saved machine (restore, migration): opened where runtime.disks says, else at their paths. */
  savedDisks?: DiskShape[];
  /** Built to receive a migration: its disks are locked once the source has let go of them. */
  incoming?: boolean;
}

// What the host's KVM offers does not change while the process runs: asked once.
let msrIndexListCache: number[] | null = null;
let supportedCpuidCache: CpuidEntry[] | null = null;

export declare interface Machine {
  on(event: 'exit', listener: (exit: MachineExit) => void): this;
  once(event: 'exit', listener: (exit: MachineExit) => void): this;
}

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
  readonly #control: Int32Array;
  readonly #threads: VcpuThread[];
  /** Resolve as each vCPU thread leaves this machine's assignment (or ends). */
  readonly #threadsLeft: Promise<void>[];
  readonly #kicks: VcpuKickHandle[];
  readonly #requestPorts: MessagePort[];
  readonly #pendingRequests = new Map<number, { resolve: (reply: VcpuReply) => void; reject: (error: Error) => void }>();
  #requestSeq = 0;
  readonly #pool: VcpuWorkerPool | undefined;
  readonly #serial: Serial;
  readonly #bus: IoBus;
  readonly #busShared: BusShared;
  readonly #postCode: PostCode;
  readonly #disks: Disks;
  readonly #log: (message: string) => void;
  /** Serial output bound for a stream (or discarded): the vCPU threads fill it, we drain it. */
  readonly #outputRing: ByteRing | null;
  readonly #outputStream: NodeJS.WritableStream | null;
  readonly #input: NodeJS.ReadableStream | null;
  readonly #onInput: (chunk: Buffer | string) => void;
  #tracker: DirtyTracker | null = null;
  /** Who uses the dirty tracker: a migration, or diff snapshots layered on `snapshotBase`. */
  #trackerUser: 'migration' | 'snapshots' | null = null;
  #snapshotBase: { path: string; id: Uint8Array } | null = null;
  /** A snapshot or migration is under way: one at a time. */
  #busy: string | null = null;
  #exit: MachineExit | null = null;
  #tornDown = false;
  #finished: Promise<MachineExit>;
  #finish!: (exit: MachineExit) => void;

  private constructor(parts: {
    kvm: Kvm; vm: Vm; memory: GuestMemory; dirty: DirtyBitmap; control: Int32Array; threads: VcpuThread[]; threadsLeft: Promise<void>[]; kicks: VcpuKickHandle[];
    requestPorts: MessagePort[]; devices: DevicesShared; plan: BuildPlan; dirtyLog: DirtyLogMode; disks: Disks;
    outputRing: ByteRing | null; outputStream: NodeJS.WritableStream | null; log: (message: string) => void;
  }) {
    super();
    this.#outputStream = parts.outputStream;
    this.#kvm = parts.kvm;
    this.#vm = parts.vm;
    this.#memory = parts.memory;
    this.#dirty = parts.dirty;
    this.#control = parts.control;
    this.#threads = parts.threads;
    this.#threadsLeft = parts.threadsLeft;
    this.#kicks = parts.kicks;
    this.#requestPorts = parts.requestPorts;
    this.#pool = parts.plan.runtime.pool;
    this.#log = parts.log;
    this.#outputRing = parts.outputRing;
    this.boot = parts.plan.boot;
    this.irqchip = parts.plan.shape.irqchip;
    this.dirtyLogMode = parts.dirtyLog;
    this.vcpuCount = parts.threads.length;
    this.memoryBytes = parts.memory.size;
    const vm = parts.vm;
    this.#serial = new Serial(parts.devices.serial, this.irqchip ? (level) => vm.setIrqLine(SERIAL_GSI, level) : () => {});
    this.#bus = new IoBus(parts.devices.bus, parts.log);
    this.#busShared = parts.devices.bus;
    this.#postCode = new PostCode(parts.devices.postCode);
    this.#disks = parts.disks;
    this.#finished = new Promise((resolve) => (this.#finish = resolve));
    this.#input = parts.plan.runtime.serial?.input ?? null;
    this.#onInput = (chunk) => {
      this.#serial.receive(typeof chunk === 'string' ? Buffer.from(chunk) : chunk);
    };
    for (const port of this.#requestPorts) {
      port.on('message', (reply: VcpuReply) => {
        const pending = this.#pendingRequests.get(reply.seq);
        this.#pendingRequests.delete(reply.seq);
        pending?.resolve(reply);
      });
      port.unref();
    }
  }

  /**
   * Validates the image, builds the VM and starts one thread per vCPU (all before the guest
   * runs). A bad image fails here, before any VM exists.
   */
  static async create(config: MachineConfig): Promise<Machine> {
    if (typeof config !== 'object' || config === null) throw new TypeError('config must be an object');
    const memoryBytes = checkMemoryBytes(config.memoryBytes ?? 64 * MIB);
    const vcpus = checkVcpus(config.vcpus ?? 1);
    const image = typeof config.image === 'string' ? readImage(config.image) : config.image;
    if (!(image instanceof Uint8Array)) throw new TypeError('image must be a Uint8Array or a file path');
    let initrd = config.initrd;
    if (typeof initrd === 'string') {
      try {
        initrd = readFileSync(initrd);
      } catch (error) {
        const e = error as NodeJS.ErrnoException;
        throw new Error(`cannot read the initrd ${initrd}: ${e.code ?? e.message}`);
      }
    }
    if (initrd !== undefined && !(initrd instanceof Uint8Array)) throw new TypeError('initrd must be a Uint8Array or a file path');
    const disks = checkDiskConfigs(config.disks);
    const linux = isBzImage(image);
    // Linux finds virtio-mmio devices on its command line (as with QEMU microvm and Firecracker).
    let cmdline = config.cmdline;
    if (linux && disks.length > 0) {
      const devices = disks.map((_, slot) => `virtio_mmio.device=4K@0x${(VIRTIO_MMIO_BASE + slot * VIRTIO_MMIO_SIZE).toString(16)}:${VIRTIO_FIRST_GSI + slot}`);
      cmdline = [cmdline, ...devices].filter((part) => part).join(' ');
    }
    const boot = planBoot(image, { memoryBytes, vcpus, mode: config.mode, loadAddr: config.loadAddr, cmdline, initrd });
    return Machine.#build({
      // Linux wants its local APIC and IOAPIC: a bzImage gets the in-kernel irqchip unless told otherwise.
      shape: { memoryBytes, vcpus, irqchip: config.irqchip ?? (vcpus > 1 || linux) },
      boot,
      memory: (size) => GuestMemory.create(size, { backing: 'memfd' }),
      runtime: config,
    });
  }

  /**
   * A machine from a snapshot file (and the files a diff snapshot is layered on), ready to
   * start() where the guest was. RAM is mapped from the file copy-on-write, not read in.
   */
  static async restore(path: string, config: RestoreConfig = {}): Promise<Machine> {
    if (typeof path !== 'string' || path === '') throw new TypeError('path must be a snapshot file path');
    const { loadSnapshot } = await import('../migration/snapshot.js');
    const snapshot = await loadSnapshot(path, { verify: !!config.verify });
    return Machine.#build({
      shape: snapshot.state.shape,
      boot: null,
      memory: snapshot.mapMemory,
      runtime: config,
      state: snapshot.state,
      savedDisks: snapshot.state.shape.disks ?? [],
    });
  }

  /**
   * Waits for one migration at `address` ('tcp:HOST:PORT' or 'unix:PATH'), receives the guest,
   * and resolves with the machine running it here.
   */
  static async incoming(address: string, config: IncomingConfig = {}): Promise<Machine> {
    if (typeof config !== 'object' || config === null) throw new TypeError('config must be an object');
    if (config.memoryBytes !== undefined) checkMemoryBytes(config.memoryBytes);
    if (config.vcpus !== undefined) checkVcpus(config.vcpus);
    const { receiveMigration } = await import('../migration/receive.js');
    // Refused connections are worth a line wherever the machine's warnings go.
    config = { ...config, log: config.log ?? logToStderr };
    const newMemory = (size: number) => {
      const memory = GuestMemory.create(size, { backing: 'memfd' });
      // The stream is parsed into guest RAM from JavaScript: its ArrayBuffer now, and with it the
      // garbage collection V8 makes for so much external memory, rather than during the transfer.
      void memory.buffer;
      return memory;
    };
    // With the shape known, build the machine while waiting (as QEMU's -incoming does): the
    // stream then finds it ready, which keeps VM creation out of the migration's time.
    let prebuilt: Promise<Machine> | null = null;
    if (config.memoryBytes !== undefined && config.vcpus !== undefined) {
      prebuilt = Machine.#build({
        shape: { memoryBytes: config.memoryBytes, vcpus: config.vcpus, irqchip: config.irqchip ?? config.vcpus > 1 },
        boot: null,
        memory: newMemory,
        runtime: config,
        incoming: true,
      });
      prebuilt.catch(() => {});
      // A dry run of what the stream's end will do (save a state, encode, decode, put it back),
      // so that its code is warm when the guest is paused at the other end.
      prebuilt = prebuilt.then(async (machine) => {
        try {
          const { warmUpStateCodec } = await import('../migration/machine-state.js');
          await machine.#applyState(warmUpStateCodec(await machine.saveState()));
        } catch (error) {
          machine.#log(`warming up for the incoming migration failed (harmless): ${(error as Error).message}`);
        }
        return machine;
      });
      prebuilt.catch(() => {});
      // Listen only once ready: a source that connects finds the machine waiting.
      await prebuilt.catch(() => null);
    }
    try {
      return await receiveMigration(address, config, async (shape) => {
        checkMemoryBytes(shape.memoryBytes);
        checkVcpus(shape.vcpus);
        let machine: Machine | null = prebuilt ? await prebuilt.catch(() => null) : null;
        prebuilt = null;
        if (machine && (machine.irqchip !== shape.irqchip || disksMismatch(shape.disks, machine.shape.disks))) {
          await machine.stop();
          machine = null;
        }
        machine ??= await Machine.#build({ shape, boot: null, memory: newMemory, runtime: config, savedDisks: shape.disks ?? [], incoming: true });
        const target = machine;
        return {
          memory: target.#memory,
          apply: async (state: MachineState) => {
            // The source let go of the images before it sent its last state (see migrate()).
            target.#disks.lock();
            await target.#applyState(state);
          },
          start: (paused: boolean) => target.start({ paused }),
          releaseDisks: () => target.#disks.unlock(),
          discard: async () => {
            await target.stop();
          },
          machine: target,
        };
      });
    } finally {
      // Built for a migration that never arrived.
      if (prebuilt) await (await (prebuilt as Promise<Machine>).catch(() => null))?.stop();
    }
  }

  static async #build(plan: BuildPlan): Promise<Machine> {
    const { shape, runtime } = plan;
    const vcpus = shape.vcpus;
    const log = runtime.log ?? logToStderr;
    const dirtyLog = runtime.dirtyLog ?? 'bitmap';
    if (dirtyLog !== 'bitmap' && dirtyLog !== 'ring') throw new RangeError(`dirtyLog must be 'bitmap' or 'ring', got ${String(dirtyLog)}`);

    // Checked before any thread starts: a bad configuration leaves nothing behind.
    const diskConfigs = plan.savedDisks ? diskConfigsFor(plan.savedDisks, runtime.disks) : checkDiskConfigs(runtime.disks);
    // Taken (or started) without waiting for them to load: each is sent its vCPU below at once.
    const threadsPromise = runtime.pool ? runtime.pool.acquire(vcpus) : Promise.resolve(Array.from({ length: vcpus }, startVcpuThread));
    threadsPromise.catch(() => {});
    // What to undo if a step fails, last taken first. The vCPU threads are given back before any
    // of it: a thread that took its assignment uses the VM and guest RAM until it has left it.
    const cleanup: (() => void | Promise<void>)[] = [];
    let threads: VcpuThread[] | null = null;
    let assigned: { control: Int32Array; left: Promise<void>[] } | null = null;
    try {
      const kvm = Kvm.open(runtime.kvmPath);
      cleanup.unshift(() => kvm.close());
      const vm = kvm.createVm();
      cleanup.unshift(() => vm.close());
      vm.setTssAddr(TSS_ADDR);
      vm.setIdentityMapAddr(IDENTITY_MAP_ADDR);
      if (shape.irqchip) {
        vm.createIrqChip();
        vm.createPit2({ speakerDummy: true });
      }
      // The interrupt controllers' state before the vCPUs': a LAPIC's refers to the IOAPIC's.
      if (plan.state) restoreVmState(vm, plan.state.vm, shape.irqchip);
      // The ring must exist before any vCPU (api.rst, KVM_CAP_DIRTY_LOG_RING).
      if (dirtyLog === 'ring') {
        if (!dirtyLogModesOffered(vm).includes('ring')) throw new Error('this host\'s KVM offers no dirty ring (KVM_CAP_DIRTY_LOG_RING): use dirtyLog \'bitmap\'');
        vm.enableDirtyRing(Math.min(DEFAULT_DIRTY_RING_BYTES, maxDirtyRingBytes(vm)));
      }
      const memory = await plan.memory(shape.memoryBytes);
      cleanup.unshift(() => memory.close());
      const dirty = DirtyBitmap.create(memory.size / PAGE_BYTES);
      // Their threads start (parked) while the vCPU threads do. A machine that waits for an
      // incoming migration locks its images only once the source has let go of them.
      const disksPromise = Disks.open(diskConfigs, { vm, memory, dirty, irqchip: shape.irqchip, log, lock: !plan.incoming });
      disksPromise.catch(() => {});
      cleanup.unshift(async () => (await disksPromise.catch(() => null))?.close());

      const output = runtime.serial?.output === undefined ? 1 : runtime.serial.output;
      let outputRing: ByteRing | null = null;
      let serialOutput: { fd: number } | { ring: ByteRingShared };
      if (typeof output === 'number') {
        serialOutput = { fd: output };
      } else {
        outputRing = ByteRing.create(64 * 1024);
        serialOutput = { ring: outputRing.shared };
      }
      const disks = await disksPromise;
      const unfit = plan.savedDisks ? disksMismatch(plan.savedDisks, disks.shapes) : null;
      if (unfit) throw new Error(`the saved machine's disks do not fit: ${unfit}`);
      const devices: DevicesShared = {
        bus: createBusShared(), serial: Serial.createShared(serialOutput), postCode: PostCode.createShared(), virtio: disks.mmioShared,
      };
      const control = new Int32Array(createControl());
      supportedCpuidCache ??= kvm.getSupportedCpuid();
      const supported = supportedCpuidCache;
      const msrs = plan.state ? null : encodeMsrs(bootMsrs());
      msrIndexListCache ??= kvm.getMsrIndexList();
      const channels = Array.from({ length: vcpus }, () => new MessageChannel());
      cleanup.unshift(() => channels.forEach((channel) => channel.port1.close()));

      threads = await threadsPromise;
      const taken = threads;
      const kicks: VcpuKickHandle[] = new Array(vcpus);
      const ready = taken.map((thread, id) => new Promise<void>((resolve, reject) => {
        const onMessage = (message: WorkerMessage) => {
          if (message.type === 'ready') {
            kicks[id] = message.kick;
            thread.worker.off('message', onMessage);
            resolve();
          } else if (message.type === 'done') {
            thread.worker.off('message', onMessage);
            reject(new Error(`vCPU ${id} could not start: ${message.error ?? 'unknown error'}`));
          } else if (message.type === 'log') {
            log(message.message);
          }
        };
        thread.worker.on('message', onMessage);
        thread.loaded.catch((error: Error) => {
          thread.worker.off('message', onMessage);
          reject(new Error(`vCPU ${id} could not start: ${error.message}`));
        });
      }));
      ready.forEach((promise) => promise.catch(() => {}));
      // Watched from before the assignment goes out, so that a thread's 'done' is never missed.
      const left = taken.map((thread) => waitForDone(thread));
      assigned = { control, left };
      taken.forEach((thread, id) => {
        const requests = channels[id]!.port2;
        thread.send({
          type: 'assign',
          assignment: {
            vmFd: vm.fd, memory: memory.handle, vcpuId: id, vcpuCount: vcpus, boot: id === 0 ? plan.boot?.bsp ?? null : null,
            cpuid: plan.state ? null : encodeCpuid(guestCpuid(supported, id, vcpus)), msrs, control: control.buffer as SharedArrayBuffer, devices, irqchip: shape.irqchip,
            affinity: runtime.affinity?.[id] ? [...runtime.affinity[id]!] : null,
            requests, dirtyBitmap: dirty.shared, memoryPages: dirty.pageCount, slotBasePages: [...slotBasePages([{ slot: RAM_SLOT, guestPhysAddr: 0 }])],
            msrIndexList: msrIndexListCache!, restore: plan.state?.vcpus[id] ?? null,
          },
        }, [requests]);
      });
      // While the vCPU threads create their vCPUs: KVM may wait for a grace period when a slot
      // is added to a VM with an in-kernel irqchip, and nothing runs before start() anyway.
      vm.setUserMemoryRegion({ slot: RAM_SLOT, guestPhysAddr: 0, memory });
      if (plan.boot) {
        writeBootPlan(plan.boot, memory);
        for (const write of plan.boot.writes) dirty.mark(write.guestPhysAddr, 'data' in write ? write.data.length : write.zeroBytes);
      }
      await Promise.all(ready);
      const outputStream = typeof output === 'object' ? output : null;
      const machine = new Machine({
        kvm, vm, memory, dirty, control, threads: taken, threadsLeft: left, kicks, requestPorts: channels.map((channel) => channel.port1), devices, plan, dirtyLog,
        outputRing, outputStream, log, disks,
      });
      if (plan.state) machine.#restoreDevices(plan.state.devices);
      machine.#watch();
      return machine;
    } catch (error) {
      threads ??= await threadsPromise.catch(() => []);
      if (assigned) {
        // Each thread leaves its assignment (or never takes it, if it failed to load) first.
        setRunState(assigned.control, RunState.Stopping);
        await Promise.all(assigned.left);
      }
      if (runtime.pool) runtime.pool.release(threads);
      else for (const thread of threads) thread.send({ type: 'quit' });
      for (const undo of cleanup) await undo();
      throw error;
    }
  }

  get state(): 'created' | 'running' | 'paused' | 'stopping' {
    return (['created', 'running', 'paused', 'stopping'] as const)[Atomics.load(this.#control, STATE)]!;
  }

  /** The hardware: what a snapshot or a migration needs to rebuild this machine elsewhere. */
  get shape(): MachineShape {
    const shape: MachineShape = { memoryBytes: this.memoryBytes, vcpus: this.vcpuCount, irqchip: this.irqchip };
    if (this.#disks.count > 0) shape.disks = this.#disks.shapes;
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

  /** Writes guest RAM from the VMM and marks the pages dirty, so snapshots and migrations carry them. */
  writeMemory(guestPhysAddr: number, data: Uint8Array): void {
    this.#memory.write(guestPhysAddr, data);
    this.#dirty.mark(guestPhysAddr, data.length);
  }

  /** Unknown port and MMIO accesses the guest has made. */
  get unknownAccesses(): { ports: number; mmio: number } {
    return { ports: this.#bus.unknownPortAccesses, mmio: this.#bus.unknownMmioAccesses };
  }

  /** The last POST code the guest wrote to port 0x80, and how many writes it made there. */
  get postCode(): { last: number; writes: number } {
    return { last: this.#postCode.lastCode, writes: this.#postCode.writes };
  }

  /** Bytes for the guest's COM1 (as if typed); returns how many fitted in its input buffer. */
  sendSerialInput(bytes: Uint8Array): number {
    return this.#serial.receive(bytes);
  }

  /** Resolves with the exit once the machine has ended and released everything. */
  wait(): Promise<MachineExit> {
    return this.#finished;
  }

  /** Runs the guest; with `{ paused: true }`, sets it up paused instead (resume() runs it). */
  start(options: { paused?: boolean } = {}): void {
    if (Atomics.load(this.#control, STATE) !== RunState.Created) throw new Error(`machine is ${this.state}, not created`);
    if (this.#input) {
      this.#input.on('data', this.#onInput);
      this.#input.resume();
    }
    setRunState(this.#control, options.paused ? RunState.Paused : RunState.Running);
    if (!options.paused) this.#disks.resume();
  }

  /** Stops every vCPU at its next exit (kicking those inside the guest) and waits until all are parked. */
  async pause(): Promise<void> {
    await this.#pause(false);
  }

  /**
   * pause(); with `saveVcpus`, each vCPU thread is also asked for its state as it stops, and
   * serves that at the kick's exit or as it parks (the machine is paused by then, so the state is
   * final): the states come back with the pause, one round trip to the threads less inside a
   * migration's downtime.
   */
  async #pause(saveVcpus: boolean): Promise<VcpuState[] | null> {
    if (Atomics.load(this.#control, STATE) !== RunState.Running) throw new Error(`machine is ${this.state}, not running`);
    setRunState(this.#control, RunState.Paused);
    // Asked only now that the machine is paused: a thread that serves it has run for the last time.
    const saved = saveVcpus ? this.#saveVcpus() : null;
    saved?.catch(() => {});
    this.#kickAll();
    while (Atomics.load(this.#control, PARKED) < this.vcpuCount && Atomics.load(this.#control, STATE) === RunState.Paused) {
      const parked = Atomics.load(this.#control, PARKED);
      const result = Atomics.waitAsync(this.#control, PARKED, parked, 50);
      if (result.async) await result.value;
      this.#kickAll();
    }
    if (Atomics.load(this.#control, STATE) !== RunState.Paused) throw new Error(`machine is ${this.state}, not paused`);
    // The disks after the vCPUs: no new request can come, and the ones under way finish (their
    // writes into guest RAM marked dirty) before anyone saves the state.
    await this.#disks.pause();
    return saved ? await saved : null;
  }

  resume(): void {
    if (Atomics.load(this.#control, STATE) !== RunState.Paused) throw new Error(`machine is ${this.state}, not paused`);
    this.#disks.resume();
    setRunState(this.#control, RunState.Running);
  }

  /** Ends the machine (if still running) and resolves with its exit. */
  async stop(): Promise<MachineExit> {
    this.#end({ reason: 'stopped' });
    return this.#finished;
  }

  /**
   * The state of every vCPU, the VM and the devices. The machine must be paused (or not yet
   * started): a running vCPU's state would be stale at once.
   */
  async saveState(): Promise<MachineState> {
    return this.#saveState(null);
  }

  /** saveState(), with the vCPU states saved as the machine paused (#pause(true)) if given. */
  async #saveState(vcpuStates: VcpuState[] | null): Promise<MachineState> {
    const state = this.state;
    if (state !== 'paused' && state !== 'created') throw new Error(`machine is ${state}: pause it before saving its state`);
    const vcpus = vcpuStates ?? await this.#saveVcpus();
    return {
      shape: this.shape,
      vm: saveVmState(this.#vm, this.irqchip),
      vcpus,
      devices: {
        serial: this.#serial.saveState(), postCode: this.#postCode.saveState(), ...(this.#disks.count > 0 ? { virtio: this.#disks.saveState() } : {}),
      },
    };
  }

  #saveVcpus(): Promise<VcpuState[]> {
    return Promise.all(this.#requestPorts.map(async (_, id) => {
      const reply = await this.#request(id, { type: 'save' });
      if (reply.type !== 'saved') throw new Error(`vCPU ${id}: cannot save its state: ${reply.type === 'failed' ? reply.error : reply.type}`);
      return reply.state;
    }));
  }

  async #applyState(state: MachineState): Promise<void> {
    const mine = this.shape;
    if (state.shape.memoryBytes !== mine.memoryBytes || state.shape.vcpus !== mine.vcpus || state.shape.irqchip !== mine.irqchip) {
      throw new Error(`the saved state is for ${describeShape(state.shape)}, this machine is ${describeShape(mine)}`);
    }
    const fit = disksMismatch(state.shape.disks, mine.disks);
    if (fit) throw new Error(`the saved state does not fit this machine's disks: ${fit}`);
    if (state.vcpus.length !== this.vcpuCount) throw new Error(`the saved state has ${state.vcpus.length} vCPU states for ${this.vcpuCount} vCPUs`);
    restoreVmState(this.#vm, state.vm, this.irqchip);
    await Promise.all(state.vcpus.map(async (vcpuState, id) => {
      const reply = await this.#request(id, { type: 'restore', state: vcpuState });
      // (MSRs the host refused are logged by the vCPU's thread.)
      if (reply.type === 'failed') throw new Error(`vCPU ${id}: cannot restore its state: ${reply.error}`);
    }));
    this.#restoreDevices(state.devices);
  }

  #restoreDevices(devices: DeviceStates): void {
    this.#serial.restoreState(devices.serial);
    this.#postCode.restoreState(devices.postCode);
    if (this.#disks.count > 0 || devices.virtio !== undefined) this.#disks.restoreState(devices.virtio ?? []);
  }

  #request(vcpuId: number, request: { type: 'save' } | { type: 'restore'; state: VcpuState }): Promise<VcpuReply> {
    if (this.#exit) return Promise.reject(new Error('the machine has ended'));
    const seq = ++this.#requestSeq;
    return new Promise((resolve, reject) => {
      this.#pendingRequests.set(seq, { resolve, reject });
      this.#requestPorts[vcpuId]!.ref();
      this.#requestPorts[vcpuId]!.postMessage({ ...request, seq } satisfies VcpuRequest);
      ringDoorbell(this.#control);
    }).finally(() => {
      // Only an awaited reply may keep the process alive.
      if (this.#pendingRequests.size === 0) for (const port of this.#requestPorts) port.unref();
    }) as Promise<VcpuReply>;
  }

  /**
   * Writes the guest's memory and state to `path`. With `diff`, only the pages written since this
   * machine's previous snapshot, layered on that file (which must stay where it is). A running
   * machine is paused while its state and memory are written, then runs on.
   */
  async snapshot(path: string, options: SnapshotOptions = {}): Promise<SnapshotInfo> {
    if (typeof path !== 'string' || path === '') throw new TypeError('path must be a file path');
    if (typeof options !== 'object' || options === null) throw new TypeError('options must be an object');
    const { writeMachineSnapshot } = await import('../migration/snapshot.js');
    return this.#exclusive('snapshot', async () => {
      const diff = !!options.diff;
      if (diff && (!this.#snapshotBase || this.#trackerUser !== 'snapshots')) {
        throw new Error('a diff snapshot needs a previous snapshot of this machine to layer on');
      }
      const started = performance.now();
      const wasRunning = this.state === 'running';
      if (wasRunning) await this.pause();
      const pausedAt = performance.now();
      try {
        const state = await this.saveState();
        let pages: PageRange[] | undefined;
        if (diff) {
          pages = this.#tracker!.harvest();
        } else {
          // Tracking from here on: the next diff snapshot needs what the guest writes after this one.
          this.#startTracking('snapshots');
          this.#tracker!.harvest();
        }
        let result;
        try {
          result = await writeMachineSnapshot(path, { state, memory: this.#memory, pages, parent: diff ? this.#snapshotBase! : undefined });
        } catch (error) {
          if (pages) this.#tracker!.requeue(pages);
          throw error;
        }
        this.#snapshotBase = { path: result.path, id: result.id };
        const pausedMs = performance.now() - pausedAt;
        return { ...result.info, pausedMs, totalTimeMs: performance.now() - started };
      } finally {
        if (wasRunning && Atomics.load(this.#control, STATE) === RunState.Paused) this.resume();
      }
    });
  }

  /**
   * Live-migrates the running guest to a destination waiting with Machine.incoming() (or
   * `node-kvm run --incoming`). On success this machine ends with exit reason 'migrated'; on any
   * failure the guest keeps running here and the promise rejects with what happened.
   */
  async migrate(address: string, options: MigrateOptions = {}): Promise<MigrationStats> {
    if (typeof address !== 'string') throw new TypeError('address must be a string such as tcp:HOST:PORT or unix:PATH');
    if (typeof options !== 'object' || options === null) throw new TypeError('options must be an object');
    const { sendMigration } = await import('../migration/send.js');
    return this.#exclusive('migration', async () => {
      const state = this.state;
      if (state !== 'running' && state !== 'paused') throw new Error(`machine is ${state}, not running`);
      let pausedVcpuStates: VcpuState[] | null = null;
      const stats = await sendMigration(address, options, {
        memory: this.#memory,
        memoryBytes: this.memoryBytes,
        vcpuCount: this.vcpuCount,
        dirtyLogMode: this.dirtyLogMode,
        shape: this.shape,
        startTracking: () => {
          void this.#warmUpSave();
          return this.#startTracking('migration');
        },
        stopTracking: () => this.#stopTracking(),
        pause: async () => {
          if (this.state !== 'running') return false;
          // Without disks, the vCPUs save their state as they stop. With disks, only once the
          // disks have paused too: a request completing meanwhile raises an interrupt, which
          // belongs in the vCPUs' saved state.
          pausedVcpuStates = await this.#pause(this.#disks.count === 0);
          return true;
        },
        resume: () => {
          pausedVcpuStates = null;
          if (this.state === 'paused') this.resume();
        },
        saveState: () => this.#saveState(pausedVcpuStates),
        releaseDisks: () => this.#disks.unlock(),
        retakeDisks: () => this.#disks.lockWithin(DISK_RETAKE_MS),
      });
      this.#stopTracking();
      this.#end({ reason: 'migrated' });
      return stats;
    });
  }

  /**
   * Has every vCPU thread save its state once, between two runs, and throws it away: the final
   * save, inside the migration's downtime, then runs warm code. A vCPU that does not answer
   * soon (halted without an irqchip) is simply not warmed.
   */
  async #warmUpSave(): Promise<void> {
    await Promise.all(this.#requestPorts.map((_, id) => {
      const reply = this.#request(id, { type: 'save' });
      kickVcpu(this.#kicks[id]!);
      return Promise.race([reply.catch(() => undefined), new Promise((resolve) => setTimeout(resolve, 100).unref())]);
    }));
  }

  async #exclusive<T>(what: string, work: () => Promise<T>): Promise<T> {
    if (this.#busy) throw new Error(`a ${this.#busy} is already under way`);
    if (this.#exit) throw new Error('the machine has ended');
    this.#busy = what;
    try {
      return await work();
    } finally {
      this.#busy = null;
    }
  }

  #startTracking(user: 'migration' | 'snapshots'): DirtyTracker {
    if (this.#tracker && this.#trackerUser !== user) this.#stopTracking();
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
    this.#trackerUser = user;
    // A migration takes the tracker over: diff snapshots must then start from a new full one.
    if (user === 'migration') this.#snapshotBase = null;
    return this.#tracker;
  }

  #stopTracking(): void {
    this.#tracker?.stop();
    this.#tracker = null;
    this.#trackerUser = null;
  }

  #kickAll(): void {
    for (const kick of this.#kicks) kickVcpu(kick);
  }

  #end(exit: MachineExit): void {
    if (this.#exit) return;
    this.#exit = exit;
    setRunState(this.#control, RunState.Stopping);
    this.#kickAll();
    void this.#teardown();
  }

  readonly #onWorkerMessage = (message: WorkerMessage) => {
    if (message.type === 'exit') this.#end(message.exit);
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
    // Teardown drains what is left itself, so the output is complete before the exit event.
    while (!this.#tornDown) {
      await ring.waitForData(100);
      const bytes = ring.drain();
      if (bytes.length > 0) this.#outputStream?.write(bytes);
    }
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
    for (const pending of this.#pendingRequests.values()) pending.reject(new Error('the machine has ended'));
    this.#pendingRequests.clear();
    for (const port of this.#requestPorts) port.close();
    if (this.#input) this.#input.off('data', this.#onInput);
    await this.#disks.close();
    this.#tracker = null;
    this.#vm.close();
    this.#memory.close();
    this.#kvm.close();
    if (this.#pool) this.#pool.release(this.#threads);
    else for (const thread of this.#threads) thread.send({ type: 'quit' });
    this.#tornDown = true;
    if (this.#outputRing) {
      this.#outputRing.wake();
      const rest = this.#outputRing.drain();
      if (rest.length > 0) this.#outputStream?.write(rest);
    }
    const unknown = unknownAccesses(this.#busShared);
    if (unknown.ports > 0 || unknown.mmio > 0) {
      const count = (n: number, one: string, many: string) => `${n} ${n === 1 ? one : many}`;
      this.#log(`the guest made ${count(unknown.ports, 'access', 'accesses')} to ${count(unknown.distinctPorts, 'unknown port', 'unknown ports')} and ${count(unknown.mmio, 'unknown MMIO access', 'unknown MMIO accesses')}`);
    }
    const exit = this.#exit!;
    this.#finish(exit);
    this.emit('exit', exit);
  }
}

function logToStderr(message: string): void {
  process.stderr.write(`node-kvm: ${message}\n`);
}

function checkMemoryBytes(memoryBytes: number): number {
  if (!Number.isSafeInteger(memoryBytes) || memoryBytes < MIB || memoryBytes % MIB !== 0) {
    throw new RangeError(`memoryBytes must be a positive multiple of 1 MiB, got ${memoryBytes}`);
  }
  if (memoryBytes > MAX_MEMORY_BYTES) throw new RangeError(`memoryBytes above ${MAX_MEMORY_BYTES / MIB} MiB is not supported`);
  return memoryBytes;
}

function checkVcpus(vcpus: number): number {
  if (!Number.isInteger(vcpus) || vcpus < 1 || vcpus > 255) throw new RangeError(`vcpus must be an integer 1..255, got ${vcpus}`);
  return vcpus;
}

/** Why a saved machine's disks do not fit the disks of a machine, or null if they do. */
function disksMismatch(saved: DiskShape[] | undefined, mine: DiskShape[] | undefined): string | null {
  const a = saved ?? [];
  const b = mine ?? [];
  if (a.length !== b.length) return `it had ${a.length} disk${a.length === 1 ? '' : 's'}, this machine has ${b.length}`;
  for (const [index, disk] of a.entries()) {
    const other = b[index]!;
    if (disk.readOnly !== other.readOnly) return `disk ${index} was ${disk.readOnly ? 'read-only' : 'writable'}, here it is ${other.readOnly ? 'read-only' : 'writable'}`;
    if (disk.sectors !== other.sectors) return `disk ${index} had ${disk.sectors} sectors, ${other.path} has ${other.sectors}`;
  }
  return null;
}

/** The disks to open for a saved machine: its own paths, or the ones this host was given for them. */
function diskConfigsFor(saved: DiskShape[] | undefined, given: DiskConfig[] | undefined): Required<DiskConfig>[] {
  const disks = saved ?? [];
  if (given === undefined) return checkDiskConfigs(disks.map((disk) => ({ path: disk.path, readOnly: disk.readOnly, id: disk.id })));
  const configs = checkDiskConfigs(given);
  if (configs.length !== disks.length) throw new Error(`the saved machine had ${disks.length} disk${disks.length === 1 ? '' : 's'}, ${configs.length} given`);
  return configs.map((config, index) => ({ ...config, readOnly: disks[index]!.readOnly, id: disks[index]!.id }));
}

function describeShape(shape: MachineShape): string {
  return `${shape.memoryBytes / MIB} MiB, ${shape.vcpus} vCPU${shape.vcpus === 1 ? '' : 's'}, ${shape.irqchip ? 'in-kernel irqchip' : 'no irqchip'}`;
}

function readImage(file: string): Uint8Array {
  try {
    return readFileSync(file);
  } catch (error) {
    const e = error as NodeJS.ErrnoException;
    throw new Error(`cannot read the image ${file}: ${e.code ?? e.message}`);
  }
}

/** Until the thread reports its assignment done, or ends (a thread that failed to load never reports). */
function waitForDone(thread: VcpuThread): Promise<void> {
  let onMessage!: (message: WorkerMessage) => void;
  const done = new Promise<void>((resolve) => {
    onMessage = (message: WorkerMessage) => {
      if (message.type === 'done') resolve();
    };
    thread.worker.on('message', onMessage);
  });
  return Promise.race([done, thread.exited]).finally(() => thread.worker.off('message', onMessage));
}

