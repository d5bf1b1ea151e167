// A vCPU thread. It creates its vCPU (KVM wants vCPU ioctls from the creating thread), loops on
// run(), and handles every exit itself through the I/O bus: nothing goes to the main thread per
// exit. Between machines it idles, so a pool can hand it to the next machine.
import { parentPort, receiveMessageOnPort, type MessagePort } from 'node:worker_threads';
// Narrow imports: a thread that starts fast loads only what a vCPU loop needs.
import { applyBootState } from '../boot/cpu-state.js';
import { ExitReason } from '../kvm/constants.js';
import { setThreadAffinity, setThreadBatch, setThreadName } from '../kvm/thread.js';
import { decodeCpuid, encodeCpuid } from '../kvm/lists.js';
import { VcpuStateFlag, VcpuStateTag, vcpuStateBlobHeader, vcpuStateBlobSections } from '../kvm/vcpu-state-blob.js';
import type { CpuidEntry } from '../kvm/structs.js';
import { adoptVcpu, type Vcpu } from '../kvm/vcpu.js';
import { Vm } from '../kvm/vm.js';
import { GuestMemory } from '../kvm/memory.js';
import { RunState, STATE, HALTED, THROTTLE_PERCENT, claimExit, pauseFromVcpu, setRunState, stoppedAtTimes, waitWhileNotRunning } from './control.js';
import { sleepIfThrottled } from './throttle-sleep.js';
import { attachDevices } from './devices.js';
import { DirtyBitmap } from './dirty-bitmap.js';
import { answerHaltProbe } from './halt-watch.js';
import { fpuFromXsave, fpuIntoXsave } from './xsave-fpu.js';
import { spillDirtyRing } from './dirty-tracker.js';
import { countExit } from './exit-stats.js';
import { TraceWriter } from './exit-trace.js';
import { readableMsrs, restoreVcpuState, type RawVcpuState, type VcpuState } from './vcpu-state.js';
import { ErrorCode, NodeKvmError } from '../kvm/errors.js';
import { threadFailure, type ThreadFailure } from './errors.js';
import type { MachineExit, MainMessage, VcpuAssignment, VcpuReply, VcpuRequest, WorkerMessage } from './types.js';
import { phaseClockMs, phaseTimingEnabled } from './phase-timing.js';

const phaseTiming = phaseTimingEnabled();
// A thread's first read of `performance` loads its module (0.7 ms here): with phase timing on, as
// the thread starts, not at the pause's kick it times.
if (phaseTiming) phaseClockMs();

const port = parentPort;
if (!port) throw new NodeKvmError(ErrorCode.WorkerInitFailed, 'vcpu-worker runs in a worker thread');
/** Posts a message; one whose error cannot be cloned goes without it (its message and code still do). */
const post = (message: WorkerMessage) => {
  try {
    port.postMessage(message);
  } catch (error) {
    if (!('failure' in message) || !message.failure?.cause) throw error;
    port.postMessage({ ...message, failure: { ...message.failure, cause: undefined } });
  }
};

const handle = (message: MainMessage) => {
  if (message.type === 'quit') {
    port.close();
    return;
  }
  let failure: ThreadFailure | undefined;
  try {
    runAssignment(message.assignment);
  } catch (e) {
    failure = threadFailure(e);
  }
  setThreadName('vcpu-idle');
  post({ type: 'done', vcpuId: message.assignment.vcpuId, ...(failure ? { failure } : {}) });
};
port.on('message', handle);
setThreadName('vcpu-idle');
post({ type: 'idle' });
// A machine sends its assignment before this thread has loaded: take what waits already as soon
// as this module has run, not on a later turn of the event loop.
queueMicrotask(() => {
  for (let queued = receiveMessageOnPort(port); queued; queued = receiveMessageOnPort(port)) handle(queued.message as MainMessage);
});

