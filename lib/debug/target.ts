// What a debugger controls of a Machine: stopping and resuming every vCPU at once (all-stop),
// their registers, guest memory by virtual address, breakpoints and watchpoints, and why the
// machine stopped. The vCPU threads only obey requests (read or write registers, set the
// guest-debug flags) and pause the machine at a debug exit; all the policy is here.
//
// What the host serves is probed (host-debug-support.ts), not assumed. Software breakpoints are
// an `int3` written over the instruction (KVM_GUESTDBG_USE_SW_BP) where the host exits on it; on
// a host that does not (kvm_pvm turns `int3` in guest kernel code into an emulation failure) they
// take one of the four debug-register slots, as hardware breakpoints do. Watchpoints take a slot
// where the host triggers data breakpoints, and are refused where it does not. A vCPU resumed at
// the breakpoint it stopped on would stop there again at once (kvm_pvm ignores RFLAGS.RF, and an
// int3 is an int3), so it first steps one instruction with that breakpoint lifted, then the
// breakpoints are armed and every vCPU continues.
import { argValueError } from '../kvm/errors.js';
import { machineStateError } from '../vmm/errors.js';
import type { GuestDebugOptions } from '../kvm/index.js';
import { kvmFpu, kvmRegs, kvmSregs } from '../kvm/structs.js';
import { machineInternals, type DebugStop, type Machine, type MachineExit, type MachineInternals } from '../vmm/machine.js';
import type { VcpuReply, VcpuRequestBody } from '../vmm/types.js';
import type { HostDebugSupport } from './host-debug-support.js';
import type { VcpuRegisters } from './registers.js';
import { mapLinear } from './translate.js';

/** Breakpoints at once: the four debug-register slots (software breakpoints take one too on this host). */
export const BREAKPOINT_SLOTS = 4;
const DR6_BS = 1n << 14n;
/** #BP: the exception KVM reports for an int3 with KVM_GUESTDBG_USE_SW_BP. */
const BP_VECTOR = 3;
const INT3 = 0xcc;

/** What the debugger asked for (gdb's Z0 or Z1); a 'software' one may be served by a slot. */
export type BreakpointKind = 'software' | 'hardware';
/** Data breakpoints: gdb's Z2 (write), Z3 (read), Z4 (access). x86 has no read-only one. */
export type WatchpointKind = 'write' | 'read' | 'access';

/** A debug-register slot: an execution breakpoint, or a watchpoint over `length` bytes. */
export interface DebugSlot {
  address: bigint;
  kind: BreakpointKind | WatchpointKind;
  length: number;
}

/**
 * What inserting came to: 'no-slot' (all four debug registers are taken), 'unmapped' (no page
 * there for an int3), 'unsupported' (the host does not trigger it, or x86 has no such thing).
 */
export type InsertResult = 'inserted' | 'no-slot' | 'unmapped' | 'unsupported';

/** Why the machine stopped for the debugger: a step, a breakpoint, a request, or the machine's own exit. */
export type StopReason =
  | { kind: 'step'; vcpu: number }
  /** `breakpoint`: how the breakpoint was served ('software': an int3; 'hardware': a debug register). */
  | { kind: 'breakpoint'; vcpu: number; breakpoint: BreakpointKind; address: bigint }
  | { kind: 'watchpoint'; vcpu: number; watchpoint: WatchpointKind; address: bigint }
  /** An int3 that is not one of ours (the guest's own), with software breakpoints on. */
  | { kind: 'trap'; vcpu: number }
  /** Stopped on request (the debugger attached, or interrupted it). */
  | { kind: 'interrupt'; vcpu: number }
  | { kind: 'exit'; exit: MachineExit };

/** Nothing beyond what every host we know serves: hardware execution breakpoints and steps. */
const NO_EXTRAS: HostDebugSupport = { softwareBreakpoints: false, watchpoints: false };

