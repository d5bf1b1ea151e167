// What guest debugging the host really does, found once per process with two tiny probe guests
// (long mode, CPL 0, as a kernel being debugged runs) rather than assumed: a software KVM such as
// kvm_pvm emulates guest kernel code and fails on `int3` there, and never triggers data
// breakpoints, while hardware execution breakpoints and single steps work everywhere we run.
//
//   software breakpoints  KVM_GUESTDBG_USE_SW_BP, the guest runs `int3`: supported if KVM exits
//                         with KVM_EXIT_DEBUG, exception #BP, at the int3's address.
//   watchpoints           KVM_GUESTDBG_USE_HW_BP with a 1-byte data-write breakpoint in DR0/DR7,
//                         the guest writes that byte: supported if KVM exits with KVM_EXIT_DEBUG,
//                         DR6.B0 set.
//
// Anything else (an emulation failure, the guest's HLT, no answer within the time bound: the probe
// machine is stopped then) counts as not supported.
import type { GuestDebugOptions } from '../kvm/index.js';
import { machineStateError } from '../vmm/errors.js';
import { Machine, machineInternals, type DebugStop, type MachineExitReason } from '../vmm/machine.js';
import { VcpuWorkerPool } from '../vmm/pool.js';

/** What this host's KVM serves a debugger (hostDebugSupport() probes it once per process). */
export interface HostDebugSupport {
  /** `int3` in guest kernel code exits to the VMM (KVM_GUESTDBG_USE_SW_BP works). */
  softwareBreakpoints: boolean;
  /** Data breakpoints (DR7 R/W 01 and 11) trigger a KVM_EXIT_DEBUG. */
  watchpoints: boolean;
}

/** How probeHostDebugSupport() runs its probe guests. */
export interface HostDebugProbeOptions {
  /** Vcpu threads for the probe machines (one each); a thread of their own otherwise. */
  pool?: VcpuWorkerPool;
  /** How long a probe guest may take before it counts as a "no" (default 2000 ms). */
  timeoutMs?: number;
}

const LOAD_ADDR = 0x100000;
const BP_VECTOR = 3;
const DR6_B0 = 1n;
/** DR7: G0 (bit 1), R/W0 = 01 (data writes, bits 16-17), LEN0 = 00 (one byte). */
const DR7_WRITE_WATCH_0 = (1n << 1n) | (1n << 16n);
/** Where the watchpoint probe writes: a byte of its own page. */
const WATCHED = LOAD_ADDR + 0x800;


/** A probe: a guest of a few bytes, the guest debugging it runs under, and the stop that means "yes". */
export interface DebugProbe {
  image: Uint8Array;
  guestDebug: GuestDebugOptions;
  expected: (stop: DebugStop) => boolean;
}

/** How a probe went: `supported`, and how its guest ended ('debug': a debug exit; 'timeout'; else the machine's exit reason). */
export interface DebugProbeOutcome {
  supported: boolean;
  end: 'debug' | 'timeout' | MachineExitReason;
}

const INT3_ADDRESS = BigInt(LOAD_ADDR + 1);

/** nop; int3; hlt, with KVM_GUESTDBG_USE_SW_BP: a #BP exit at the int3. */
export const SOFTWARE_BREAKPOINT_PROBE: DebugProbe = {
  image: Uint8Array.of(0x90, 0xcc, 0xf4),
  guestDebug: { softwareBreakpoints: true },
  expected: (stop) => stop.exception === BP_VECTOR && stop.pc === INT3_ADDRESS,
};

/** mov %al, (WATCHED) (88 /r with an absolute disp32); hlt, with a write watchpoint on that byte: DR6.B0. */
export const WATCHPOINT_PROBE: DebugProbe = {
  image: Uint8Array.of(0x88, 0x04, 0x25, ...new Uint8Array(new Uint32Array([WATCHED]).buffer), 0xf4),
  guestDebug: { hardwareBreakpoints: true, debugreg: [BigInt(WATCHED), 0n, 0n, 0n, 0n, 0n, 0n, DR7_WRITE_WATCH_0] },
  expected: (stop) => (stop.dr6 & DR6_B0) !== 0n,
};

let cached: Promise<HostDebugSupport> | null = null;

/** What this host supports, probed on the first call and the same answer after (per process). */
export function hostDebugSupport(options: HostDebugProbeOptions = {}): Promise<HostDebugSupport> {
  cached ??= probeHostDebugSupport(options).catch((error: unknown) => {
    // A probe that could not run (no /dev/kvm, no memory) is tried again by the next caller.
    cached = null;
    throw error;
  });
  return cached;
}

/** Runs both probes now (no cache). */
export async function probeHostDebugSupport(options: HostDebugProbeOptions = {}): Promise<HostDebugSupport> {
  // One thread for both probes (a thread takes longer to start than a probe takes to run).
  const pool = options.pool ?? VcpuWorkerPool.start(1);
  try {
    const probeOptions = { pool, timeoutMs: options.timeoutMs ?? 2000 };
    const softwareBreakpoints = (await runDebugProbe(SOFTWARE_BREAKPOINT_PROBE, probeOptions)).supported;
    const watchpoints = (await runDebugProbe(WATCHPOINT_PROBE, probeOptions)).supported;
    return { softwareBreakpoints, watchpoints };
  } finally {
    if (pool !== options.pool) await pool.close();
  }
}

/**
 * Runs a probe's guest (long mode, CPL 0, loaded and entered at 0x100000, no irqchip) under its
 * guest debugging: supported if its first debug exit is the one expected; not if it is another,
 * or the guest ends (an emulation failure, HLT) or is still running after `timeoutMs` (then the
 * machine is stopped).
 */
export async function runDebugProbe(probe: DebugProbe, options: { pool?: VcpuWorkerPool; timeoutMs: number }): Promise<DebugProbeOutcome> {
  const { pool, timeoutMs } = options;
  const machine = await Machine.create({ image: probe.image, mode: 'long', loadAddr: LOAD_ADDR, memoryBytes: 2 << 20, irqchip: false, serial: { output: null }, log: () => {}, ...(pool ? { pool } : {}) });
  const outcome: DebugProbeOutcome = { supported: false, end: 'timeout' };
  let ended = false;
  const internals = machineInternals(machine);
  internals.onDebugStop((stop) => {
    ended = true;
    outcome.supported = probe.expected(stop);
    outcome.end = 'debug';
    void machine.stop();
  });
  const timer = setTimeout(() => void machine.stop(), timeoutMs);
  try {
    const reply = await internals.vcpuRequest(0, { type: 'guest-debug', options: probe.guestDebug });
    if (reply.type !== 'debug-done') throw machineStateError(`the debug probe's vCPU refused its guest-debug settings: ${reply.type === 'failed' ? reply.error : reply.type}`);
    machine.start();
    const exit = await machine.wait();
    // Stopped by us (a debug exit, or the time bound) or ended by the guest.
    if (!ended && exit.reason !== 'stopped') outcome.end = exit.reason;
  } finally {
    clearTimeout(timer);
    await machine.stop();
  }
  return outcome;
}