function runAssignment(assignment: VcpuAssignment): void {
  const control = new Int32Array(assignment.control);
  const id = assignment.vcpuId;
  setThreadName(`vcpu${id}`);
  if (assignment.affinity) setThreadAffinity(assignment.affinity);

  using vm = Vm.fromFd(assignment.vmFd);
  const report = (exit: MachineExit) => {
    if (claimExit(control)) post({ type: 'exit', exit });
    setRunState(control, RunState.Stopping);
  };
  const dirty = DirtyBitmap.attach(assignment.dirtyBitmap, assignment.memoryPages);
  // Guest RAM is mapped into this thread only when a device first reaches it (fw_cfg DMA): a
  // large external buffer costs a garbage collection, which most guests never need to pay.
  let memory: GuestMemory | null = null;
  const ram = { bytes: () => (memory ??= GuestMemory.attach(assignment.memory)).bytes(), dirty };
  const { bus } = attachDevices(assignment.devices, {
    setIrqLine: assignment.irqchip ? (gsi, level) => vm.setIrqLine(gsi, level) : undefined,
    debugExit: (code) => report({ reason: 'debug-exit', code, vcpu: id }),
    reset: () => report({ reason: 'reset', vcpu: id }),
    powerOff: () => report({ reason: 'poweroff', vcpu: id }),
    log: (message) => post({ type: 'log', message: `vcpu${id}: ${message}` }),
  }, ram);
  using _releaseMemory = { [Symbol.dispose]: () => memory?.close() };

  // A spare VM's vCPU was made (and, in a restore, given its state) by the main thread ahead.
  using vcpu = assignment.vcpu ? adoptVcpu(assignment.vcpu) : vm.createVcpu(id);
  const thread: VcpuThreadState = {
    vcpu, vm, control, assignment, report, bus, dirty, haltProbe: assignment.haltProbe ? new Int32Array(assignment.haltProbe) : null, halted: false, savedMsrs: null, stoppedAt: stoppedAtTimes(control),
    slotBasePages: new Map(assignment.slotBasePages), cpuid: null, stats: null, trace: null, registersAtStop: false, powerOn: null,
  };
  if (assignment.restore && assignment.restoredAhead) {
    noteRestored(thread, assignment.restore as RawVcpuState);
  } else if (assignment.restore) {
    // An adopted vCPU holds the CPUID it was made with: the restore compares the saved one with it.
    if (assignment.vcpu) thread.cpuid = assignment.cpuid;
    restoreInto(thread, assignment.restore);
  } else {
    if (!assignment.cpuid || !assignment.msrs) throw new NodeKvmError(ErrorCode.VcpuFailed, 'a vCPU that is not restored needs its CPUID and MSRs');
    // CPUID before MSRs: KVM accepts some MSRs only once the CPUID says they exist.
    vcpu.setCpuid2(assignment.cpuid);
    thread.cpuid = assignment.cpuid;
    vcpu.setMsrs(assignment.msrs);
    if (assignment.boot) applyBootState(vcpu, assignment.boot);
  }
  const serve = () => serveRequests(thread);
  post({ type: 'ready', vcpuId: id, kick: vcpu.kickHandle });
  // Kept for a reboot, read while the machine finishes its build: the state KVM and the boot plan
  // gave the vCPU (a restored one has no image to boot again).
  if (!assignment.restore && assignment.boot) thread.powerOn = readPowerOnState(vcpu, assignment.irqchip);
  try {
    // Until the machine starts, as SCHED_BATCH: woken by start(), this thread does not take the
    // CPU from the main thread, which has the rest of start() to do (on a host with every CPU
    // busy, a woken thread would, for a slice of a few ms). The guest runs with the usual policy:
    // its thread, woken (a halt's interrupt), takes the CPU.
    setThreadBatch(true);
    const started = waitWhileNotRunning(control, serve);
    setThreadBatch(false);
    if (!started) return;
    if (thread.halted && !haltUntilStopped(thread, serve)) return;
    runLoop(thread, serve);
  } finally {
    setThreadBatch(false);
    thread.trace?.flush();
    assignment.requests.close();
  }
}

