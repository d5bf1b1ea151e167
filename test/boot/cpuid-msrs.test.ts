// guestCpuid(): each vCPU's APIC id and the package topology; bootMsrs(): accepted by KVM once
// the vCPU has its CPUID, and read back as set.
import t from 'tap';
import { bootMsrs, guestCpuid, PAT_DEFAULT } from '../../lib/boot/index.js';
import { Kvm, Msr, type CpuidEntry } from '../../lib/index.js';
import { noKvm } from '../helpers/kvm.js';

const entry = (fn: number, index: number, regs: Partial<CpuidEntry> = {}): CpuidEntry => ({
  function: fn, index, flags: 0, eax: 0, ebx: 0, ecx: 0, edx: 0, ...regs,
});
const find = (entries: CpuidEntry[], fn: number, index = 0) => entries.find((e) => e.function === fn && e.index === index);

// Shaped like an Intel host's KVM_GET_SUPPORTED_CPUID: leaf 4 lists L1d, L1i, L2, L3; leaf 0BH
// and 1FH come with one placeholder subleaf that guestCpuid replaces.
const supported: CpuidEntry[] = [
  entry(0, 0, { eax: 0x1f }),
  entry(1, 0, { eax: 0xa0671, ebx: 0x00ff0800, ecx: 0x01202000, edx: 0x0f8bfbff }),
  entry(4, 0, { flags: 1, eax: 0x04000121 }),
  entry(4, 1, { flags: 1, eax: 0x04000122 }),
  entry(4, 2, { flags: 1, eax: 0x04000143 }),
  entry(4, 3, { flags: 1, eax: 0x04004163 }),
  entry(4, 4, { flags: 1 }),
  entry(0xb, 0, { flags: 1, edx: 7 }),
  entry(0x1f, 0, { flags: 1, edx: 7 }),
  entry(0x80000001, 0, { ecx: 0x121 }),
  entry(0x80000008, 0, { eax: 0x3930, ecx: 0xf0ff }),
  entry(0x8000001e, 0, { eax: 9, ebx: 0x1234ff, ecx: 0x7ff }),
];

t.test('leaf 1: APIC id, logical processor count, HTT and the hypervisor bit', async (t) => {
  const cpuid = guestCpuid(supported, 2, 4);
  const leaf1 = find(cpuid, 1)!;
  t.equal(leaf1.ebx >>> 24, 2, 'initial APIC id = vCPU id');
  t.equal((leaf1.ebx >>> 16) & 0xff, 4, 'logical processors in the package');
  t.equal(leaf1.ebx & 0xffff, 0x0800, 'brand index and CLFLUSH size kept');
  t.equal(leaf1.ecx >>> 31, 1, 'hypervisor present');
  t.equal((leaf1.edx >>> 28) & 1, 1, 'HTT: the count field is valid');
  t.equal((find(guestCpuid(supported, 0, 1), 1)!.edx >>> 28) & 1, 0, 'no HTT with one vCPU');
  t.equal(find(supported, 1)!.ebx, 0x00ff0800, 'the input entries are not modified');
});

t.test('leaves 0BH and 1FH: SMT and core levels with the x2APIC id', async (t) => {
  for (const leaf of [0xb, 0x1f]) {
    const cpuid = guestCpuid(supported, 5, 6).filter((e) => e.function === leaf);
    t.same(cpuid, [
      { function: leaf, index: 0, flags: 1, eax: 0, ebx: 1, ecx: 0x100, edx: 5 },
      { function: leaf, index: 1, flags: 1, eax: 3, ebx: 6, ecx: 0x201, edx: 5 },
      { function: leaf, index: 2, flags: 1, eax: 0, ebx: 0, ecx: 0x002, edx: 5 },
    ], `leaf 0x${leaf.toString(16)}: 1 thread per core, 6 cores need 3 id bits`);
  }
  const alone = guestCpuid(supported, 0, 1).filter((e) => e.function === 0xb);
  t.same(alone.map((e) => [e.eax, e.ebx]), [[0, 1], [0, 1], [0, 0]], 'one vCPU: no id bits, one processor');
  const noLeaf1f = guestCpuid(supported.filter((e) => e.function !== 0x1f), 0, 2);
  t.equal(noLeaf1f.some((e) => e.function === 0x1f), false, 'leaf 1FH only where the host offers it');
  const oldCpu = guestCpuid([entry(0, 0, { eax: 0xa }), entry(1, 0)], 0, 2);
  t.equal(oldCpu.some((e) => e.function === 0xb), false, 'no leaf 0BH above the maximum basic leaf');
});

