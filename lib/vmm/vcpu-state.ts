// The complete state of one vCPU, as saved for a snapshot or a migration and put back on
// another vCPU. Runs on the vCPU's own thread (KVM wants vCPU ioctls from the creating thread),
// while the machine is paused or not yet started.
import { kvmDebugregs, kvmLapicState, kvmMsrEntry, kvmRegs, kvmSregs, kvmVcpuEvents, kvmXcr, type CpuidEntry, type DebugRegs, type LapicState, type MsrEntry, type Regs, type Sregs, type VcpuEvents, type Xcr } from '../kvm/structs.js';
import type { Vcpu } from '../kvm/vcpu.js';
import { argValueError } from '../kvm/errors.js';
import { decodeCpuid, decodeList } from '../kvm/lists.js';
import { VcpuStateFlag, VcpuStateTag, vcpuStateBlobHeader, vcpuStateBlobSections } from '../kvm/vcpu-state-blob.js';

/** Everything of one vCPU a snapshot or migration carries: CPUID, registers, FPU/XSAVE, MSRs, LAPIC, events, MP state, debug registers and TSC frequency. */
export interface VcpuState {
  id: number;
  cpuid: CpuidEntry[];
  /** KVM_GET_MP_STATE: runnable, halted, waiting for INIT/SIPI, ... */
  mpState: number;
  regs: Regs;
  sregs: Sregs;
  /** The XSAVE area: x87, SSE and AVX state (KVM_GET_FPU misreports MXCSR on some hosts). */
  xsave: Uint8Array;
  xcrs: Xcr[];
  debugRegs: DebugRegs;
  /** Only with the in-kernel irqchip. */
  lapic: LapicState | null;
  msrs: MsrEntry[];
  events: VcpuEvents;
  /** KVM_GET_TSC_KHZ where the host reports it. */
  tscKhz: number | null;
  /** Halted without an in-kernel irqchip: the VMM, not KVM, keeps this vCPU from running. */
  vmmHalted: boolean;
}

/**
 * The MSRs worth saving: those of KVM_GET_MSR_INDEX_LIST that this vCPU can read (the list names
 * some a given CPUID does not enable). Probed once per vCPU.
 */
export function readableMsrs(vcpu: Vcpu, candidates: readonly number[]): number[] {
  try {
    // Usually all of them: one ioctl instead of one per MSR.
    vcpu.getMsrs(candidates);
    return [...candidates];
  } catch {
    // Some are not: find which.
  }
  const readable: number[] = [];
  for (const index of candidates) {
    try {
      vcpu.getMsrs([index]);
      readable.push(index);
    } catch {
      // Not readable on this vCPU: nothing to save.
    }
  }
  return readable;
}

/**
 * `cpuid`: what this vCPU was given, if the caller kept it (KVM refuses to change a vCPU's CPUID
 * once it has run, so it cannot have changed): saves an ioctl in the guest's downtime.
 */
export function saveVcpuState(vcpu: Vcpu, msrIndices: readonly number[], irqchip: boolean, vmmHalted: boolean, cpuid?: CpuidEntry[]): VcpuState {
  // MP state first: reading it lets KVM fold pending LAPIC events into it (api.rst, KVM_GET_MP_STATE).
  const mpState = vcpu.getMpState();
  let tscKhz: number | null = null;
  try {
    tscKhz = vcpu.getTscKhz();
  } catch {
    tscKhz = null;
  }
  return {
    id: vcpu.id,
    cpuid: cpuid ?? vcpu.getCpuid2(),
    mpState,
    regs: vcpu.getRegs(),
    sregs: vcpu.getSregs(),
    xsave: vcpu.getXsave(),
    xcrs: vcpu.getXcrs(),
    debugRegs: vcpu.getDebugRegs(),
    lapic: irqchip ? vcpu.getLapic() : null,
    msrs: msrIndices.length > 0 ? vcpu.getMsrs(msrIndices) : [],
    events: vcpu.getVcpuEvents(),
    tscKhz,
    vmmHalted,
  };
}

/**
 * Puts a saved state on a freshly created vCPU, in the order KVM needs: CPUID before anything
 * that depends on it (MSRs exist only once CPUID says so), the LAPIC before MSRs (the TSC
 * deadline MSR depends on the LAPIC mode), events last. Returns the MSRs the host refused.
 */