interface VcpuThreadState {
  readonly vcpu: Vcpu;
  readonly vm: Vm;
  readonly control: Int32Array;
  readonly assignment: VcpuAssignment;
  readonly report: (exit: MachineExit) => void;
  readonly bus: ReturnType<typeof attachDevices>['bus'];
  readonly dirty: DirtyBitmap;
  readonly slotBasePages: ReadonlyMap<number, number>;
  readonly haltProbe: Int32Array | null;
  /** Halted with no in-kernel irqchip: only a restore or the machine's end moves it on. */
  halted: boolean;
  /** The MSRs a save reads (readableMsrs(), probed at the first save). */
  savedMsrs: Uint32Array | null;
  /** With phase timing on: when the last kick took each vCPU out of the guest for a pause (control.ts). */
  readonly stoppedAt: Float64Array;
  /** The CPUID this vCPU was given (null until it has one), as entries once a save or restore needed them. */
  cpuid: CpuidEntry[] | Uint8Array | null;
  /** Exit counters (exit-stats.ts) while someone asked for them. */
  stats: Float64Array | null;
  /** The state before the first run, for a reboot (null for a restored vCPU). */
  powerOn: PowerOnState | null;
  /** The exit trace's writer (exit-trace.ts) while the machine traces. */
  trace: TraceWriter | null;
  /** A debugger wants this vCPU's registers with each debug stop. */
  registersAtStop: boolean;
}

function cpuidEntries(thread: VcpuThreadState): CpuidEntry[] | null {
  if (thread.cpuid instanceof Uint8Array) thread.cpuid = decodeCpuid(thread.cpuid);
  return thread.cpuid;
}

/** The CPUID this vCPU was given, as a kvm_cpuid2 (what saves carry and restores compare with). */
function cpuidBytes(thread: VcpuThreadState): Uint8Array {
  if (!(thread.cpuid instanceof Uint8Array)) thread.cpuid = encodeCpuid(thread.cpuid ?? thread.vcpu.getCpuid2());
  return thread.cpuid;
}

/** The vCPU's whole state in one native call (the machine is paused, or this vCPU between two runs). */
function saveRaw(thread: VcpuThreadState): RawVcpuState {
  thread.savedMsrs ??= Uint32Array.from(readableMsrs(thread.vcpu, thread.assignment.msrIndexList));
  return thread.vcpu.saveState(thread.savedMsrs, cpuidBytes(thread), { lapic: thread.assignment.irqchip, vmmHalted: thread.halted });
}

/**
 * Serves the main thread's requests while this vCPU is parked (created or paused), or between two
 * runs (`running`): then only saves, which read a vCPU that is stopped for that moment anyway.
 */
function serveRequests(thread: VcpuThreadState, running = false): void {
  const port: MessagePort = thread.assignment.requests;
  for (let received = receiveMessageOnPort(port); received; received = receiveMessageOnPort(port)) {
    const request = received.message as VcpuRequest;
    let reply: VcpuReply | undefined;
    try {
      if ((request.type === 'restore' || request.type === 'debug-write') && running) {
        reply = { seq: request.seq, type: 'failed', error: 'a running vCPU cannot take a saved state', code: ErrorCode.MachineState };
      } else if (request.type.startsWith('debug-') || request.type === 'guest-debug') {
        if (request.type === 'guest-debug') thread.registersAtStop = request.registersAtStop === true;
        reply = serveDebugRequest(thread.vcpu, request);
      } else if (request.type === 'save') {
        reply = { seq: request.seq, type: 'saved', state: saveRaw(thread) };
      } else if (request.type === 'restore') {
        reply = { seq: request.seq, type: 'restored', refusedMsrs: restoreInto(thread, request.state) };
      } else if (request.type === 'restored') {
        if (request.cpuid) thread.cpuid = request.cpuid;
        setVmmHalted(thread, request.vmmHalted);
        reply = { seq: request.seq, type: 'done' };
      } else if (request.type === 'reboot') {
        reply = rebootInto(thread, request.seq);
      } else if (request.type === 'exit-stats') {
        thread.stats = request.buffer ? new Float64Array(request.buffer) : null;
        reply = { seq: request.seq, type: 'done' };
      } else if (request.type === 'exit-trace') {
        thread.trace?.flush();
        thread.trace = request.fd === null ? null : new TraceWriter(request.fd, thread.assignment.vcpuId, request.startMs);
        TraceWriter.syncRip(thread.vcpu.kvmRun.view, thread.trace !== null);
        reply = { seq: request.seq, type: 'done' };
      }
    } catch (e) {
      reply = { seq: request.seq, type: 'failed', ...threadFailure(e) };
    }
    reply ??= { seq: request.seq, type: 'failed', error: `unknown request '${request.type}'`, code: ErrorCode.VcpuFailed };
    try {
      port.postMessage(reply);
    } catch {
      // An error that cannot cross threads goes without its cause.
      port.postMessage({ ...reply, cause: undefined });
    }
  }
}