/** DR7's R/W field per slot kind (Intel SDM vol. 3, 18.2.4): 00 execute, 01 write, 11 access. */
const DR7_RW = { software: 0n, hardware: 0n, write: 1n, access: 3n, read: null } as const;
/** DR7's LEN field per length in bytes: 00 one, 01 two, 11 four, 10 eight. */
const DR7_LEN = new Map<number, bigint>([[1, 0n], [2, 1n], [4, 3n], [8, 2n]]);

/** The debug registers (DR0-DR3, DR6, DR7 in slots 0-3, 6, 7 of KVM's debugreg) for `slots`. */
export function debugRegisters(slots: readonly (DebugSlot | null)[]): bigint[] {
  const debugreg = [0n, 0n, 0n, 0n, 0n, 0n, 0n, 0n];
  slots.forEach((slot, i) => {
    if (!slot) return;
    debugreg[i] = slot.address;
    // G0-G3 (bits 1, 3, 5, 7): enabled globally; R/W at 16 + 4i, LEN at 18 + 4i (0 for execution).
    const rw = DR7_RW[slot.kind] ?? 0n;
    const len = rw === 0n ? 0n : DR7_LEN.get(slot.length) ?? 0n;
    debugreg[7]! |= (1n << BigInt(2 * i + 1)) | (rw << BigInt(16 + 4 * i)) | (len << BigInt(18 + 4 * i));
  });
  return debugreg;
}

/** Why a vCPU's KVM_EXIT_DEBUG stopped it: a #BP on one of our int3s, a step, a slot that matched. */
export function stopReason(stop: Pick<DebugStop, 'vcpu' | 'exception' | 'dr6' | 'pc'>, slots: readonly (DebugSlot | null)[], isSoftwareBreakpoint: (address: bigint) => boolean): StopReason {
  const { vcpu } = stop;
  if (stop.exception === BP_VECTOR) {
    return isSoftwareBreakpoint(stop.pc) ? { kind: 'breakpoint', vcpu, breakpoint: 'software', address: stop.pc } : { kind: 'trap', vcpu };
  }
  if ((stop.dr6 & DR6_BS) !== 0n) return { kind: 'step', vcpu };
  // B0-B3: which slot matched.
  const index = [0, 1, 2, 3].find((i) => (stop.dr6 & (1n << BigInt(i))) !== 0n && slots[i]);
  const slot = index === undefined ? null : slots[index]!;
  if (!slot) return { kind: 'interrupt', vcpu };
  if (slot.kind === 'software' || slot.kind === 'hardware') return { kind: 'breakpoint', vcpu, breakpoint: 'hardware', address: slot.address };
  return { kind: 'watchpoint', vcpu, watchpoint: slot.kind, address: slot.address };
}

/** How each vCPU resumes: stepped (one instruction) or continued. */
export type ResumePlan = { step: ReadonlySet<number> };

/** What a debugger controls of a machine: all-stop stopping and resuming, registers, memory by virtual address, breakpoints, and why it stopped. */
export class DebugTarget {
  readonly machine: Machine;
  readonly vcpuCount: number;
  readonly #internals: MachineInternals;
  readonly #cache = new Map<number, VcpuRegisters>();
  readonly #slots: (DebugSlot | null)[] = new Array(BREAKPOINT_SLOTS).fill(null);
  /** The int3s written into guest memory, by the address the debugger gave: where, and the byte under it. */
  readonly #software = new Map<bigint, { physical: number; original: number }>();
  /** A software breakpoint whose byte is back for a vCPU's step over it. */
  #lifted: bigint | null = null;
  /** What the host serves (host-debug-support.ts). */
  readonly support: HostDebugSupport;
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

