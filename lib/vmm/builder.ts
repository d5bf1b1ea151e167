// Building a machine's parts: the VM, guest RAM, the devices and disks, and one vCPU thread per
// vCPU, each created straight into its boot state or its saved state. Either every part is made,
// or all that was taken is given back (threads ended or returned to their pool, fds and mappings
// closed), whatever step failed.
import { MessageChannel, type MessagePort } from 'node:worker_threads';
import { bootMsrs, guestCpuid, memoryMap, writeBootPlan } from '../boot/index.js';
import { ByteRing, type ByteRingShared } from '../devices/byte-ring.js';
import { PAGE_SIZE } from '../kvm/constants.js';
import { Kvm, closeReleasedVcpu, encodeCpuid, encodeMsrs, type CpuidEntry, type GuestMemory, type Vm, type VcpuKickHandle } from '../kvm/index.js';
import { restoreParkedVcpu } from '../kvm/vcpu.js';
import { argValueError, ErrorCode } from '../kvm/errors.js';
import { checkDiskConfigs, type CheckedDiskConfig, type DiskConfig, type DiskShape } from './disks.js';
import { checkVirtioConfig, VirtioDevices, virtioMismatch, vsockConfigFor } from './virtio-devices.js';
import { netConfigsFor } from './nets.js';
import type { BuildPlan, MachineShape } from './config.js';
import { RunState, createControl, setRunState } from './control.js';
import { createHaltProbe } from './halt-watch.js';
import { createDevicesShared, type DevicesShared } from './devices.js';
import { DirtyBitmap } from './dirty-bitmap.js';
import { DEFAULT_DIRTY_RING_BYTES, dirtyLogModesOffered, maxDirtyRingBytes, slotBasePages, type DirtyLogMode } from './dirty-tracker.js';
import { abortError, fromThreadFailure, threadFailure } from './errors.js';
import { startVcpuThread, type VcpuThread } from './pool.js';
import type { VcpuAssignment, WorkerMessage } from './types.js';
import { restoreVmState, saveVmState, type VmState } from './vm-state.js';
import { addRamAndIrqchip, RAM_SLOT, setVmAddresses, type SpareVm } from './spare-vm.js';

export { PC_GSI_ROUTES, RAM_SLOT } from './spare-vm.js';

// What the host's KVM offers does not change while the process runs: asked once.
let msrIndexListCache: number[] | null = null;
let supportedCpuidCache: CpuidEntry[] | null = null;

/** Bytes of serial output between the vCPU threads and the main thread, which drains them. */
const SERIAL_OUTPUT_RING_BYTES = 64 * 1024;

/** Where the guest's serial output goes, past the ring: the machine's console, a stream, or nowhere. */
export type SerialOutputTarget = { kind: 'console' } | { kind: 'stream'; stream: NodeJS.WritableStream } | { kind: 'discard' };

/** A machine's parts, built and wired, its vCPUs created and waiting for the machine to start. */
export interface MachineParts {
  plan: BuildPlan;
  kvm: Kvm;
  vm: Vm;
  memory: GuestMemory;
  dirty: DirtyBitmap;
  control: Int32Array;
  /** With the irqchip: the vCPUs' answers to the halt watch (halt-watch.ts). */
  haltProbe: SharedArrayBuffer | null;
  threads: VcpuThread[];
  /** Resolve as each vCPU thread leaves this machine's assignment (or ends). */
  threadsLeft: Promise<void>[];
  /**
   * Null: the build waited until every vCPU thread had its vCPU. Otherwise they take theirs
   * while the machine is made and starts (see below): rejects if one cannot, which ends the
   * machine with that error.
   */
  threadsReady: Promise<void> | null;
  kicks: VcpuKickHandle[];
  /** The main thread's ends of the vCPUs' request channels (save, restore). */
  requestPorts: MessagePort[];
  /** The CPUID each vCPU was given (a kvm_cpuid2), where this thread knows it (not for a restored machine). */
  cpuids: (Uint8Array | null)[];
  devices: DevicesShared;
  virtio: VirtioDevices;
  /** The interrupt controllers and PIT as a booted machine's start (a reboot puts them back); null otherwise. */
  powerOnVm: VmState | null;
  dirtyLog: DirtyLogMode;
  /** Serial output bound for the console or a stream (or discarded): the vCPU threads fill it, the machine drains it. */
  outputRing: ByteRing | null;
  /** Where the drained output goes (nothing is drained with an fd: the vCPU threads write it). */
  outputTarget: SerialOutputTarget | null;
  log: (message: string) => void;
  /** Gives everything back: for a machine that fails after its parts were built. */
  dispose(): Promise<void>;
}