/** A debugger's request (lib/debug): registers, or the guest-debug settings. */
function serveDebugRequest(vcpu: Vcpu, request: VcpuRequest): VcpuReply | undefined {
  if (request.type === 'debug-read') return { seq: request.seq, type: 'debug-state', regs: vcpu.getRegs(), sregs: vcpu.getSregs(), fpu: fpuFromXsave(vcpu.getXsave()) };
  if (request.type === 'debug-write') {
    if (request.sregs) vcpu.setSregs(request.sregs);
    if (request.regs) vcpu.setRegs(request.regs);
    if (request.fpu) {
      const region = vcpu.getXsave();
      fpuIntoXsave(request.fpu, region);
      vcpu.setXsave(region);
    }
    return { seq: request.seq, type: 'debug-done' };
  }
  if (request.type === 'guest-debug') {
    vcpu.setGuestDebug(request.options);
    return { seq: request.seq, type: 'debug-done' };
  }
  return undefined;
}

/** What a reboot puts back; the MSRs and CPUID come from the assignment, which set them first. */
interface PowerOnState {
  mpState: ReturnType<Vcpu['getMpState']>;
  regs: ReturnType<Vcpu['getRegs']>;
  sregs: ReturnType<Vcpu['getSregs']>;
  xsave: ReturnType<Vcpu['getXsave']>;
  xcrs: ReturnType<Vcpu['getXcrs']>;
  debugRegs: ReturnType<Vcpu['getDebugRegs']>;
  lapic: ReturnType<Vcpu['getLapic']> | null;
  events: ReturnType<Vcpu['getVcpuEvents']>;
}

function readPowerOnState(vcpu: Vcpu, irqchip: boolean): PowerOnState {
  return {
    mpState: vcpu.getMpState(), regs: vcpu.getRegs(), sregs: vcpu.getSregs(), xsave: vcpu.getXsave(), xcrs: vcpu.getXcrs(),
    debugRegs: vcpu.getDebugRegs(), lapic: irqchip ? vcpu.getLapic() : null, events: vcpu.getVcpuEvents(),
  };
}

/** Puts the vCPU back as it was before it first ran (a parked vCPU of a machine being rebooted). */
function rebootInto(thread: VcpuThreadState, seq: number): VcpuReply {
  const state = thread.powerOn;
  if (!state) return { seq, type: 'failed', error: 'this vCPU was restored: it has no power-on state to go back to', code: ErrorCode.MachineState };
  const vcpu = thread.vcpu;
  vcpu.setMpState(state.mpState);
  vcpu.setRegs(state.regs);
  vcpu.setSregs(state.sregs);
  vcpu.setXsave(state.xsave);
  if (state.xcrs.length > 0) vcpu.setXcrs(state.xcrs);
  vcpu.setDebugRegs(state.debugRegs);
  if (state.lapic) vcpu.setLapic(state.lapic);
  if (thread.assignment.msrs) vcpu.setMsrs(thread.assignment.msrs);
  vcpu.setVcpuEvents(state.events);
  if (thread.halted) {
    Atomics.sub(thread.control, HALTED, 1);
    thread.halted = false;
  }
  return { seq, type: 'done' };
}

