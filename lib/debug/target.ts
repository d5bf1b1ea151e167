// What a debugger controls of a Machine: stopping and resuming every vCPU at once (all-stop),
// their registers, guest memory by virtual address, four hardware breakpoint slots, and why the
// machine stopped. The vCPU threads only obey requests (read or write registers, set the
// guest-debug flags) and pause the machine at a debug exit; all the policy is here.
//
// This host (kvm_pvm) turns `int3` in guest kernel code into an emulation failure, so software
// breakpoints (Z0) take a debug-register slot too, and it ignores RFLAGS.RF: a vCPU resumed at
// the breakpoint it stopped on would stop there again at once, so it first steps one instruction
// with no breakpoint armed, then the breakpoints are armed and every vCPU continues.
import { argValueError } from '../kvm/errors.js';
import { machineStateError } from '../vmm/errors.js';
import type { GuestDebugOptions } from '../kvm/index.js';
import { kvmFpu, kvmRegs, kvmSregs } from '../kvm/structs.js';
import { machineInternals, type DebugStop, type Machine, type MachineExit, type MachineInternals } from '../vmm/machine.js';
import type { VcpuReply, VcpuRequestBody } from '../vmm/types.js';
import type { VcpuRegisters } from './registers.js';
import { mapLinear } from './translate.js';

/** Breakpoints at once: the four debug-register slots (software breakpoints take one too on this host). */
export const BREAKPOINT_SLOTS = 4;
const DR6_BS = 1n << 14n;

/** A breakpoint as the debugger asked for it: software (Z0) or hardware (Z1); both use a debug register here. */
export type BreakpointKind = 'software' | 'hardware';

/** Why the machine stopped for the debugger: a step, a breakpoint, a request, or the machine's own exit. */
export type StopReason =
  | { kind: 'step'; vcpu: number }
  | { kind: 'breakpoint'; vcpu: number; breakpoint: BreakpointKind; address: bigint }
  /** Stopped on request (the debugger attached, or interrupted it). */
  | { kind: 'interrupt'; vcpu: number }
  | { kind: 'exit'; exit: MachineExit };

/** How each vCPU resumes: stepped (one instruction) or continued. */
export type ResumePlan = { step: ReadonlySet<number> };

/** What a debugger controls of a machine: all-stop stopping and resuming, registers, memory by virtual address, breakpoints, and why it stopped. */
export class DebugTarget {
  readonly machine: Machine;
  readonly vcpuCount: number;
  readonly #internals: MachineInternals;
  readonly #cache = new Map<number, VcpuRegisters>();
  readonly #slots: ({ address: bigint; kind: BreakpointKind } | null)[] = new Array(BREAKPOINT_SLOTS).fill(null);
  /** The vCPU that stopped on a breakpoint, and where. */
  #hit: { vcpu: number; address: bigint } | null = null;
  /** A resume waiting for a vCPU to step off its breakpoint first. */
  #afterStepOver: { vcpu: number; plan: ResumePlan } | null = null;
  #waiter: ((reason: StopReason) => void) | null = null;
  /** Each vCPU's guest-debug settings as last set (JSON), so a step after a step sets nothing again. */
  readonly #armed = new Map<number, string>();
  #attached = true;
  readonly #onExit = (exit: MachineExit) => this.#deliver({ kind: 'exit', exit });

  /** Whether the vCPU that stops sends its registers along (a debugger that reads them at every stop). */
  readonly #registersAtStop: boolean;

