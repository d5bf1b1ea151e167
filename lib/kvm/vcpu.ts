// A vCPU (KVM_CREATE_VCPU's fd). Methods are named after their ioctls. A vCPU belongs to the
// thread that created it; other threads reach it only through its kick handle.
import { COALESCED_MMIO_PAGE_OFFSET, Cap, GuestDebugFlag, PAGE_SIZE } from './constants.js';
import { KvmError, argTypeError, argValueError } from './errors.js';
import { decodeExit, type VcpuExit } from './exit.js';
import { Handle, checkAddress, checkInteger } from './handle.js';
import { KvmRun } from './kvm-run.js';
import { decodeCpuid, decodeList, emptyList, encodeCpuid, encodeMsrIndices, encodeMsrs, listCount } from './lists.js';
import { native, op } from './native.js';
import {
  KVM_MAX_XCRS, kvmCpuidEntry2, kvmDebugregs, kvmEnableCap, kvmFpu, kvmGuestDebug, kvmInterrupt, kvmLapicState,
  kvmCoalescedMmio, kvmCoalescedMmioRing, kvmMpState, kvmMsrEntry, kvmNestedStateHeader, kvmRegs, kvmSregs, kvmTranslation, kvmVcpuEvents, kvmXcr,
  type CoalescedMmio, type CpuidEntry, type DebugRegs, type Fpu, type LapicState, type MsrEntry, type Regs, type Sregs, type VcpuEvents, type Xcr,
} from './structs.js';

const OPS = {
  getRegs: op('KVM_GET_REGS'),
  setRegs: op('KVM_SET_REGS'),
  getSregs: op('KVM_GET_SREGS'),
  setSregs: op('KVM_SET_SREGS'),
  getFpu: op('KVM_GET_FPU'),
  setFpu: op('KVM_SET_FPU'),
  getMsrs: op('KVM_GET_MSRS'),
  setMsrs: op('KVM_SET_MSRS'),
  setCpuid2: op('KVM_SET_CPUID2'),
  getCpuid2: op('KVM_GET_CPUID2'),
  getLapic: op('KVM_GET_LAPIC'),
  setLapic: op('KVM_SET_LAPIC'),
  getXsave: op('KVM_GET_XSAVE'),
  getXsave2: op('KVM_GET_XSAVE2'),
  setXsave: op('KVM_SET_XSAVE'),
  getXcrs: op('KVM_GET_XCRS'),
  setXcrs: op('KVM_SET_XCRS'),
  getVcpuEvents: op('KVM_GET_VCPU_EVENTS'),
  setVcpuEvents: op('KVM_SET_VCPU_EVENTS'),
  getMpState: op('KVM_GET_MP_STATE'),
  setMpState: op('KVM_SET_MP_STATE'),
  getDebugRegs: op('KVM_GET_DEBUGREGS'),
  setDebugRegs: op('KVM_SET_DEBUGREGS'),
  getTscKhz: op('KVM_GET_TSC_KHZ'),
  setTscKhz: op('KVM_SET_TSC_KHZ'),
  getNestedState: op('KVM_GET_NESTED_STATE'),
  setNestedState: op('KVM_SET_NESTED_STATE'),
  translate: op('KVM_TRANSLATE'),
  setGuestDebug: op('KVM_SET_GUEST_DEBUG'),
  kvmclockCtrl: op('KVM_KVMCLOCK_CTRL'),
  nmi: op('KVM_NMI'),
  smi: op('KVM_SMI'),
  interrupt: op('KVM_INTERRUPT'),
  enableCap: op('KVM_ENABLE_CAP(vcpu)'),
  checkExtension: op('KVM_CHECK_EXTENSION(vcpu)'),
};

const XSAVE_LEGACY_BYTES = 4096;
const KVM_XCRS_BYTES = 392;

/** A structured-cloneable reference that kicks a vCPU from any thread (see kickVcpu). */
export interface VcpuKickHandle {
  readonly vcpuKick: number;
}