/** Puts a saved state on this thread's vCPU; returns the MSRs the host refused (also logged). */
function restoreInto(thread: VcpuThreadState, state: VcpuState | RawVcpuState): number[] {
  let refusedMsrs: number[];
  let vmmHalted: boolean;
  if (state instanceof Uint8Array) {
    refusedMsrs = thread.vcpu.restoreState(state, cpuidBytes(thread), thread.assignment.irqchip);
    thread.cpuid = vcpuStateBlobSections(state).get(VcpuStateTag.Cpuid)?.slice() ?? thread.cpuid;
    vmmHalted = (vcpuStateBlobHeader(state).flags & VcpuStateFlag.VmmHalted) !== 0;
  } else {
    refusedMsrs = restoreVcpuState(thread.vcpu, state, thread.assignment.irqchip, cpuidEntries(thread));
    thread.cpuid = state.cpuid;
    vmmHalted = state.vmmHalted;
  }
  setVmmHalted(thread, vmmHalted);
  if (refusedMsrs.length > 0) {
    post({ type: 'log', message: `vcpu${thread.assignment.vcpuId}: the host refused MSRs ${refusedMsrs.map((index) => `0x${index.toString(16)}`).join(', ')}` });
  }
  return refusedMsrs;
}

/** What the vCPU holds once another thread restored `state` on it (restoreParkedVcpu()). */
function noteRestored(thread: VcpuThreadState, state: RawVcpuState): void {
  thread.cpuid = vcpuStateBlobSections(state).get(VcpuStateTag.Cpuid)?.slice() ?? thread.assignment.cpuid;
  setVmmHalted(thread, (vcpuStateBlobHeader(state).flags & VcpuStateFlag.VmmHalted) !== 0);
}

/** A restored state says whether the VMM keeps this vCPU halted (no in-kernel irqchip). */
function setVmmHalted(thread: VcpuThreadState, vmmHalted: boolean): void {
  if (vmmHalted === thread.halted) return;
  Atomics.add(thread.control, HALTED, vmmHalted ? 1 : -1);
  thread.halted = vmmHalted;
}

/** What a loop returns: this vCPU is done, or it must go on in the other loop (counting turned on or off). */
const DONE = 0;
const SWITCH = 1;

/**
 * Runs the vCPU until it is done. Two loops: the plain one, and one that also counts and traces
 * exits; a thread takes the requests that turn counting on or off only at a kick or while parked,
 * and only there does a loop look whether it is still the right one, so the plain loop's exit
 * path has no test for it.
 */
function runLoop(thread: VcpuThreadState, serve: () => void): void {
  for (;;) {
    if ((instrumented(thread) ? runInstrumented(thread, serve) : runPlain(thread, serve)) === DONE) return;
  }
}

const instrumented = (thread: VcpuThreadState): boolean => thread.stats !== null || thread.trace !== null;

/**
 * At a kick's exit: the requests that may be served between two runs (a save, to warm up, turning
 * counting on or off), and the halt watch's question.
 */
function onKick(thread: VcpuThreadState): void {
  // When the guest stopped for a pause, for the downtime's breakdown.
  if (phaseTiming) thread.stoppedAt[thread.assignment.vcpuId] = Atomics.load(thread.control, STATE) === RunState.Running ? 0 : phaseClockMs();
  serveRequests(thread, true);
  if (thread.haltProbe) answerHaltProbe(thread.haltProbe, thread.vcpu, thread.assignment.vcpuId);
  // While a migration throttles the guest (throttle.ts), each kick may be the throttle's tick.
  if (Atomics.load(thread.control, THROTTLE_PERCENT) !== 0) sleepIfThrottled(thread.control, () => serveRequests(thread, true));
}

