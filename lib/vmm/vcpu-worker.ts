// A vCPU thread. It creates its vCPU (KVM wants vCPU ioctls from the creating thread), loops on
// run(), and handles every exit itself through the I/O bus: nothing goes to the main thread per
// exit. Between machines it idles, so a pool can hand it to the next machine.
import { parentPort } from 'node:worker_threads';
// Narrow imports: a thread that starts fast loads only what a vCPU loop needs.
import { applyBootState } from '../boot/cpu-state.js';
import { ExitReason } from '../kvm/constants.js';
import { setThreadAffinity, setThreadName } from '../kvm/thread.js';
import type { Vcpu } from '../kvm/vcpu.js';
import { Vm } from '../kvm/vm.js';
import { RunState, STATE, HALTED, claimExit, setRunState, waitWhileNotRunning } from './control.js';
import { createDevices } from './devices.js';
import type { MachineExit, MainMessage, VcpuAssignment, WorkerMessage } from './types.js';

const port = parentPort;
if (!port) throw new Error('vcpu-worker runs in a worker thread');
const post = (message: WorkerMessage) => port.postMessage(message);

port.on('message', (message: MainMessage) => {
  if (message.type === 'quit') {
    port.close();
    return;
  }
  let error: string | undefined;
  try {
    runAssignment(message.assignment);
  } catch (e) {
    error = (e as Error)?.message ?? String(e);
  }
  setThreadName('vcpu-idle');
  post({ type: 'done', vcpuId: message.assignment.vcpuId, error });
});
setThreadName('vcpu-idle');
post({ type: 'idle' });

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
  const { bus } = createDevices(assignment.devices, {
    setIrqLine: assignment.irqchip ? (gsi, level) => vm.setIrqLine(gsi, level) : undefined,
    debugExit: (code) => report({ reason: 'debug-exit', code, vcpu: id }),
    reset: () => report({ reason: 'reset', vcpu: id }),
    log: (message) => post({ type: 'log', message: `vcpu${id}: ${message}` }),
  });

  using vcpu = vm.createVcpu(id);
  // CPUID before MSRs: KVM accepts some MSRs only once the CPUID says they exist.
  vcpu.setCpuid2(assignment.cpuid);
  if (assignment.msrs.length > 0) vcpu.setMsrs(assignment.msrs);
  if (assignment.boot) applyBootState(vcpu, assignment.boot);
  post({ type: 'ready', vcpuId: id, kick: vcpu.kickHandle });

  if (!waitWhileNotRunning(control)) return;
  runLoop(vcpu, bus, control, assignment, report);
}

function runLoop(
  vcpu: Vcpu,
  bus: ReturnType<typeof createDevices>['bus'],
  control: Int32Array,
  assignment: VcpuAssignment,
  report: (exit: MachineExit) => void,
): void {
  const view = vcpu.kvmRun.view;
  const bytes = vcpu.kvmRun.bytes;
  const id = assignment.vcpuId;
  for (;;) {
    let reason: number;
    try {
      reason = vcpu.run();
    } catch (e) {
      report({ reason: 'error', vcpu: id, detail: (e as Error).message, registers: dump(vcpu) });
      return;
    }
    if (reason === ExitReason.Io) {
      bus.handleIo(view);
    } else if (reason === ExitReason.Mmio) {
      bus.handleMmio(view, bytes);
    } else if (reason !== ExitReason.Intr) {
      if (!handleRareExit(vcpu, reason, control, assignment, report)) return;
    }
    if (Atomics.load(control, STATE) !== RunState.Running && !waitWhileNotRunning(control)) return;
  }
}

/** Exits other than I/O and kicks. Returns false when this vCPU is done. */
function handleRareExit(
  vcpu: Vcpu,
  reason: number,
  control: Int32Array,
  assignment: VcpuAssignment,
  report: (exit: MachineExit) => void,
): boolean {
  const id = assignment.vcpuId;
  switch (reason) {
    case ExitReason.Hlt: {
      // Only without an in-kernel irqchip (KVM handles HLT itself otherwise): this vCPU has
      // nothing left to run. The machine ends when every vCPU has halted.
      if (Atomics.add(control, HALTED, 1) + 1 === assignment.vcpuCount) report({ reason: 'hlt', code: 0, vcpu: id });
      for (;;) {
        if (Atomics.load(control, STATE) === RunState.Running) Atomics.wait(control, STATE, RunState.Running);
        if (!waitWhileNotRunning(control)) return false;
      }
    }
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