/**
 * Makes the vCPU behind `handle` leave run() promptly (it returns ExitReason.Intr), from any
 * thread. Returns false if that vCPU is already closed. To stop a vCPU loop reliably, set the
 * loop's own flag first, then kick: a kick that lands between two run() calls is not lost.
 */
export function kickVcpu(handle: VcpuKickHandle): boolean {
  if (typeof handle !== 'object' || handle === null || typeof handle.vcpuKick !== 'number') {
    throw argTypeError('handle must be a VcpuKickHandle (vcpu.kickHandle)');
  }
  return native.kick(handle.vcpuKick);
}

/**
 * vcpu.restoreState() from another thread than the vCPU's own, which must be parked meanwhile
 * (making no ioctl: a machine not yet started). x86 KVM takes a vCPU's ioctls from any thread,
 * serialized on the vCPU's mutex; only KVM_RUN follows its thread. A restore inside a migration's
 * downtime then needs no round trip to the vCPU's thread. Given no `currentCpuid`, the vCPU's own
 * (KVM_GET_CPUID2) is compared with the saved one. Returns the MSRs the host refused.
 */
export function restoreParkedVcpu(handle: VcpuKickHandle, state: Uint8Array, currentCpuid: Uint8Array | null, irqchip: boolean): number[] {
  if (typeof handle !== 'object' || handle === null || typeof handle.vcpuKick !== 'number') {
    throw argTypeError('handle must be a VcpuKickHandle (vcpu.kickHandle)');
  }
  return native.restoreParkedVcpuState(handle.vcpuKick, state, currentCpuid, irqchip);
}

/**
 * vcpu.saveState() from another thread than the vCPU's own, which must be parked meanwhile (making
 * no ioctl: a paused machine's). A migration's pause then saves the vCPU on the thread that sends
 * its state, without a round trip to the vCPU's thread.
 */
export function saveParkedVcpu(handle: VcpuKickHandle, msrIndices: Uint32Array, cpuid: Uint8Array, options: { lapic: boolean; vmmHalted: boolean }): Uint8Array {
  if (typeof handle !== 'object' || handle === null || typeof handle.vcpuKick !== 'number') {
    throw argTypeError('handle must be a VcpuKickHandle (vcpu.kickHandle)');
  }
  return native.saveParkedVcpuState(handle.vcpuKick, msrIndices, cpuid, (options.lapic ? 1 : 0) | (options.vmmHalted ? 2 : 0));
}

/**
 * A vCPU its creating thread let go of (vcpu.handOver()), for another thread to take
 * (adoptVcpu()): say one made ahead on the main thread for a vCPU thread. Structured-clonable.
 * Until adopted, it is reached only through this handle, from any thread: restoreParkedVcpu()
 * (it is a kick handle too) and closeReleasedVcpu().
 */
export interface ReleasedVcpu extends VcpuKickHandle {
  readonly vcpuId: number;
}

function checkReleased(released: ReleasedVcpu): void {
  if (typeof released !== 'object' || released === null || typeof released.vcpuKick !== 'number' || typeof released.vcpuId !== 'number') {
    throw argTypeError('released must be a ReleasedVcpu (vcpu.handOver())');
  }
}

/** Takes a released vCPU as the calling thread's own, as if it had created it (its kicks come here). */
export function adoptVcpu(released: ReleasedVcpu): Vcpu {
  checkReleased(released);
  const [handle, fd, run] = native.adoptVcpu(released.vcpuKick);
  return new Vcpu(handle, released.vcpuId, fd, run);
}

/** Closes a released vCPU that no thread adopted, from any thread; false if it was adopted (its thread closes it) or is closed. */
export function closeReleasedVcpu(released: ReleasedVcpu): boolean {
  checkReleased(released);
  return native.closeReleasedVcpu(released.vcpuKick);
}

