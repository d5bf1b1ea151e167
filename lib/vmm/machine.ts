// A machine: a VM, its guest RAM, its devices and one thread per vCPU. The main thread only
// controls (start, pause, resume, stop, serial input); each vCPU thread runs and handles its own
// exits.
import { EventEmitter } from 'node:events';
import { readFileSync } from 'node:fs';
import { bootMsrs, guestCpuid, planBoot, writeBootPlan, type BootPlan, type CpuMode } from '../boot/index.js';
import { GuestMemory, Kvm, kickVcpu, type Vm, type VcpuKickHandle } from '../kvm/index.js';
import { PostCode } from '../devices/post-code.js';
import { Serial } from '../devices/serial.js';
import { createBusShared, IoBus } from './bus.js';
import { ByteRing, type ByteRingShared } from './byte-ring.js';
import { PARKED, RunState, STATE, createControl, setRunState } from './control.js';
import { SERIAL_GSI, type DevicesShared } from './devices.js';
import { VcpuWorkerPool, startVcpuThread, type VcpuThread } from './pool.js';
import type { MachineExit, WorkerMessage } from './types.js';

export type { MachineExit, MachineExitReason } from './types.js';

/** Guest RAM above this would need the PCI hole below 4 GiB: not supported yet. */
export const MAX_MEMORY_BYTES = 3 * 1024 ** 3;
const MIB = 1024 * 1024;
// Three pages KVM may use for the real-mode TSS, and one for the EPT identity map (Intel), just
// below the BIOS area at the top of the 32-bit space, away from guest RAM.
const TSS_ADDR = 0xfffbd000;
const IDENTITY_MAP_ADDR = 0xfffbc000;

export interface MachineConfig {
  /** A guest image (flat binary, ELF32/64, Multiboot or PVH): bytes or a file path. */
  image: Uint8Array | string;
  /** Guest RAM in bytes (a multiple of 1 MiB). Default 64 MiB. */
  memoryBytes?: number;
  /** Default 1. */
  vcpus?: number;
  /** Entry mode for a flat binary (default 'real'); formats that say their own mode ignore it. */
  mode?: CpuMode;
  /** Load address of a flat binary (default 0x7c00). */
  loadAddr?: number;
  /** Kernel command line (Multiboot, PVH). */
  cmdline?: string;
  serial?: {
    /** An fd (written directly from the vCPU threads; default 1), a stream, or null to discard. */
    output?: number | NodeJS.WritableStream | null;
    /** Bytes from this stream reach the guest's COM1. */
    input?: NodeJS.ReadableStream | null;
  };
  /** Host CPUs per vCPU (index = vCPU id). */
  affinity?: (readonly number[] | undefined)[];
  /**
   * In-kernel interrupt controllers (PIC, IOAPIC, LAPICs, PIT). Default: on for more than one
   * vCPU. Without them a HLT exits to the VMM, and the machine ends when every vCPU has halted.
   */
  irqchip?: boolean;
  /** Borrow vCPU threads from here instead of starting new ones. */
  pool?: VcpuWorkerPool;
  /** Where the VMM's own warnings go (unknown ports, ...). Default: stderr. */
  log?: (message: string) => void;
  /** Default '/dev/kvm'. */
  kvmPath?: string;
}

export declare interface Machine {
  on(event: 'exit', listener: (exit: MachineExit) => void): this;
  once(event: 'exit', listener: (exit: MachineExit) => void): this;
}

export class Machine extends EventEmitter {
  readonly vcpuCount: number;
  readonly memoryBytes: number;
  readonly boot: BootPlan;
  readonly #kvm: Kvm;
  readonly #vm: Vm;
  readonly #memory: GuestMemory;
  readonly #control: Int32Array;
  readonly #threads: VcpuThread[];
  readonly #kicks: VcpuKickHandle[];
  readonly #pool: VcpuWorkerPool | undefined;
  readonly #serial: Serial;
  readonly #bus: IoBus;
  readonly #postCode: PostCode;
  readonly #log: (message: string) => void;
  /** Serial output bound for a stream (or discarded): the vCPU threads fill it, we drain it. */
  readonly #outputRing: ByteRing | null;
  readonly #outputStream: NodeJS.WritableStream | null;
  readonly #input: NodeJS.ReadableStream | null;
  readonly #onInput: (chunk: Buffer | string) => void;
  #exit: MachineExit | null = null;
  #tornDown = false;
  #finished: Promise<MachineExit>;
  #finish!: (exit: MachineExit) => void;