export function logToStderr(message: string): void {
  process.stderr.write(`node-kvm: ${message}\n`);
}

export async function buildParts(plan: BuildPlan): Promise<MachineParts> {
  const { shape, runtime } = plan;
  const vcpus = shape.vcpus;
  const log = runtime.log ?? logToStderr;
  const dirtyLog = runtime.dirtyLog ?? 'bitmap';
  if (dirtyLog !== 'bitmap' && dirtyLog !== 'ring') throw argValueError(`dirtyLog must be 'bitmap' or 'ring', got ${String(dirtyLog)}`);
  const signal = plan.signal;
  const abortMessage = 'the machine was not built: aborted';
  if (signal?.aborted) throw abortError(signal, abortMessage);

  // Checked before any thread starts: a bad configuration leaves nothing behind.
  const diskConfigs = plan.savedDisks ? diskConfigsFor(plan.savedDisks, runtime.disks) : checkDiskConfigs(runtime.disks);
  const virtioConfig = checkVirtioConfig(diskConfigs, shape.rng, netConfigsFor(shape.net ?? [], runtime.net), vsockConfigFor(shape.vsock, runtime.vsock));
  // Taken (or started) without waiting for them to load: each is sent its vCPU below at once.
  const threadsPromise = runtime.pool ? runtime.pool.acquire(vcpus) : Promise.resolve(Array.from({ length: vcpus }, startVcpuThread));
  threadsPromise.catch(() => {});
  // What to undo if a step fails, last taken first. The vCPU threads are given back before any
  // of it: a thread that took its assignment uses the VM and guest RAM until it has left it.
  const cleanup: (() => void | Promise<void>)[] = [];
  let threads: VcpuThread[] | null = null;
  let assigned: { control: Int32Array; left: Promise<void>[] } | null = null;
  const giveBack = async () => {
    threads ??= await threadsPromise.catch(() => []);
    if (assigned) {
      // Each thread leaves its assignment (or never takes it, if it failed to load) first.
      setRunState(assigned.control, RunState.Stopping);
      await Promise.all(assigned.left);
    }
    if (runtime.pool) runtime.pool.release(threads);
    else for (const thread of threads) thread.send({ type: 'quit' });
    for (const undo of cleanup) await undo();
  };
  // An abort rejects the step under way at once; what that step takes is given back all the same.
  let onAbort = () => {};
  const aborted = signal ? new Promise<never>((_, reject) => (onAbort = () => reject(abortError(signal, abortMessage)))) : null;
  aborted?.catch(() => {});
  signal?.addEventListener('abort', onAbort, { once: true });
  const step = <T>(promise: Promise<T>): Promise<T> => (aborted ? Promise.race([promise, aborted]) : promise);
  const checkAborted = () => {
    if (signal?.aborted) throw abortError(signal, abortMessage);
  };
  try {
    // A restore whose RAM can be mapped over a slot made ahead takes the pool's spare VM, if it
    // fits. Not with a dirty ring, which KVM wants before any vCPU, and the spare has its vCPUs.
    const spare: SpareVm | null = plan.mapMemoryOver && runtime.kvmPath === undefined && dirtyLog !== 'ring' ? runtime.pool?.takeSpareVm(shape) ?? null : null;
    const kvm = spare?.kvm ?? Kvm.open(runtime.kvmPath);
    cleanup.unshift(() => kvm.close());
    const vm = spare?.vm ?? kvm.createVm();
    // (Its last close runs KVM's teardown of the VM, 15-20 ms: not on the event loop.)
    cleanup.unshift(() => vm.closeAsync());
    if (!spare) setVmAddresses(vm);
    const memory = spare?.memory ?? await plan.memory(shape.memoryBytes);
    cleanup.unshift(() => memory.close());
    // Its vCPUs that no thread adopted (the threads close those they did).
    if (spare) cleanup.unshift(() => spare.vcpus.forEach((vcpu) => closeReleasedVcpu(vcpu.released)));
    if (spare) plan.mapMemoryOver!(memory);
    else addRamAndIrqchip(vm, memory, shape.irqchip);
    checkAborted();
    // The interrupt controllers' state before the vCPUs': a LAPIC's refers to the IOAPIC's.
    if (plan.state) restoreVmState(vm, plan.state.vm, shape.irqchip);
    const powerOnVm = plan.boot && shape.irqchip ? saveVmState(vm, true) : null;
    // The ring must exist before any vCPU (api.rst, KVM_CAP_DIRTY_LOG_RING).
    if (dirtyLog === 'ring') {
      if (!dirtyLogModesOffered(vm).includes('ring')) throw argValueError('this host\'s KVM offers no dirty ring (KVM_CAP_DIRTY_LOG_RING): use dirtyLog \'bitmap\'');
      vm.enableDirtyRing(Math.min(DEFAULT_DIRTY_RING_BYTES, maxDirtyRingBytes(vm)));
    }
    const dirty = DirtyBitmap.create(memory.size / PAGE_SIZE);
    // Their threads start (parked) while the vCPU threads do. A machine that waits for an
    // incoming migration locks its images only once the source has let go of them.
    const virtioPromise = VirtioDevices.open(virtioConfig, { vm, memory, dirty, irqchip: shape.irqchip, log, lock: !plan.incoming });
    virtioPromise.catch(() => {});
    cleanup.unshift(async () => (await virtioPromise.catch(() => null))?.close());

    const output = runtime.serial?.output;
    let outputRing: ByteRing | null = null;
    let outputTarget: SerialOutputTarget | null = null;
    let serialOutput: { fd: number } | { ring: ByteRingShared };
    if (typeof output === 'number') {
      serialOutput = { fd: output };
    } else {
      outputRing = ByteRing.create(SERIAL_OUTPUT_RING_BYTES);
      serialOutput = { ring: outputRing.shared };
      outputTarget = output === undefined ? { kind: 'console' } : output === null ? { kind: 'discard' } : { kind: 'stream', stream: output };
    }
    const virtio = await step(virtioPromise);
    const unfit = plan.savedDisks ? disksMismatch(plan.savedDisks, virtio.diskShapes) : null;
    if (unfit) throw argValueError(`the saved machine's disks do not fit: ${unfit}`);
    const devices = createDevicesShared({
      serialOutput, virtio: virtio.mmio,
      fwCfg: { memoryBytes: shape.memoryBytes, vcpus, cmdline: plan.cmdline, memoryMap: memoryMap(shape.memoryBytes) },
      rtc: { memoryBytes: shape.memoryBytes, vcpus },
    });
    const control = new Int32Array(createControl(vcpus));
    const haltProbe = shape.irqchip ? createHaltProbe(vcpus) : null;
    supportedCpuidCache ??= kvm.getSupportedCpuid();
    const supported = supportedCpuidCache;
    const msrs = plan.state ? null : encodeMsrs(bootMsrs());
    msrIndexListCache ??= kvm.getMsrIndexList();
    const channels = Array.from({ length: vcpus }, () => new MessageChannel());
    cleanup.unshift(() => channels.forEach((channel) => channel.port1.close()));

    threads = await step(threadsPromise);
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
          reject(fromThreadFailure(`vCPU ${id} could not start: `, message.failure ?? { error: 'it left before it had started' }));
        } else if (message.type === 'log') {
          log(message.message);
        }
      };
      thread.worker.on('message', onMessage);
      thread.loaded.catch((error: Error) => {
        thread.worker.off('message', onMessage);
        const code = (error as { code?: unknown }).code;
        reject(fromThreadFailure(`vCPU ${id} could not start: `, { error: error.message, code: typeof code === 'string' ? code : ErrorCode.WorkerInitFailed, cause: error }));
      });
    }));
    ready.forEach((promise) => promise.catch(() => {}));
    // Watched from before the assignment goes out, so that a thread's 'done' is never missed.
    const left = taken.map((thread) => waitForDone(thread));
    assigned = { control, left };
    // Kept here too: a restore compares a state's CPUID with it rather than asking KVM.
    const cpuids = taken.map((_, id) => (plan.state ? null : encodeCpuid(guestCpuid(supported, id, vcpus))));
    // The spare's vCPUs take their saved states from this thread (below, while their threads
    // start on the rest), when the states are raw, as a snapshot's are.
    const spareVcpus = spare?.vcpus ?? null;
    const restoreAhead = spareVcpus !== null && plan.state != null && plan.state.vcpus.every((state) => state instanceof Uint8Array);
    taken.forEach((thread, id) => {
      const requests = channels[id]!.port2;
      thread.send({
        type: 'assign',
        assignment: {
          vmFd: vm.fd, memory: memory.handle, vcpuId: id, vcpuCount: vcpus, boot: id === 0 ? plan.boot?.bsp ?? null : null,
          cpuid: cpuids[id] ?? spareVcpus?.[id]!.cpuid ?? null, msrs, control: control.buffer as SharedArrayBuffer, devices, irqchip: shape.irqchip, haltProbe,
          affinity: runtime.affinity?.[id] ? [...runtime.affinity[id]!] : null,
          requests, dirtyBitmap: dirty.shared, memoryPages: dirty.pageCount, slotBasePages: [...slotBasePages([{ slot: RAM_SLOT, guestPhysAddr: 0 }])],
          msrIndexList: msrIndexListCache!, restore: plan.state?.vcpus[id] ?? null,
          vcpu: spareVcpus?.[id]!.released ?? null, restoredAhead: restoreAhead,
        } satisfies VcpuAssignment,
      }, [requests]);
    });
    if (restoreAhead) {
      (plan.state!.vcpus as Uint8Array[]).forEach((state, id) => {
        let refused: number[];
        try {
          refused = restoreParkedVcpu(spareVcpus![id]!.released, state, spareVcpus![id]!.cpuid, shape.irqchip);
        } catch (error) {
          throw fromThreadFailure(`vCPU ${id} could not start: `, threadFailure(error));
        }
        if (refused.length > 0) log(`vcpu${id}: the host refused MSRs ${refused.map((index) => `0x${index.toString(16)}`).join(', ')}`);
      });
    }
    if (plan.boot) {
      writeBootPlan(plan.boot, memory);
      for (const write of plan.boot.writes) dirty.mark(write.guestPhysAddr, 'data' in write ? write.data.length : write.zeroBytes);
    }
    // Each thread's part is then all that is left: adopting a vCPU made and restored already, and
    // attaching the devices, which fail only if something is broken. The machine then need not
    // wait for them (they wake up slowly on a busy host): it is made and may start while they
    // finish (a thread that has not yet parked is waited for as a parked one is by pause(); one
    // that fails ends the machine with its error). Not for a thread still loading, which may
    // fail to load, nor with CPU affinity to set, which the host may refuse: a build waits for those.
    const waitForThreads = !restoreAhead || runtime.affinity !== undefined || taken.some((thread) => thread.status !== 'loaded');
    if (!waitForThreads) {
      spareVcpus!.forEach((vcpu, id) => (kicks[id] = vcpu.released));
      const threadsReady = Promise.all(ready).then(() => {});
      threadsReady.catch(() => {}); // (the machine takes it up; a build that fails after this does not)
      checkAborted();
      return {
        plan, kvm, vm, memory, dirty, control, haltProbe, threads: taken, threadsLeft: left, threadsReady, kicks,
        requestPorts: channels.map((channel) => channel.port1), cpuids, devices, virtio, powerOnVm, dirtyLog, outputRing, outputTarget, log, dispose: giveBack,
      };
    }
    await step(Promise.all(ready));
    checkAborted();
    return {
      plan, kvm, vm, memory, dirty, control, haltProbe, threads: taken, threadsLeft: left, threadsReady: null, kicks, requestPorts: channels.map((channel) => channel.port1), cpuids,
      devices, virtio, powerOnVm, dirtyLog, outputRing, outputTarget, log, dispose: giveBack,
    };
  } catch (error) {
    await giveBack();
    throw error;
  } finally {
    signal?.removeEventListener('abort', onAbort);
    // The next spare VM in this shape, once this build is over.
    runtime.pool?.noteMachineShape(shape);
  }
}