  /**
   * `registersAtStop`: for a debugger that reads the registers at every stop, as gdb does.
   * `support`: what the host serves (hostDebugSupport()); by default neither software
   * breakpoints nor watchpoints, which every host can live with.
   */
  constructor(machine: Machine, options: { registersAtStop?: boolean; support?: HostDebugSupport } = {}) {
    this.machine = machine;
    this.#registersAtStop = options.registersAtStop === true;
    this.support = { ...(options.support ?? NO_EXTRAS) };
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
    this.#putBackLifted();
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
      // Our int3s are not the debugger's to see (as every stub hides them): the bytes under them.
      for (const { physical: at, original } of this.#software.values()) if (at >= physical && at < physical + bytes) out[done + at - physical] = original;
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
      const piece = Uint8Array.from(data.subarray(done, done + bytes));
      // Under an int3 of ours, the write changes the byte it hides; the int3 stays.
      for (const [address, breakpoint] of this.#software) {
        if (breakpoint.physical < physical || breakpoint.physical >= physical + bytes) continue;
        breakpoint.original = piece[breakpoint.physical - physical]!;
        if (this.#lifted !== address) piece[breakpoint.physical - physical] = INT3;
      }
      this.machine.writeMemory(physical, piece);
      done += bytes;
    }
    return true;
  }

  /**
   * A breakpoint at `address`: a 'software' one is an int3 written there (translated through
   * `vcpu`'s page tables) where the host serves them, else it takes a debug-register slot as a
   * 'hardware' one does.
   */
  async insertBreakpoint(address: bigint, kind: BreakpointKind, vcpu = 0): Promise<InsertResult> {
    if (kind === 'software' && this.support.softwareBreakpoints) {
      if (this.#software.has(address)) return 'inserted';
      const { sregs } = await this.registers(vcpu);
      const mapped = mapLinear(address, 1, sregs, this.machine.memory);
      if ('unmapped' in mapped) return 'unmapped';
      const physical = mapped.pieces[0]![0];
      this.#software.set(address, { physical, original: this.machine.memory.bytes(physical, 1)[0]! });
      this.machine.writeMemory(physical, Uint8Array.of(INT3));
      return 'inserted';
    }
    return this.#takeSlot({ address, kind, length: 1 });
  }

  /** Removes a breakpoint (an int3's byte is put back); false if there was none there. */
  async removeBreakpoint(address: bigint, kind: BreakpointKind): Promise<boolean> {
    const breakpoint = kind === 'software' ? this.#software.get(address) : undefined;
    if (breakpoint) {
      if (this.#lifted === address) this.#lifted = null;
      else this.machine.writeMemory(breakpoint.physical, Uint8Array.of(breakpoint.original));
      this.#software.delete(address);
      return true;
    }
    return this.#freeSlot({ address, kind, length: 1 });
  }

  /**
   * A watchpoint over `length` bytes (1, 2, 4 or 8, aligned) at `address`, in a debug-register
   * slot: 'unsupported' where the host never triggers them, for 'read' (x86 has only write and
   * access), and for a length or alignment x86 cannot watch.
   */
  insertWatchpoint(address: bigint, length: number, kind: WatchpointKind): InsertResult {
    if (!this.support.watchpoints || kind === 'read' || !DR7_LEN.has(length) || address % BigInt(length) !== 0n) return 'unsupported';
    return this.#takeSlot({ address, kind, length });
  }

  /** Frees a watchpoint's slot; false if there was none like it. */
  removeWatchpoint(address: bigint, length: number, kind: WatchpointKind): boolean {
    return this.#freeSlot({ address, kind, length });
  }

  #takeSlot(wanted: DebugSlot): InsertResult {
    if (this.#slots.some((slot) => slot && sameSlot(slot, wanted))) return 'inserted';
    const free = this.#slots.indexOf(null);
    if (free < 0) return 'no-slot';
    this.#slots[free] = wanted;
    return 'inserted';
  }

  #freeSlot(wanted: DebugSlot): boolean {
    const index = this.#slots.findIndex((slot) => slot && sameSlot(slot, wanted));
    if (index < 0) return false;
    this.#slots[index] = null;
    return true;
  }

  /** Whether an execution breakpoint (an int3 or a slot) is at `address`. */
  #breakpointAt(address: bigint): boolean {
    return this.#software.has(address) || this.#slots.some((slot) => slot?.address === address && (slot.kind === 'software' || slot.kind === 'hardware'));
  }

  /** Puts the original byte back under a software breakpoint, for one step over it. */
  #lift(address: bigint): void {
    const breakpoint = this.#software.get(address);
    if (!breakpoint || this.#lifted !== null) return;
    this.machine.writeMemory(breakpoint.physical, Uint8Array.of(breakpoint.original));
    this.#lifted = address;
  }

  /** The int3 lifted for a step goes back (the step is over, or the guest stopped otherwise). */
  #putBackLifted(): void {
    const address = this.#lifted;
    this.#lifted = null;
    const breakpoint = address === null ? undefined : this.#software.get(address);
    if (breakpoint && !this.ended) this.machine.writeMemory(breakpoint.physical, Uint8Array.of(INT3));
  }