/** What vcpu.setGuestDebug() sets (KVM_SET_GUEST_DEBUG): single-stepping, breakpoints and the debug registers. */
export interface GuestDebugOptions {
  /** Trap after every guest instruction (KVM_GUESTDBG_SINGLESTEP). */
  singlestep?: boolean;
  /** Exit on INT3 (KVM_GUESTDBG_USE_SW_BP). */
  softwareBreakpoints?: boolean;
  /** Use debugreg for hardware breakpoints (KVM_GUESTDBG_USE_HW_BP). */
  hardwareBreakpoints?: boolean;
  /** DR0-DR3 addresses, DR6, DR7 in slots 0-3, 6, 7. */
  debugreg?: bigint[];
}

/** A guest-virtual address translated by the vCPU's page tables (KVM_TRANSLATE). */
export interface Translation {
  physicalAddress: bigint;
  valid: boolean;
  writeable: boolean;
  usermode: boolean;
}

/** A vCPU fd (vm.createVcpu()): run(), its kvm_run page, and its registers and other state, one method per ioctl. Its ioctls must come from the thread that created it. */
export class Vcpu extends Handle {
  readonly id: number;
  readonly fd: number;
  /** The kvm_run page, read and written in place (exit details, immediate_exit). */
  readonly kvmRun: KvmRun;
  readonly #handle: number;
  readonly #runBuffer: ArrayBuffer;

  /** @internal Use vm.createVcpu(id). */
  constructor(handle: number, id: number, fd: number, runBuffer: ArrayBuffer) {
    super('Vcpu', () => native.closeVcpu(handle));
    this.#handle = handle;
    this.id = id;
    this.fd = fd;
    this.#runBuffer = runBuffer;
    this.kvmRun = new KvmRun(runBuffer);
  }