/** Why a saved machine's disks do not fit the disks of a machine, or null if they do. */
export function disksMismatch(saved: DiskShape[] | undefined, mine: DiskShape[] | undefined): string | null {
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

/** Whether a machine of `shape` can take a saved state of `saved`'s shape; null if it can. */
export function shapeMismatch(saved: MachineShape, shape: MachineShape): string | null {
  if (saved.memoryBytes !== shape.memoryBytes || saved.vcpus !== shape.vcpus || saved.irqchip !== shape.irqchip) return 'different hardware';
  return disksMismatch(saved.disks, shape.disks) ?? virtioMismatch(saved, shape);
}

/** The disks to open for a saved machine: its own paths, or the ones this host was given for them. */
function diskConfigsFor(saved: DiskShape[] | undefined, given: DiskConfig[] | undefined): CheckedDiskConfig[] {
  const disks = saved ?? [];
  if (given === undefined) return checkDiskConfigs(disks.map((disk) => ({ path: disk.path, readOnly: disk.readOnly, id: disk.id })));
  const configs = checkDiskConfigs(given);
  if (configs.length !== disks.length) throw argValueError(`the saved machine had ${disks.length} disk${disks.length === 1 ? '' : 's'}, ${configs.length} given`);
  return configs.map((config, index) => ({ ...config, readOnly: disks[index]!.readOnly, id: disks[index]!.id }));
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