  private constructor(parts: {
    kvm: Kvm; vm: Vm; memory: GuestMemory; control: Int32Array; threads: VcpuThread[]; kicks: VcpuKickHandle[];
    pool: VcpuWorkerPool | undefined; devices: DevicesShared; irqchip: boolean; boot: BootPlan; config: MachineConfig;
    outputRing: ByteRing | null; outputStream: NodeJS.WritableStream | null; log: (message: string) => void;
  }) {
    super();
    this.#outputStream = parts.outputStream;
    this.#kvm = parts.kvm;
    this.#vm = parts.vm;
    this.#memory = parts.memory;
    this.#control = parts.control;
    this.#threads = parts.threads;
    this.#kicks = parts.kicks;
    this.#pool = parts.pool;
    this.#log = parts.log;
    this.#outputRing = parts.outputRing;
    this.boot = parts.boot;
    this.vcpuCount = parts.threads.length;
    this.memoryBytes = parts.memory.size;
    const vm = parts.vm;
    this.#serial = new Serial(parts.devices.serial, parts.irqchip ? (level) => vm.setIrqLine(SERIAL_GSI, level) : () => {});
    this.#bus = new IoBus(parts.devices.bus, parts.log);
    this.#postCode = new PostCode(parts.devices.postCode);
    this.#finished = new Promise((resolve) => (this.#finish = resolve));
    this.#input = parts.config.serial?.input ?? null;
    this.#onInput = (chunk) => {
      this.#serial.receive(typeof chunk === 'string' ? Buffer.from(chunk) : chunk);
    };
  }

  /**
   * Validates the image, builds the VM and starts one thread per vCPU (all before the guest
   * runs). A bad image fails here, before any VM exists.
   */
  static async create(config: MachineConfig): Promise<Machine> {
    if (typeof config !== 'object' || config === null) throw new TypeError('config must be an object');
    const memoryBytes = config.memoryBytes ?? 64 * MIB;
    if (!Number.isSafeInteger(memoryBytes) || memoryBytes < MIB || memoryBytes % MIB !== 0) {
      throw new RangeError(`memoryBytes must be a positive multiple of 1 MiB, got ${memoryBytes}`);
    }
    if (memoryBytes > MAX_MEMORY_BYTES) throw new RangeError(`memoryBytes above ${MAX_MEMORY_BYTES / MIB} MiB is not supported`);
    const vcpus = config.vcpus ?? 1;
    if (!Number.isInteger(vcpus) || vcpus < 1 || vcpus > 255) throw new RangeError(`vcpus must be an integer 1..255, got ${vcpus}`);
    const image = typeof config.image === 'string' ? readImage(config.image) : config.image;
    if (!(image instanceof Uint8Array)) throw new TypeError('image must be a Uint8Array or a file path');
    const boot = planBoot(image, { memoryBytes, vcpus, mode: config.mode, loadAddr: config.loadAddr, cmdline: config.cmdline });
    const irqchip = config.irqchip ?? vcpus > 1;
    const log = config.log ?? ((message: string) => process.stderr.write(`node-kvm: ${message}\n`));

    const threadsPromise = config.pool ? config.pool.acquire(vcpus) : Promise.all(Array.from({ length: vcpus }, startVcpuThread));
    const kvm = Kvm.open(config.kvmPath);
    const cleanup: (() => void)[] = [() => kvm.close()];
    let threads: VcpuThread[] = [];
    try {
      const vm = kvm.createVm();
      cleanup.unshift(() => vm.close());
      vm.setTssAddr(TSS_ADDR);
      vm.setIdentityMapAddr(IDENTITY_MAP_ADDR);
      if (irqchip) {
        vm.createIrqChip();
        vm.createPit2({ speakerDummy: true });
      }
      const memory = GuestMemory.create(memoryBytes, { backing: 'memfd' });
      cleanup.unshift(() => memory.close());
      vm.setUserMemoryRegion({ slot: 0, guestPhysAddr: 0, memory });
      writeBootPlan(boot, memory);

      const output = config.serial?.output === undefined ? 1 : config.serial.output;
      let outputRing: ByteRing | null = null;
      let serialOutput: { fd: number } | { ring: ByteRingShared };
      if (typeof output === 'number') {
        serialOutput = { fd: output };
      } else {
        outputRing = ByteRing.create(64 * 1024);
        serialOutput = { ring: outputRing.shared };
      }
      const devices: DevicesShared = { bus: createBusShared(), serial: Serial.createShared(serialOutput), postCode: PostCode.createShared() };
      const control = new Int32Array(createControl());
      const supported = kvm.getSupportedCpuid();
      const msrs = bootMsrs();

      threads = await threadsPromise;
      const kicks: VcpuKickHandle[] = new Array(vcpus);
      const ready = threads.map((thread, id) => new Promise<void>((resolve, reject) => {
        const onMessage = (message: WorkerMessage) => {
          if (message.type === 'ready') {
            kicks[id] = message.kick;
            thread.worker.off('message', onMessage);
            resolve();
          } else if (message.type === 'done') {
            thread.worker.off('message', onMessage);
            reject(new Error(`vCPU ${id} could not start: ${message.error ?? 'unknown error'}`));
          }
        };
        thread.worker.on('message', onMessage);
      }));
      threads.forEach((thread, id) => thread.send({
        type: 'assign',
        assignment: {
          vmFd: vm.fd, memory: memory.handle, vcpuId: id, vcpuCount: vcpus, boot: id === 0 ? boot.bsp : null,
          cpuid: guestCpuid(supported, id, vcpus), msrs, control: control.buffer as SharedArrayBuffer, devices, irqchip,
          affinity: config.affinity?.[id] ? [...config.affinity[id]!] : null,
        },
      }));
      try {
        await Promise.all(ready);
      } catch (error) {
        setRunState(control, RunState.Stopping);
        await Promise.all(threads.map((thread) => waitForDone(thread)));
        throw error;
      }
      const outputStream = typeof output === 'object' ? output : null;
      const machine = new Machine({ kvm, vm, memory, control, threads, kicks, pool: config.pool, devices, irqchip, boot, config, outputRing, outputStream, log });
      machine.#watch();
      return machine;
    } catch (error) {
      for (const close of cleanup) close();
      if (threads.length > 0) {
        if (config.pool) config.pool.release(threads);
        else for (const thread of threads) thread.send({ type: 'quit' });
      }
      throw error;
    }
  }

  get state(): 'created' | 'running' | 'paused' | 'stopping' {
    return (['created', 'running', 'paused', 'stopping'] as const)[Atomics.load(this.#control, STATE)]!;
  }

  /** Guest RAM, shared with the guest (no copy). */
  get memory(): GuestMemory {
    return this.#memory;
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

  start(): void {
    if (Atomics.load(this.#control, STATE) !== RunState.Created) throw new Error(`machine is ${this.state}, not created`);
    if (this.#input) {
      this.#input.on('data', this.#onInput);
      this.#input.resume();
    }
    setRunState(this.#control, RunState.Running);
  }

  /** Stops every vCPU at its next exit (kicking those inside the guest) and waits until all are parked. */
  async pause(): Promise<void> {
    if (Atomics.load(this.#control, STATE) !== RunState.Running) throw new Error(`machine is ${this.state}, not running`);
    setRunState(this.#control, RunState.Paused);
    this.#kickAll();
    while (Atomics.load(this.#control, PARKED) < this.vcpuCount && Atomics.load(this.#control, STATE) === RunState.Paused) {
      const parked = Atomics.load(this.#control, PARKED);
      const result = Atomics.waitAsync(this.#control, PARKED, parked, 50);
      if (result.async) await result.value;
      this.#kickAll();
    }
  }

  resume(): void {
    if (Atomics.load(this.#control, STATE) !== RunState.Paused) throw new Error(`machine is ${this.state}, not paused`);
    setRunState(this.#control, RunState.Running);
  }

  /** Ends the machine (if still running) and resolves with its exit. */
  async stop(): Promise<MachineExit> {
    this.#end({ reason: 'stopped' });
    return this.#finished;
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
    await Promise.all(this.#threads.map(async (thread) => {
      const kickUntilDone = setInterval(() => this.#kickAll(), 20);
      try {
        await waitForDone(thread);
      } finally {
        clearInterval(kickUntilDone);
      }
    }));
    for (const thread of this.#threads) {
      thread.worker.off('message', this.#onWorkerMessage);
      thread.worker.off('error', this.#onWorkerError);
    }
    if (this.#input) this.#input.off('data', this.#onInput);
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
    const exit = this.#exit!;
    this.#finish(exit);
    this.emit('exit', exit);
  }
}

function readImage(file: string): Uint8Array {
  try {
    return readFileSync(file);
  } catch (error) {
    const e = error as NodeJS.ErrnoException;
    throw new Error(`cannot read the image ${file}: ${e.code ?? e.message}`);
  }
}

function waitForDone(thread: VcpuThread): Promise<void> {
  return new Promise((resolve) => {
    const onMessage = (message: WorkerMessage) => {
      if (message.type !== 'done') return;
      thread.worker.off('message', onMessage);
      thread.worker.off('exit', onExit);
      resolve();
    };
    const onExit = () => {
      thread.worker.off('message', onMessage);
      resolve();
    };
    thread.worker.on('message', onMessage);
    thread.worker.once('exit', onExit);
  });
}

