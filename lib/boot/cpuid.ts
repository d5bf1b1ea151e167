// The CPUID a vCPU sees: KVM's supported set (kvm.getSupportedCpuid()) with this vCPU's APIC id
// and a topology of one package holding `vcpuCount` single-threaded cores, whose APIC ids are
// 0..vcpuCount-1 (KVM gives vCPU n the local APIC id n). Intel SDM vol. 2A, CPUID leaves 01H,
// 04H, 0BH and 1FH; AMD APM vol. 3 for 8000_0001H, 8000_0008H and 8000_001EH.
import type { CpuidEntry } from '../kvm/structs.js';
import { argTypeError, outOfRangeError } from '../kvm/errors.js';

/** kvm_cpuid_entry2.flags: the entry depends on ECX (the subleaf). */
const KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1;
const Leaf1 = { EcxHypervisor: 1 << 31, EdxHtt: 1 << 28 } as const;
const TopologyLevel = { Invalid: 0, Smt: 1, Core: 2 } as const;

/** Bits needed to tell `count` ids apart: ceil(log2(count)). */
const idBits = (count: number): number => (count <= 1 ? 0 : 32 - Math.clz32(count - 1));

/**
 * The CPUID entries for vCPU `vcpuId` of `vcpuCount`: leaf 1 EBX[31:24] = APIC id, EBX[23:16] =
 * logical processor count (with HTT when above one) and the hypervisor bit; leaves 0BH and 1FH
 * (where offered) rebuilt as SMT (1 thread per core) and core (vcpuCount cores) levels with EDX =
 * x2APIC id; leaf 4's core and sharing counts to match; AMD's core-count leaves likewise.
 */
export function guestCpuid(supported: readonly CpuidEntry[], vcpuId: number, vcpuCount: number): CpuidEntry[] {
  if (!Array.isArray(supported)) throw argTypeError('supported must be an array of CPUID entries');
  if (!Number.isInteger(vcpuCount) || vcpuCount < 1 || vcpuCount > 0xffff) throw outOfRangeError(`vcpuCount must be an integer 1..65535, got ${vcpuCount}`);
  if (!Number.isInteger(vcpuId) || vcpuId < 0 || vcpuId >= vcpuCount) throw outOfRangeError(`vcpuId must be an integer 0..${vcpuCount - 1}, got ${vcpuId}`);
  const coreBits = idBits(vcpuCount);
  const coresPow2 = 1 << coreBits;
  const maxBasic = supported.find((e) => e.function === 0)?.eax ?? 0;
  const entries: CpuidEntry[] = [];
  for (const original of supported) {
    if (original.function === 0xb || original.function === 0x1f) continue; // rebuilt below
    const e = { ...original };
    switch (e.function) {
      case 1:
        e.ebx = ((e.ebx & 0x0000ffff) | (Math.min(vcpuCount, 0xff) << 16) | ((vcpuId & 0xff) << 24)) >>> 0;
        e.ecx = (e.ecx | Leaf1.EcxHypervisor) >>> 0;
        e.edx = (vcpuCount > 1 ? e.edx | Leaf1.EdxHtt : e.edx & ~Leaf1.EdxHtt) >>> 0;
        break;
      case 4: {
        if ((e.eax & 0x1f) === 0) break; // no cache: the end of the list
        const level = (e.eax >>> 5) & 0x7;
        // EAX[31:26]: addressable core ids - 1; EAX[25:14]: logical processors sharing this cache - 1
        // (L1 and L2 per core, L3 by the whole package).
        const sharing = level >= 3 ? coresPow2 - 1 : 0;
        e.eax = ((e.eax & 0x3fff) | (Math.min(sharing, 0xfff) << 14) | (Math.min(coresPow2 - 1, 0x3f) << 26)) >>> 0;
        break;
      }
      case 0x80000001:
        // CmpLegacy: more than one core, no HyperThreading.
        e.ecx = (vcpuCount > 1 ? e.ecx | 0x2 : e.ecx & ~0x2) >>> 0;
        break;
      case 0x80000008:
        // ECX[7:0] = cores - 1, ECX[15:12] = APIC id bits for the core id.
        e.ecx = ((e.ecx & ~0xf0ff) | (Math.min(vcpuCount - 1, 0xff)) | (coreBits << 12)) >>> 0;
        break;
      case 0x8000001e:
        // Extended APIC id; core id with one thread per core; one node.
        e.eax = vcpuId >>> 0;
        e.ebx = ((e.ebx & 0xffff0000) | (vcpuId & 0xff)) >>> 0;
        e.ecx = (e.ecx & ~0x7ff) >>> 0;
        break;
    }
    entries.push(e);
  }
  const topologyLeaves = [0xb, ...(supported.some((e) => e.function === 0x1f) ? [0x1f] : [])];
  for (const leaf of topologyLeaves) {
    if (leaf > maxBasic) continue;
    const flags = KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
    entries.push(
      // EAX[4:0]: shift of the x2APIC id to the next level; EBX[15:0]: logical processors at this
      // level; ECX[15:8]: level type, ECX[7:0]: level number; EDX: this CPU's x2APIC id.
      { function: leaf, index: 0, flags, eax: 0, ebx: 1, ecx: (TopologyLevel.Smt << 8) | 0, edx: vcpuId },
      { function: leaf, index: 1, flags, eax: coreBits, ebx: vcpuCount, ecx: (TopologyLevel.Core << 8) | 1, edx: vcpuId },
      { function: leaf, index: 2, flags, eax: 0, ebx: 0, ecx: (TopologyLevel.Invalid << 8) | 2, edx: vcpuId },
    );
  }
  return entries;
}