  /** `registersAtStop`: for a debugger that reads the registers at every stop, as gdb does. */
  constructor(machine: Machine, options: { registersAtStop?: boolean } = {}) {
    this.machine = machine;
    this.#registersAtStop = options.registersAtStop === true;
    this.vcpuCount = machine.vcpuCount;
    this.#internals = machineInternals(machine);
    this.#internals.onDebugStop((stop) => void this.#debugStop(stop));
    machine.once('exit', this.#onExit);
  }

  /** Whether the guest is stopped (paused, or not yet started). */
  get stopped(): boolean {
    const state = this.machine.state;
    return state === 'paused' || state === 'created';
  }

  /** Whether the machine is ending or has ended: nothing is left to debug. */
  get ended(): boolean {
    const state = this.machine.state;
    return state === 'stopping' || state === 'stopped';
  }

  /** The next stop (a debug exit, an interrupt, the guest's end) goes to `waiter`; null: nobody waits. */
  onStop(waiter: ((reason: StopReason) => void) | null): void {
    this.#waiter = waiter;
  }

  /** Stops every vCPU (the machine pauses); the stop is delivered as an interrupt of `vcpu`. */
  async interrupt(vcpu: number): Promise<void> {
    if (this.machine.state !== 'running') return;
    try {
      await this.#internals.pause(false);
    } catch {
      // A vCPU's debug exit paused it first (that stop is delivered instead), or it ended.
      return;
    }
    this.#afterStepOver = null;
    this.#deliver({ kind: 'interrupt', vcpu });
  }

  /** Stops a running guest quietly (the debugger attaches). */
  async halt(): Promise<void> {
    if (this.machine.state === 'running') await this.#internals.pause(false).catch(() => {});
  }

  /** Reads vCPU `vcpu`'s registers (the machine stopped). */
  async registers(vcpu: number): Promise<VcpuRegisters> {
    const cached = this.#cache.get(vcpu);
    if (cached) return cached;
    const reply = await this.#request(vcpu, { type: 'debug-read' });
    if (reply.type !== 'debug-state') throw machineStateError(`vCPU ${vcpu} did not give its registers`);
    const state = { regs: reply.regs, sregs: reply.sregs, fpu: reply.fpu };
    this.#cache.set(vcpu, state);
    return state;
  }

  /** Puts (changed) registers on the vCPU before it runs again. */
  async setRegisters(vcpu: number, state: VcpuRegisters): Promise<void> {
    if (!this.stopped) throw machineStateError('the guest is running');
    // Checked here, on this thread: a value that does not fit fails before anything is written.
    kvmRegs.encode(state.regs);
    kvmSregs.encode(state.sregs);
    kvmFpu.encode(state.fpu);
    this.#cache.delete(vcpu);
    await this.#request(vcpu, { type: 'debug-write', regs: state.regs, sregs: state.sregs, fpu: state.fpu });
  }

  /** Reads guest memory at a virtual address of `vcpu`'s; null if a byte of it is not mapped. */
  async readMemory(vcpu: number, address: bigint, length: number): Promise<Buffer | null> {
    const { sregs } = await this.registers(vcpu);
    const mapped = mapLinear(address, length, sregs, this.machine.memory);
    if ('unmapped' in mapped) return null;
    const out = Buffer.alloc(length);
    let done = 0;
    for (const [physical, bytes] of mapped.pieces) {
      out.set(this.machine.memory.bytes(physical, bytes), done);
      done += bytes;
    }
    return out;
  }

  /** Writes guest memory (marked dirty, as every VMM write is); false if a byte is not mapped. */
  async writeMemory(vcpu: number, address: bigint, data: Uint8Array): Promise<boolean> {
    const { sregs } = await this.registers(vcpu);
    const mapped = mapLinear(address, data.length, sregs, this.machine.memory);
    // Only once every page is known to be there: a failed write changes nothing.
    if ('unmapped' in mapped) return false;
    let done = 0;
    for (const [physical, bytes] of mapped.pieces) {
      this.machine.writeMemory(physical, data.subarray(done, done + bytes));
      done += bytes;
    }
    return true;
  }

  /** Takes a slot for a breakpoint at `address`; false when all four are taken. */
  insertBreakpoint(address: bigint, kind: BreakpointKind): boolean {
    if (this.#slots.some((slot) => slot?.address === address && slot.kind === kind)) return true;
    const free = this.#slots.indexOf(null);
    if (free < 0) return false;
    this.#slots[free] = { address, kind };
    return true;
  }

  /** Frees the slot of a breakpoint; false if there was none there. */
  removeBreakpoint(address: bigint, kind: BreakpointKind): boolean {
    const index = this.#slots.findIndex((slot) => slot?.address === address && slot.kind === kind);
    if (index < 0) return false;
    this.#slots[index] = null;
    return true;
  }

  /** Resumes every vCPU as planned; the stop that ends it goes to the waiter. */
  async resume(plan: ResumePlan): Promise<void> {
    if (!this.#attached) throw machineStateError('the debugger has detached');
    if (!this.stopped) throw machineStateError(`the guest is ${this.machine.state}, not stopped`);
    for (const vcpu of plan.step) if (!Number.isInteger(vcpu) || vcpu < 0 || vcpu >= this.vcpuCount) throw argValueError(`no vCPU ${vcpu}`);
    const hit = this.#hit;
    this.#hit = null;
    if (hit && !plan.step.has(hit.vcpu) && this.#slots.some((slot) => slot?.address === hit.address)) {
      const { regs } = await this.registers(hit.vcpu);
      if (regs.rip === hit.address) {
        // Off the breakpoint first (the host ignores RF): it steps, the others run on with the
        // breakpoints armed for that moment.
        this.#afterStepOver = { vcpu: hit.vcpu, plan };
        await this.#arm({ step: new Set([hit.vcpu]) });
        this.#run();
        return;
      }
    }
    await this.#arm(plan);
    this.#run();
  }

  /** Lets go of the guest: no breakpoint, no step, guest debugging off, and the guest running. */
  async detach(): Promise<void> {
    if (!this.#attached) return;
    this.#attached = false;
    this.#slots.fill(null);
    this.#hit = null;
    this.#afterStepOver = null;
    this.#waiter = null;
    this.#internals.onDebugStop(null);
    this.machine.off('exit', this.#onExit);
    if (this.ended) return;
    await Promise.all(Array.from({ length: this.vcpuCount }, (_, vcpu) => this.#request(vcpu, { type: 'guest-debug', options: null }).catch(() => {})));
    this.#run();
  }

  /**
   * Sets every vCPU's guest-debug flags: the breakpoints armed on each vCPU that continues; a
   * vCPU that steps has none (a step is one instruction), so it steps off a breakpoint too.
   */
  async #arm(plan: ResumePlan): Promise<void> {
    const used = this.#slots.map((slot, i) => [slot, i] as const).filter(([slot]) => slot !== null);
    const debugreg = [0n, 0n, 0n, 0n, 0n, 0n, 0n, 0n];
    for (const [slot, i] of used) {
      debugreg[i] = slot!.address;
      // G0-G3 (bits 1, 3, 5, 7): enabled; R/W and LEN 0: an instruction fetch.
      debugreg[7]! |= 1n << BigInt(2 * i + 1);
    }
    this.#cache.clear();
    await Promise.all(Array.from({ length: this.vcpuCount }, (_, vcpu) => {
      let options: GuestDebugOptions | null = null;
      if (plan.step.has(vcpu)) options = { singlestep: true };
      else if (used.length > 0) options = { hardwareBreakpoints: true, debugreg };
      const key = JSON.stringify(options, (_, v) => (typeof v === 'bigint' ? v.toString(16) : v));
      if (this.#armed.get(vcpu) === key) return undefined;
      this.#armed.delete(vcpu);
      return this.#request(vcpu, { type: 'guest-debug', options, registersAtStop: this.#registersAtStop }).then(() => void this.#armed.set(vcpu, key));
    }));
  }

  #run(): void {
    if (this.ended) return;
    if (this.machine.state === 'created') this.machine.start();
    else if (this.machine.state === 'paused') this.machine.resume();
  }

  async #debugStop(stop: DebugStop): Promise<void> {
    this.#cache.clear();
    if (stop.state) this.#cache.set(stop.vcpu, stop.state);
    const stepOver = this.#afterStepOver;
    if (stepOver) {
      this.#afterStepOver = null;
      if (stop.vcpu === stepOver.vcpu && (stop.dr6 & DR6_BS) !== 0n) {
        // Off the breakpoint: now as the debugger asked.
        try {
          await this.#arm(stepOver.plan);
          this.#run();
        } catch {
          // The machine ended meanwhile: its exit is delivered.
        }
        return;
      }
    }
    if ((stop.dr6 & DR6_BS) !== 0n) {
      this.#deliver({ kind: 'step', vcpu: stop.vcpu });
      return;
    }
    // B0-B3: which slot matched.
    const index = [0, 1, 2, 3].find((i) => (stop.dr6 & (1n << BigInt(i))) !== 0n && this.#slots[i]);
    const slot = index === undefined ? null : this.#slots[index]!;
    if (!slot) {
      this.#deliver({ kind: 'interrupt', vcpu: stop.vcpu });
      return;
    }
    this.#hit = { vcpu: stop.vcpu, address: slot.address };
    this.#deliver({ kind: 'breakpoint', vcpu: stop.vcpu, breakpoint: slot.kind, address: slot.address });
  }

  #deliver(reason: StopReason): void {
    const waiter = this.#waiter;
    this.#waiter = null;
    waiter?.(reason);
  }

  async #request(vcpu: number, request: VcpuRequestBody): Promise<VcpuReply> {
    const reply = await this.#internals.vcpuRequest(vcpu, request);
    if (reply.type === 'failed') throw machineStateError(`vCPU ${vcpu}: ${reply.error}`);
    return reply;
  }
}