export function restoreVcpuState(vcpu: Vcpu, state: VcpuState, irqchip: boolean, cpuidSet: readonly CpuidEntry[] | null = null): number[] {
  if (state.id !== vcpu.id) throw argValueError(`state of vCPU ${state.id} given to vCPU ${vcpu.id}`);
  // `cpuidSet`: what this vCPU was given already. The same again (a destination on the same kind
  // of host) needs no ioctl, which matters inside a migration's downtime.
  if (!cpuidSet || !sameCpuid(cpuidSet, state.cpuid)) vcpu.setCpuid2(state.cpuid);
  if (state.tscKhz !== null && state.tscKhz > 0) {
    try {
      if (vcpu.getTscKhz() !== state.tscKhz) vcpu.setTscKhz(state.tscKhz);
    } catch {
      // Hosts without TSC scaling keep their own frequency; the guest's kvmclock copes.
    }
  }
  vcpu.setMpState(state.mpState);
  vcpu.setRegs(state.regs);
  vcpu.setSregs(state.sregs);
  vcpu.setXsave(state.xsave);
  if (state.xcrs.length > 0) vcpu.setXcrs(state.xcrs);
  vcpu.setDebugRegs(state.debugRegs);
  if (irqchip && state.lapic) vcpu.setLapic(state.lapic);
  const refused: number[] = [];
  if (state.msrs.length > 0) {
    try {
      vcpu.setMsrs(state.msrs);
    } catch {
      // One refused MSR must not cost the rest: set them one by one and report the refusals.
      for (const entry of state.msrs) {
        try {
          vcpu.setMsrs([entry]);
        } catch {
          // A zero value is what a new vCPU holds anyway (an MSR a host without the in-kernel
          // LAPIC reads but will not take, for example): only a lost non-zero value matters.
          if (BigInt(entry.data) !== 0n) refused.push(entry.index);
        }
      }
    }
  }
  vcpu.setVcpuEvents(state.events);
  return refused;
}

function sameCpuid(a: readonly CpuidEntry[], b: readonly CpuidEntry[]): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) {
    const x = a[i]!;
    const y = b[i]!;
    if (x.function !== y.function || x.index !== y.index || x.flags !== y.flags || x.eax !== y.eax || x.ebx !== y.ebx || x.ecx !== y.ecx || x.edx !== y.edx) return false;
  }
  return true;
}

/**
 * A vCPU's state as Vcpu.saveState() wrote it: KVM's structs in one buffer (lib/kvm/vcpu-state-blob.ts),
 * what the vCPU threads save and restore in one call each, and what a migration sends.
 */
export type RawVcpuState = Uint8Array;

/** The structured form of a raw state (checked with checkVcpuStateBlob()). */
export function vcpuStateFromRaw(raw: RawVcpuState): VcpuState {
  const header = vcpuStateBlobHeader(raw);
  const sections = vcpuStateBlobSections(raw);
  const section = (tag: number): Uint8Array => {
    const bytes = sections.get(tag);
    if (!bytes) throw argValueError(`the raw vCPU state has no section ${tag}`);
    return bytes;
  };
  const xcrs = section(VcpuStateTag.Xcrs);
  const xcrCount = Math.min(new DataView(xcrs.buffer, xcrs.byteOffset, xcrs.byteLength).getUint32(0, true), 16);
  const mpState = section(VcpuStateTag.MpState);
  const lapic = sections.get(VcpuStateTag.Lapic);
  return {
    id: header.vcpuId,
    cpuid: sections.has(VcpuStateTag.Cpuid) ? decodeCpuid(section(VcpuStateTag.Cpuid)) : [],
    mpState: new DataView(mpState.buffer, mpState.byteOffset, 4).getUint32(0, true),
    regs: kvmRegs.decode(section(VcpuStateTag.Regs)),
    sregs: kvmSregs.decode(section(VcpuStateTag.Sregs)),
    xsave: section(VcpuStateTag.Xsave).slice(),
    xcrs: Array.from({ length: xcrCount }, (_, i) => kvmXcr.decode(xcrs.subarray(8 + i * kvmXcr.size))),
    debugRegs: kvmDebugregs.decode(section(VcpuStateTag.DebugRegs)),
    lapic: lapic && (header.flags & VcpuStateFlag.Lapic) !== 0 ? kvmLapicState.decode(lapic) : null,
    msrs: decodeList(kvmMsrEntry, section(VcpuStateTag.Msrs)),
    events: kvmVcpuEvents.decode(section(VcpuStateTag.Events)),
    tscKhz: header.tscKhz > 0 ? header.tscKhz : null,
    vmmHalted: (header.flags & VcpuStateFlag.VmmHalted) !== 0,
  };
}