t.test('leaf 4: core ids per package and L3 shared by all', async (t) => {
  const cpuid = guestCpuid(supported, 0, 3).filter((e) => e.function === 4);
  t.same(cpuid.map((e) => [e.eax >>> 26, (e.eax >>> 14) & 0xfff, e.eax & 0x3fff]), [
    [3, 0, 0x121], [3, 0, 0x122], [3, 0, 0x143], [3, 3, 0x163], [0, 0, 0],
  ], '3 cores round up to 4 core ids; L1 and L2 per core; the terminator left alone');
});

t.test('AMD leaves: core count, APIC id size, extended APIC id', async (t) => {
  const cpuid = guestCpuid(supported, 3, 4);
  t.equal(find(cpuid, 0x80000001)!.ecx, 0x123, 'CmpLegacy');
  t.equal(find(cpuid, 0x80000008)!.ecx, 0x2003, 'NC = 3, ApicIdCoreIdSize = 2');
  t.same(find(cpuid, 0x8000001e), entry(0x8000001e, 0, { eax: 3, ebx: 0x120003, ecx: 0 }));
  t.equal(find(guestCpuid(supported, 0, 1), 0x80000001)!.ecx, 0x121, 'no CmpLegacy with one vCPU');
});

t.test('bad vCPU ids and counts', async (t) => {
  t.throws(() => guestCpuid(supported, 2, 2), new RangeError('vcpuId must be an integer 0..1, got 2'));
  t.throws(() => guestCpuid(supported, 0, 0), new RangeError('vcpuCount must be an integer 1..65535, got 0'));
  t.throws(() => guestCpuid(null as unknown as CpuidEntry[], 0, 1), TypeError);
});

t.test('KVM takes each vCPU its CPUID and reports it back', { skip: noKvm }, async (t) => {
  const kvm = Kvm.open();
  const vm = kvm.createVm();
  t.teardown(() => {
    vm.close();
    kvm.close();
  });
  const host = kvm.getSupportedCpuid();
  for (let id = 0; id < 3; id++) {
    const vcpu = vm.createVcpu(id);
    vcpu.setCpuid2(guestCpuid(host, id, 3));
    const cpuid = vcpu.getCpuid2();
    t.equal(find(cpuid, 1)!.ebx >>> 24, id, `vCPU ${id}: leaf 1 APIC id`);
    t.equal(find(cpuid, 0xb, 1)!.edx, id, `vCPU ${id}: x2APIC id`);
    t.equal(find(cpuid, 0xb, 1)!.ebx, 3, `vCPU ${id}: 3 processors`);
    vcpu.close();
  }
});

t.test('the boot MSRs', async (t) => {
  const byIndex = new Map(bootMsrs().map((m) => [m.index, m.data]));
  t.equal(byIndex.get(Msr.IA32_MISC_ENABLE), 1n, 'fast strings');
  t.equal(byIndex.get(Msr.IA32_PAT), PAT_DEFAULT);
  t.equal(PAT_DEFAULT, 0x0007040600070406n);
  t.equal(byIndex.get(0x2ff), 0x806n, 'MTRRs on, write-back by default');
  t.equal(byIndex.get(Msr.IA32_LSTAR), 0n);
});

t.test('KVM accepts the boot MSRs after the CPUID and reads them back', { skip: noKvm }, async (t) => {
  const kvm = Kvm.open();
  const vm = kvm.createVm();
  const vcpu = vm.createVcpu(0);
  t.teardown(() => {
    vcpu.close();
    vm.close();
    kvm.close();
  });
  vcpu.setCpuid2(guestCpuid(kvm.getSupportedCpuid(), 0, 1));
  const msrs = bootMsrs();
  vcpu.setMsrs(msrs);
  t.same(vcpu.getMsrs(msrs.map((m) => m.index)), msrs);
});
