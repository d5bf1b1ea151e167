// MSR values a guest expects to find at power-on that KVM's vCPU reset does not give it.
import { Msr } from '../kvm/constants.js';
import type { MsrEntry } from '../kvm/structs.js';

/** IA32_MTRR_DEF_TYPE (Intel SDM vol. 3A, 12.11.2.1). */
const IA32_MTRR_DEF_TYPE = 0x2ff;
/** IA32_MISC_ENABLE bit 0: fast-string operations, set by every BIOS. */
const MISC_ENABLE_FAST_STRING = 1n;
/** MTRRs enabled (bit 11), default memory type write-back (6): what firmware leaves for RAM. */
const MTRR_ENABLED_WRITE_BACK = (1n << 11n) | 6n;
/** The architectural power-on PAT: WB, WT, UC-, UC, repeated. */
export const PAT_DEFAULT = 0x0007040600070406n;

/**
 * The MSRs to set on every vCPU after its CPUID (KVM accepts some only once CPUID says they
 * exist) and before it first runs.
 */
export function bootMsrs(): MsrEntry[] {
  return [
    { index: Msr.IA32_MISC_ENABLE, data: MISC_ENABLE_FAST_STRING },
    { index: Msr.IA32_PAT, data: PAT_DEFAULT },
    { index: IA32_MTRR_DEF_TYPE, data: MTRR_ENABLED_WRITE_BACK },
    { index: Msr.IA32_SYSENTER_CS, data: 0n },
    { index: Msr.IA32_SYSENTER_ESP, data: 0n },
    { index: Msr.IA32_SYSENTER_EIP, data: 0n },
    { index: Msr.IA32_STAR, data: 0n },
    { index: Msr.IA32_LSTAR, data: 0n },
    { index: Msr.IA32_CSTAR, data: 0n },
    { index: Msr.IA32_FMASK, data: 0n },
    { index: Msr.IA32_KERNEL_GS_BASE, data: 0n },
  ];
}
