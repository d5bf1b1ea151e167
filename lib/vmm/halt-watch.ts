// How a machine with the in-kernel irqchip ends when its guest halts for good.
//
// Without the irqchip, HLT exits to the VMM and the machine ends once every vCPU has halted. With
// it, KVM halts the vCPU itself, waiting for an interrupt, and the VMM never hears of it. A halt
// with interrupts disabled (RFLAGS.IF = 0) and no NMI pending is for good, and so is a vCPU
// waiting for an INIT/SIPI once nobody is left to send one: a machine whose every vCPU is stuck
// like that ends with status 0, as without the irqchip. A halt with interrupts enabled waits.
//
// Nothing of this is on the exit path. The main thread kicks the vCPUs now and then (5 ms after
// the machine runs, backing off to every 100 ms: a kick costs each vCPU one exit, ~10 µs); at the
// kick's exit each vCPU thread answers whether its vCPU is stuck. When every vCPU answered stuck in
// the same round, the machine pauses (quietly, no 'paused' event) and checks the vCPUs' saved
// states while none runs: between two answers, one vCPU could have woken another with an NMI or
// an INIT/SIPI. All still stuck: the machine ends; otherwise it runs on.
import { MpState } from '../kvm/constants.js';
import type { Vcpu } from '../kvm/vcpu.js';
import type { VcpuState } from './vcpu-state.js';

const RFLAGS_IF = 0x200n;
const FIRST_ROUND_MS = 5;
const LAST_ROUND_MS = 100;

/** Slot 0: the round under way (0: none yet). Slot 1 + i: vCPU i's answer, +round stuck, -round not. */
const ROUND = 0;

export function createHaltProbe(vcpus: number): SharedArrayBuffer {
  return new SharedArrayBuffer((1 + vcpus) * 4);
}

/** Whether a vCPU in this state can never run again unless another vCPU wakes it. */
function stuck(mpState: number, readRflags: () => bigint, nmiPending: () => boolean): boolean {
  if (mpState === MpState.Uninitialized || mpState === MpState.InitReceived) return true;
  return mpState === MpState.Halted && (readRflags() & RFLAGS_IF) === 0n && !nmiPending();
}

/** On a vCPU thread, at a kick's exit: answers the round under way, if this vCPU has not yet. */
export function answerHaltProbe(probe: Int32Array, vcpu: Vcpu, index: number): void {
  const round = Atomics.load(probe, ROUND);
  if (round === 0 || Math.abs(Atomics.load(probe, 1 + index)) === round) return;
  // Reading the MP state first lets KVM fold pending LAPIC events (INIT, SIPI) into it.
  const isStuck = stuck(vcpu.getMpState(), () => vcpu.getRegs().rflags, () => {
    const { nmi } = vcpu.getVcpuEvents();
    return nmi.pending !== 0 || nmi.injected !== 0;
  });
  Atomics.store(probe, 1 + index, isStuck ? round : -round);
}

/** The same question about a saved state (the machine paused, no vCPU running). */
export function isStuckState(state: VcpuState): boolean {
  return stuck(state.mpState, () => state.regs.rflags, () => state.events.nmi.pending !== 0 || state.events.nmi.injected !== 0);
}

/**
 * The main thread's side: rounds of kicks while the machine runs, and `confirm()` once every vCPU
 * answered stuck in one round.
 */
export class HaltWatch {
  readonly #probe: Int32Array;
  readonly #vcpus: number;
  readonly #kick: () => void;
  readonly #confirm: () => void;
  #timer: NodeJS.Timeout | null = null;
  #delayMs = FIRST_ROUND_MS;

  constructor(probe: SharedArrayBuffer, options: { vcpus: number; kick: () => void; confirm: () => void }) {
    this.#probe = new Int32Array(probe);
    this.#vcpus = options.vcpus;
    this.#kick = options.kick;
    this.#confirm = options.confirm;
  }

  /** Starts (or restarts) the rounds, from the shortest delay. */
  start(): void {
    this.stop();
    this.#delayMs = FIRST_ROUND_MS;
    this.#schedule();
  }

  stop(): void {
    if (this.#timer) clearTimeout(this.#timer);
    this.#timer = null;
  }

  #schedule(): void {
    // The vCPU threads keep the process alive while the guest runs; this timer need not.
    this.#timer = setTimeout(() => this.#round(), this.#delayMs).unref();
  }

  #round(): void {
    this.#timer = null;
    const round = Atomics.load(this.#probe, ROUND);
    let allStuck = round > 0;
    for (let i = 0; allStuck && i < this.#vcpus; i++) allStuck = Atomics.load(this.#probe, 1 + i) === round;
    if (allStuck) {
      // The machine restarts the rounds if it runs on.
      this.#confirm();
      return;
    }
    Atomics.store(this.#probe, ROUND, round + 1);
    this.#kick();
    this.#delayMs = Math.min(this.#delayMs * 2, LAST_ROUND_MS);
    this.#schedule();
  }
}