function runPlain(thread: VcpuThreadState, serve: () => void): number {
  const { vcpu, bus, control, report } = thread;
  const run = vcpu.kvmRun;
  const id = thread.assignment.vcpuId;
  for (;;) {
    let reason: number;
    try {
      reason = vcpu.run();
    } catch (e) {
      report({ reason: 'error', vcpu: id, detail: (e as Error).message, registers: dump(vcpu) });
      return DONE;
    }
    if (reason === ExitReason.Io) {
      bus.handleIo(run);
    } else if (reason === ExitReason.Mmio) {
      bus.handleMmio(run);
    } else if (reason === ExitReason.Intr) {
      onKick(thread);
      if (instrumented(thread)) return SWITCH;
    } else if (!handleRareExit(thread, reason, serve)) {
      return DONE;
    }
    if (Atomics.load(control, STATE) !== RunState.Running) {
      if (!parkAfter(thread, reason, serve)) return DONE;
      if (instrumented(thread)) return SWITCH;
    }
  }
}

/** Parks the vCPU after an exit of `reason` while the machine is not running; false once it ends. */
function parkAfter(thread: VcpuThreadState, reason: number, serve: () => void): boolean {
  if (reason === ExitReason.Io || reason === ExitReason.Mmio) completeIo(thread);
  return waitWhileNotRunning(thread.control, serve);
}

/**
 * Finishes the port or MMIO access the last exit asked for, before the vCPU parks: KVM completes
 * it (an IN's data into RAX, RIP past the instruction) only at the next KVM_RUN (api.rst,
 * KVM_RUN), so a state saved, restored or rebooted before then would run the access again (an
 * OUT printed twice, an IN taking a second byte) or lose it. KVM_RUN with immediate_exit
 * completes it and returns at once; an access in fragments may exit once more for the next.
 */
function completeIo(thread: VcpuThreadState): void {
  const { vcpu, bus } = thread;
  const run = vcpu.kvmRun;
  for (let reason = ExitReason.Io as number; reason === ExitReason.Io || reason === ExitReason.Mmio;) {
    run.immediateExit = 1;
    try {
      reason = vcpu.run();
    } catch {
      return; // the next run reports it
    }
    if (reason === ExitReason.Io) bus.handleIo(run);
    else if (reason === ExitReason.Mmio) bus.handleMmio(run);
  }
}

/** runPlain(), timing each exit's handling and counting (exit-stats.ts) or tracing (exit-trace.ts) it. */
function runInstrumented(thread: VcpuThreadState, serve: () => void): number {
  const { vcpu, bus, control, report } = thread;
  const run = vcpu.kvmRun;
  const { view, bytes } = run;
  const id = thread.assignment.vcpuId;
  for (;;) {
    let reason: number;
    try {
      reason = vcpu.run();
    } catch (e) {
      report({ reason: 'error', vcpu: id, detail: (e as Error).message, registers: dump(vcpu) });
      return DONE;
    }
    const started = performance.now();
    if (reason === ExitReason.Io || reason === ExitReason.Mmio || reason === ExitReason.Intr) {
      const { trace, stats } = thread;
      if (reason === ExitReason.Io) bus.handleIo(run);
      else if (reason === ExitReason.Mmio) bus.handleMmio(run);
      else onKick(thread);
      // A kick that brought a new trace or fresh counters is not theirs (nor the old ones').
      if (trace === thread.trace) trace?.record(reason, view, bytes, started);
      if (stats && stats === thread.stats) countExit(stats, reason, view, performance.now() - started);
      if (reason === ExitReason.Intr && !instrumented(thread)) return SWITCH;
    } else {
      // Recorded before a HLT parks this thread until the machine's end.
      thread.trace?.record(reason, view, bytes, started);
      if (thread.stats) countExit(thread.stats, reason, view, 0);
      if (!handleRareExit(thread, reason, serve)) return DONE;
    }
    if (Atomics.load(control, STATE) !== RunState.Running) {
      if (!parkAfter(thread, reason, serve)) return DONE;
      if (!instrumented(thread)) return SWITCH;
    }
  }
}