  /** Resumes every vCPU as planned; the stop that ends it goes to the waiter. */
  async resume(plan: ResumePlan): Promise<void> {
    if (!this.#attached) throw machineStateError('the debugger has detached');
    if (!this.stopped) throw machineStateError(`the guest is ${this.machine.state}, not stopped`);
    for (const vcpu of plan.step) if (!Number.isInteger(vcpu) || vcpu < 0 || vcpu >= this.vcpuCount) throw argValueError(`no vCPU ${vcpu}`);
    const hit = this.#hit;
    this.#hit = null;
    if (hit && !plan.step.has(hit.vcpu) && this.#breakpointAt(hit.address)) {
      const { regs } = await this.registers(hit.vcpu);
      if (regs.rip === hit.address) {
        // Off the breakpoint first (the host ignores RF; an int3 is lifted): it steps, the others
        // run on with the breakpoints armed for that moment.
        this.#lift(hit.address);
        this.#afterStepOver = { vcpu: hit.vcpu, plan };
        await this.#arm({ step: new Set([hit.vcpu]) });
        this.#run();
        return;
      }
    }
    // A vCPU that steps from an int3 of ours steps the instruction under it.
    if (this.#software.size > 0) {
      for (const vcpu of plan.step) {
        const { regs } = await this.registers(vcpu);
        if (this.#software.has(regs.rip)) {
          this.#lift(regs.rip);
          break;
        }
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
    this.#lifted = null;
    if (!this.ended) for (const { physical, original } of this.#software.values()) this.machine.writeMemory(physical, Uint8Array.of(original));
    this.#software.clear();
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
   * vCPU that steps has no slot armed (a step is one instruction), so it steps off a breakpoint
   * too, but an int3 of ours still stops it rather than going to the guest.
   */
  async #arm(plan: ResumePlan): Promise<void> {
    const slots = this.#slots.some((slot) => slot !== null);
    const software = this.#software.size > 0;
    const debugreg = debugRegisters(this.#slots);
    this.#cache.clear();
    await Promise.all(Array.from({ length: this.vcpuCount }, (_, vcpu) => {
      let options: GuestDebugOptions | null = null;
      if (plan.step.has(vcpu)) options = software ? { singlestep: true, softwareBreakpoints: true } : { singlestep: true };
      else if (slots || software) options = { ...(software ? { softwareBreakpoints: true } : {}), ...(slots ? { hardwareBreakpoints: true, debugreg } : {}) };
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
    this.#putBackLifted();
    const stepOver = this.#afterStepOver;
    if (stepOver) {
      this.#afterStepOver = null;
      if (stop.vcpu === stepOver.vcpu && stop.exception !== BP_VECTOR && (stop.dr6 & DR6_BS) !== 0n) {
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
    const reason = stopReason(stop, this.#slots, (address) => this.#software.has(address));
    if (reason.kind === 'breakpoint') this.#hit = { vcpu: reason.vcpu, address: reason.address };
    this.#deliver(reason);
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

function sameSlot(a: DebugSlot, b: DebugSlot): boolean {
  return a.address === b.address && a.kind === b.kind && a.length === b.length;
}