  /**
   * KVM_RUN: runs the guest until it exits and returns the exit reason (an ExitReason number).
   * Allocates nothing; read the details from kvmRun, or decode them with exit().
   */
  run(): number {
    return native.run(this.#handle);
  }

  /** The last exit, decoded. */
  exit(): VcpuExit {
    this.assertOpen();
    return decodeExit(this.kvmRun);
  }

  /** Makes a run() in progress (or the next one) return ExitReason.Intr. */
  kick(): void {
    this.assertOpen();
    native.kick(this.#handle);
  }

  /**
   * Lets go of this vCPU for another thread to adopt (adoptVcpu()); this object is closed from
   * here on, the vCPU is not. Whoever holds the result closes it if no thread adopts it
   * (closeReleasedVcpu()).
   */
  handOver(): ReleasedVcpu {
    this.assertOpen();
    native.releaseVcpu(this.#handle, this.#runBuffer);
    this.forget();
    return { vcpuKick: this.#handle, vcpuId: this.id };
  }

  /** A handle that another thread passes to kickVcpu(). */
  get kickHandle(): VcpuKickHandle {
    this.assertOpen();
    return { vcpuKick: this.#handle };
  }

  #ioctl(opNumber: number, arg?: Uint8Array | number | bigint): number {
    return native.ioctl(this.#handle, opNumber, arg);
  }

  #get<T>(opNumber: number, type: { size: number; decode(b: Uint8Array): T }): T {
    const buffer = new Uint8Array(type.size);
    this.#ioctl(opNumber, buffer);
    return type.decode(buffer);
  }

  /** KVM_GET_REGS: the general-purpose registers, RIP and RFLAGS. */
  getRegs(): Regs {
    return this.#get(OPS.getRegs, kvmRegs);
  }
  /** KVM_SET_REGS. */
  setRegs(regs: Regs): void {
    this.#ioctl(OPS.setRegs, kvmRegs.encode(regs));
  }
  /** KVM_GET_SREGS: segment, descriptor-table and control registers, EFER and the APIC base. */
  getSregs(): Sregs {
    return this.#get(OPS.getSregs, kvmSregs);
  }
  /** KVM_SET_SREGS. */
  setSregs(sregs: Sregs): void {
    this.#ioctl(OPS.setSregs, kvmSregs.encode(sregs));
  }
  /** Legacy FPU/SSE state. Prefer getXsave() to save state: some hosts report mxcsr only there. */
  getFpu(): Fpu {
    return this.#get(OPS.getFpu, kvmFpu);
  }
  /** KVM_SET_FPU: the x87 and SSE state. */
  setFpu(fpu: Fpu): void {
    this.#ioctl(OPS.setFpu, kvmFpu.encode(fpu));
  }

  /** Reads the given MSRs. Throws a KvmError naming the first MSR that KVM could not read. */
  getMsrs(indices: readonly number[]): MsrEntry[] {
    const buffer = encodeMsrIndices(indices);
    const read = this.#ioctl(OPS.getMsrs, buffer);
    if (read < indices.length) {
      throw new KvmError('EINVAL', -22, 'ioctl(KVM_GET_MSRS)', `MSR 0x${indices[read]!.toString(16)} cannot be read on this vCPU`);
    }
    return decodeList(kvmMsrEntry, buffer);
  }

  /**
   * Writes the given MSRs: entries, or the kvm_msrs that encodeMsrs() made of them (made once, on
   * any thread, for many vCPUs). Throws a KvmError naming the first MSR that KVM refused.
   */
  setMsrs(entries: readonly MsrEntry[] | Uint8Array): void {
    const encoded = entries instanceof Uint8Array ? entries : encodeMsrs(entries);
    const written = this.#ioctl(OPS.setMsrs, encoded);
    if (written < listCount(encoded)) {
      const refused = entries instanceof Uint8Array ? decodeList(kvmMsrEntry, encoded)[written]! : entries[written]!;
      throw new KvmError('EINVAL', -22, 'ioctl(KVM_SET_MSRS)', `MSR 0x${refused.index.toString(16)} cannot be set to 0x${BigInt(refused.data).toString(16)}`);
    }
  }

  /** Sets the CPUID: entries, or the kvm_cpuid2 that encodeCpuid() made of them. */
  setCpuid2(entries: readonly CpuidEntry[] | Uint8Array): void {
    this.#ioctl(OPS.setCpuid2, entries instanceof Uint8Array ? entries : encodeCpuid(entries));
  }

  /** KVM_GET_CPUID2: the CPUID entries the vCPU was given. */
  getCpuid2(): CpuidEntry[] {
    let capacity = 64;
    for (;;) {
      const buffer = emptyList(kvmCpuidEntry2, capacity);
      try {
        this.#ioctl(OPS.getCpuid2, buffer);
        return decodeCpuid(buffer);
      } catch (error) {
        if (!(error instanceof KvmError) || error.code !== 'E2BIG' || capacity >= 4096) throw error;
        capacity = Math.max(capacity * 2, listCount(buffer));
      }
    }
  }

  /** KVM_GET_LAPIC: the local APIC's register page (with the in-kernel irqchip). */
  getLapic(): LapicState {
    return this.#get(OPS.getLapic, kvmLapicState);
  }
  /** KVM_SET_LAPIC. */
  setLapic(state: LapicState): void {
    this.#ioctl(OPS.setLapic, kvmLapicState.encode(state));
  }

  /** The XSAVE area (struct kvm_xsave's region), KVM_CAP_XSAVE2 bytes where larger than 4 KiB. */
  getXsave(): Uint8Array {
    this.assertOpen();
    const size = this.#ioctl(OPS.checkExtension, Cap.Xsave2);
    if (size > XSAVE_LEGACY_BYTES) {
      const buffer = new Uint8Array(size);
      this.#ioctl(OPS.getXsave2, buffer);
      return buffer;
    }
    const buffer = new Uint8Array(XSAVE_LEGACY_BYTES);
    this.#ioctl(OPS.getXsave, buffer);
    return buffer;
  }
  /** KVM_SET_XSAVE (KVM_SET_XSAVE2's region where offered): the state getXsave() returned. */
  setXsave(region: Uint8Array): void {
    if (!(region instanceof Uint8Array)) throw argTypeError('xsave region must be a Uint8Array');
    this.#ioctl(OPS.setXsave, region);
  }

  /** KVM_GET_XCRS: the extended control registers (XCR0). */
  getXcrs(): Xcr[] {
    const buffer = new Uint8Array(KVM_XCRS_BYTES);
    this.#ioctl(OPS.getXcrs, buffer);
    const count = Math.min(new DataView(buffer.buffer).getUint32(0, true), KVM_MAX_XCRS);
    return Array.from({ length: count }, (_, i) => kvmXcr.decode(buffer.subarray(8 + i * kvmXcr.size)));
  }
  /** KVM_SET_XCRS. */
  setXcrs(xcrs: readonly Xcr[]): void {
    if (!Array.isArray(xcrs)) throw argTypeError('xcrs must be an array');
    if (xcrs.length > KVM_MAX_XCRS) throw argValueError(`at most ${KVM_MAX_XCRS} xcrs`);
    const buffer = new Uint8Array(KVM_XCRS_BYTES);
    new DataView(buffer.buffer).setUint32(0, xcrs.length, true);
    xcrs.forEach((xcr, i) => kvmXcr.encode(xcr, buffer.subarray(8 + i * kvmXcr.size)));
    this.#ioctl(OPS.setXcrs, buffer);
  }

  /** KVM_GET_VCPU_EVENTS: pending exceptions, interrupts, NMIs and SIPIs, and the interrupt shadow. */
  getVcpuEvents(): VcpuEvents {
    return this.#get(OPS.getVcpuEvents, kvmVcpuEvents);
  }
  /** KVM_SET_VCPU_EVENTS. */
  setVcpuEvents(events: VcpuEvents): void {
    this.#ioctl(OPS.setVcpuEvents, kvmVcpuEvents.encode(events));
  }

  /** KVM_MP_STATE_* (see MpState). */
  getMpState(): number {
    return this.#get(OPS.getMpState, kvmMpState).mpState;
  }
  /** KVM_SET_MP_STATE: runnable, halted, waiting for INIT/SIPI... (MpState). */
  setMpState(mpState: number): void {
    this.#ioctl(OPS.setMpState, kvmMpState.encode({ mpState }));
  }

  /** KVM_GET_DEBUGREGS: DR0-DR3, DR6 and DR7. */
  getDebugRegs(): DebugRegs {
    return this.#get(OPS.getDebugRegs, kvmDebugregs);
  }
  /** KVM_SET_DEBUGREGS. */
  setDebugRegs(regs: DebugRegs): void {
    this.#ioctl(OPS.setDebugRegs, kvmDebugregs.encode(regs));
  }

  /**
   * The whole state in one call, as raw KVM structs in one buffer (see vcpu-state-blob.ts): MP
   * state, registers, XSAVE, XCRs, debug registers, the LAPIC (`lapic`), the MSRs `msrIndices`,
   * events, the TSC rate, and `cpuid` (a kvm_cpuid2, what the vCPU was given) carried along.
   */
  saveState(msrIndices: Uint32Array, cpuid: Uint8Array, options: { lapic: boolean; vmmHalted: boolean }): Uint8Array {
    return native.saveVcpuState(this.#handle, msrIndices, cpuid, (options.lapic ? 1 : 0) | (options.vmmHalted ? 2 : 0));
  }
  /**
   * Puts back what saveState() saved, checked whole before the first ioctl, in KVM's order; the
   * CPUID only if it differs from `currentCpuid`, the LAPIC only with `irqchip`. Returns the MSRs
   * (non-zero values) the host refused; the rest are set.
   */
  restoreState(state: Uint8Array, currentCpuid: Uint8Array | null, irqchip: boolean): number[] {
    return native.restoreVcpuState(this.#handle, state, currentCpuid, irqchip);
  }

  /** KVM_GET_TSC_KHZ: the guest's TSC frequency in kHz. */
  getTscKhz(): number {
    return this.#ioctl(OPS.getTscKhz);
  }
  /** KVM_SET_TSC_KHZ: the guest's TSC frequency in kHz. */
  setTscKhz(khz: number): void {
    // KVM stores a u32 but KVM_GET_TSC_KHZ returns it through an int: keep it positive.
    this.#ioctl(OPS.setTscKhz, checkInteger(khz, 'khz', 1, 0x7fffffff));
  }

  /** KVM_GET_NESTED_STATE: the whole struct kvm_nested_state (header and data). */
  getNestedState(): Uint8Array {
    let size = Math.max(this.#ioctl(OPS.checkExtension, Cap.NestedState), kvmNestedStateHeader.size);
    for (;;) {
      const buffer = new Uint8Array(size);
      kvmNestedStateHeader.encode({ flags: 0, format: 0, size }, buffer);
      try {
        this.#ioctl(OPS.getNestedState, buffer);
        return buffer.subarray(0, kvmNestedStateHeader.decode(buffer).size);
      } catch (error) {
        if (!(error instanceof KvmError) || error.code !== 'E2BIG' || size >= 1 << 20) throw error;
        size *= 2;
      }
    }
  }
  /** KVM_SET_NESTED_STATE: the state getNestedState() returned. */
  setNestedState(state: Uint8Array): void {
    if (!(state instanceof Uint8Array)) throw argTypeError('nested state must be a Uint8Array');
    this.#ioctl(OPS.setNestedState, state);
  }

  /** KVM_TRANSLATE: the guest-physical address behind a guest-virtual one, in the current mode. */
  translate(guestVirtAddr: number | bigint): Translation {
    const buffer = kvmTranslation.encode({
      linearAddress: checkAddress(guestVirtAddr, 'guestVirtAddr'), physicalAddress: 0n, valid: 0, writeable: 0, usermode: 0,
    });
    this.#ioctl(OPS.translate, buffer);
    const t = kvmTranslation.decode(buffer);
    return { physicalAddress: t.physicalAddress, valid: t.valid !== 0, writeable: t.writeable !== 0, usermode: t.usermode !== 0 };
  }

  /** KVM_SET_GUEST_DEBUG. `null` turns debugging off. */
  setGuestDebug(options: GuestDebugOptions | null): void {
    let control = 0;
    let debugreg = [0n, 0n, 0n, 0n, 0n, 0n, 0n, 0n];
    if (options) {
      if (typeof options !== 'object') throw argTypeError('options must be an object or null');
      control = GuestDebugFlag.Enable;
      if (options.singlestep) control |= GuestDebugFlag.Singlestep;
      if (options.softwareBreakpoints) control |= GuestDebugFlag.UseSwBp;
      if (options.hardwareBreakpoints) control |= GuestDebugFlag.UseHwBp;
      if (options.debugreg !== undefined) debugreg = options.debugreg;
    }
    this.#ioctl(OPS.setGuestDebug, kvmGuestDebug.encode({ control, debugreg }));
  }

  /** Tells the guest's kvmclock that the vCPU was paused (KVM_KVMCLOCK_CTRL). */
  kvmclockCtrl(): void {
    this.#ioctl(OPS.kvmclockCtrl);
  }
  /** Queues an NMI (KVM_NMI; needs the in-kernel local APIC). */
  nmi(): void {
    this.#ioctl(OPS.nmi);
  }
  /** Queues an SMI (KVM_SMI). */
  smi(): void {
    this.#ioctl(OPS.smi);
  }
  /** Injects external interrupt `irq` (KVM_INTERRUPT; only without an in-kernel irqchip). */
  interrupt(irq: number): void {
    this.#ioctl(OPS.interrupt, kvmInterrupt.encode({ irq: checkInteger(irq, 'irq', 0, 255) }));
  }

  /** KVM_ENABLE_CAP on the vCPU: turns on `cap` with its `args` and `flags`. */
  enableCap(cap: number, args: readonly (number | bigint)[] = [], flags = 0): void {
    this.#ioctl(OPS.enableCap, encodeEnableCap(cap, args, flags));
  }

  /** KVM_CHECK_EXTENSION on the vCPU: 0 if `cap` is not offered, else a positive value (often a limit). */
  checkExtension(cap: number): number {
    return this.#ioctl(OPS.checkExtension, checkInteger(cap, 'cap', 0, 0xffffffff));
  }

  /**
   * Collects this vCPU's dirty-ring entries (KVM_CAP_DIRTY_LOG_RING) as [slot, pageOffset] pairs
   * in `into`, marking them for vm.resetDirtyRings(). Returns how many pairs were written.
   * Callable from any thread through the kick handle (see harvestDirtyRing()).
   */
  harvestDirtyRing(into: Float64Array): number {
    this.assertOpen();
    return native.harvestDirtyRing(this.#handle, into);
  }

  /**
   * Takes the writes KVM coalesced (vm.registerCoalescedMmio) since the last call, oldest first.
   * The ring belongs to the VM and appears in every vCPU's mapping: drain it from one thread,
   * before handling any exit that may depend on those writes (api.rst, KVM_REGISTER_COALESCED_MMIO).
   */
  drainCoalescedMmio(): CoalescedMmio[] {
    this.assertOpen();
    const ringOffset = COALESCED_MMIO_PAGE_OFFSET * PAGE_SIZE;
    if (this.kvmRun.bytes.length < ringOffset + PAGE_SIZE) return [];
    // first (ours to advance) and last (the kernel's) are u32s at the start of the ring page;
    // the entries follow the header (KVM_COALESCED_MMIO_MAX of them).
    const header = new Int32Array(this.kvmRun.bytes.buffer, ringOffset, 2);
    const entriesOffset = ringOffset + kvmCoalescedMmioRing.size;
    const capacity = Math.floor((PAGE_SIZE - kvmCoalescedMmioRing.size) / kvmCoalescedMmio.size);
    const entries: CoalescedMmio[] = [];
    let first = Atomics.load(header, 0) >>> 0;
    const last = Atomics.load(header, 1) >>> 0;
    if (first >= capacity || last >= capacity) return entries;
    while (first !== last) {
      entries.push(kvmCoalescedMmio.decode(this.kvmRun.bytes.subarray(entriesOffset + first * kvmCoalescedMmio.size)));
      first = (first + 1) % capacity;
    }
    Atomics.store(header, 0, first);
    return entries;
  }

  protected release(): void {
    // With the kvm_run buffer, the addon detaches it and releases the page now, so the kernel
    // destroys the vCPU (and an already closed VM) at close(), not on a later event-loop turn.
    native.closeVcpu(this.#handle, this.#runBuffer);
  }
}

/** Harvests a vCPU's dirty ring from any thread, by its kick handle. See Vcpu.harvestDirtyRing. */
export function harvestDirtyRing(handle: VcpuKickHandle, into: Float64Array): number {
  if (typeof handle !== 'object' || handle === null || typeof handle.vcpuKick !== 'number') {
    throw argTypeError('handle must be a VcpuKickHandle (vcpu.kickHandle)');
  }
  return native.harvestDirtyRing(handle.vcpuKick, into);
}

export function encodeEnableCap(cap: number, args: readonly (number | bigint)[], flags: number): Uint8Array {
  checkInteger(cap, 'cap', 0, 0xffffffff);
  if (!Array.isArray(args) || args.length > 4) throw argTypeError('args must be an array of at most 4 integers');
  const padded = [0, 1, 2, 3].map((i) => checkAddress(args[i] ?? 0, `args[${i}]`));
  return kvmEnableCap.encode({ cap, flags: checkInteger(flags, 'flags', 0, 0xffffffff), args: padded });
}