/** Exits other than I/O and kicks. Returns false when this vCPU is done. */
function handleRareExit(thread: VcpuThreadState, reason: number, serve: () => void): boolean {
  const { vcpu, report } = thread;
  const id = thread.assignment.vcpuId;
  switch (reason) {
    case ExitReason.Hlt:
      // Only without an in-kernel irqchip (KVM handles HLT itself otherwise): this vCPU has
      // nothing left to run. The machine ends when every vCPU has halted.
      thread.halted = true;
      // Its records in the file now: a trace stopped meanwhile does not wait for this vCPU.
      thread.trace?.flush();
      Atomics.add(thread.control, HALTED, 1);
      return haltUntilStopped(thread, serve);
    case ExitReason.Debug: {
      // Guest debugging is on (a debugger set it): stop the machine and say where. The loop parks
      // this thread on the paused state; a vCPU that finds the machine paused already says nothing.
      const exit = vcpu.exit();
      if (exit.reason === 'debug' && pauseFromVcpu(thread.control)) {
        // For a debugger that reads them at every stop (gdb), the registers come along: that
        // spares it a round trip to this thread.
        const state = thread.registersAtStop ? { regs: vcpu.getRegs(), sregs: vcpu.getSregs(), fpu: fpuFromXsave(vcpu.getXsave()) } : undefined;
        post({ type: 'debug-stop', vcpuId: id, exception: exit.exception, dr6: exit.dr6, pc: exit.pc, state });
      }
      return true;
    }
    case ExitReason.DirtyRingFull:
      // The ring is full of pages not yet harvested: move them to the VMM's bitmap, run on.
      spillDirtyRing(vcpu, thread.vm, thread.slotBasePages, thread.dirty);
      return true;
    case ExitReason.Shutdown:
      report({ reason: 'shutdown', vcpu: id, detail: 'triple fault', registers: dump(vcpu) });
      return false;
    case ExitReason.SystemEvent: {
      const exit = vcpu.exit();
      const type = exit.reason === 'system-event' ? exit.type : 0;
      report({ reason: type === 2 ? 'reset' : 'shutdown', vcpu: id, detail: `system event ${type}`, registers: dump(vcpu) });
      return false;
    }
    case ExitReason.InternalError:
    case ExitReason.FailEntry:
      report({ reason: 'internal-error', vcpu: id, detail: describe(vcpu), registers: dump(vcpu) });
      return false;
    default:
      report({ reason: 'unhandled-exit', vcpu: id, detail: describe(vcpu), registers: dump(vcpu) });
      return false;
  }
}

/** A halted vCPU waits for the machine's end (or pauses, saving its state meanwhile). */
function haltUntilStopped(thread: VcpuThreadState, serve: () => void): boolean {
  const { control } = thread;
  if (Atomics.load(control, HALTED) >= thread.assignment.vcpuCount) {
    thread.report({ reason: 'hlt', code: 0, vcpu: thread.assignment.vcpuId });
  }
  for (;;) {
    if (Atomics.load(control, STATE) === RunState.Running) Atomics.wait(control, STATE, RunState.Running);
    if (!waitWhileNotRunning(control, serve)) return false;
    if (!thread.halted) return true;
  }
}

function describe(vcpu: Vcpu): string {
  return JSON.stringify(vcpu.exit(), (_, v) => (typeof v === 'bigint' ? `0x${v.toString(16)}` : v instanceof Uint8Array ? [...v] : v));
}

function dump(vcpu: Vcpu): MachineExit['registers'] {
  try {
    return { regs: vcpu.getRegs(), sregs: vcpu.getSregs() };
  } catch {
    return undefined;
  }
}
