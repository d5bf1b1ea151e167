// A vCPU's whole state in one native call each way (Vcpu.saveState / restoreState,
// saveParkedVcpu / restoreParkedVcpu): what it holds matches the single ioctls, a restore puts back
// exactly what was saved (also from another thread's point of view: the parked variants), and a
// damaged buffer is refused whole before any ioctl.
import t, { type Test } from 'tap';
import { encodeCpuid, type Regs } from '../../lib/index.js';
import { checkVcpuStateBlob, isVcpuStateBlob, vcpuSaveInputs, vcpuStateBlobHeader, VcpuStateTag, vcpuStateBlobSections } from '../../lib/kvm/vcpu-state-blob.js';
import { restoreParkedVcpu, saveParkedVcpu } from '../../lib/kvm/vcpu.js';
import { vcpuStateFromRaw } from '../../lib/vmm/vcpu-state.js';
import { guestImage, noKvm, realModeMachine, type RealModeMachine } from '../helpers/kvm.js';

function machine(t: Test): { m: RealModeMachine; cpuid: Uint8Array; msrs: Uint32Array } {
  const m = realModeMachine(guestImage('hello'), { setup: (vm) => vm.createIrqChip() });
  t.teardown(() => m.close());
  const cpuid = encodeCpuid(m.kvm.getSupportedCpuid());
  m.vcpu.setCpuid2(cpuid);
  // Two MSRs every x86 vCPU reads: IA32_SYSENTER_CS, IA32_TSC.
  return { m, cpuid, msrs: Uint32Array.of(0x174, 0x10) };
}

t.test('saveState holds what the single ioctls read; restoreState puts it back', { skip: noKvm }, async (t) => {
  const { m, cpuid, msrs } = machine(t);
  const { vcpu } = m;
  const regs: Regs = { ...vcpu.getRegs(), rax: 0x1122334455667788n, rbx: 42n, rip: 0x7c10n };
  vcpu.setRegs(regs);
  vcpu.setMsrs([{ index: 0x174, data: 0x10n }]);
  const saved = vcpu.saveState(msrs, cpuid, { lapic: true, vmmHalted: true });
  t.ok(isVcpuStateBlob(saved));
  t.equal(checkVcpuStateBlob(saved), null);
  t.same(vcpuStateBlobHeader(saved).vcpuId, 0);
  const state = vcpuStateFromRaw(saved);
  t.same(state.regs, regs, 'the registers');
  t.same(state.sregs, vcpu.getSregs(), 'the segment registers');
  t.same(state.xsave, vcpu.getXsave(), 'the XSAVE area');
  t.same(state.lapic, vcpu.getLapic(), 'the LAPIC');
  t.same(state.events, vcpu.getVcpuEvents(), 'the events');
  t.equal(state.msrs[0]!.index, 0x174);
  t.equal(state.msrs[0]!.data, 0x10n);
  t.equal(state.vmmHalted, true);
  t.same(Buffer.from(vcpuStateBlobSections(saved).get(VcpuStateTag.Cpuid)!), Buffer.from(cpuid), 'the CPUID it was given, carried along');

  vcpu.setRegs({ ...regs, rax: 0n, rbx: 0n, rip: 0x7c00n });
  vcpu.setMsrs([{ index: 0x174, data: 0n }]);
  t.same(vcpu.restoreState(saved, cpuid, true), [], 'no MSR refused');
  t.same(vcpu.getRegs(), regs, 'registers back');
  t.equal(vcpu.getMsrs([0x174])[0]!.data, 0x10n, 'MSR back');

  // The parked variant, through the kick handle, as a machine's main thread restores a vCPU
  // whose thread waits (here: this thread, which makes no ioctl meanwhile).
  vcpu.setRegs({ ...regs, rax: 7n });
  t.same(restoreParkedVcpu(vcpu.kickHandle, saved, null, true), []);
  t.same(vcpu.getRegs(), regs, 'registers back through restoreParkedVcpu');

  // And saved the same way, with what a state of it says a save needs (its MSRs and CPUID).
  const inputs = vcpuSaveInputs(saved);
  t.same([...inputs!.msrIndices], [0x174, 0x10], 'the MSRs the state read');
  t.same(Buffer.from(inputs!.cpuid), Buffer.from(cpuid), 'the CPUID it carried');
  const parked = saveParkedVcpu(vcpu.kickHandle, inputs!.msrIndices, inputs!.cpuid, { lapic: true, vmmHalted: true });
  t.equal(checkVcpuStateBlob(parked), null);
  const again = vcpuStateFromRaw(parked);
  t.same(again.regs, regs, 'saveParkedVcpu: the registers');
  t.same(again.sregs, vcpu.getSregs(), 'the segment registers');
  t.same(again.lapic, vcpu.getLapic(), 'the LAPIC');
  t.same(again.msrs.map((msr) => msr.index), [0x174, 0x10], 'the same MSRs');
  t.equal(again.msrs[0]!.data, 0x10n);
  t.equal(again.vmmHalted, true);
  // Every section but the MSRs (the TSC runs on) is the one saveState() writes.
  const sections = vcpuStateBlobSections(saved);
  for (const [tag, bytes] of vcpuStateBlobSections(parked)) {
    if (tag !== VcpuStateTag.Msrs) t.same(Buffer.from(bytes), Buffer.from(sections.get(tag)!), `section ${tag} as saveState() wrote it`);
  }
  t.throws(() => saveParkedVcpu({ vcpuKick: 0x7fffffff }, inputs!.msrIndices, inputs!.cpuid, { lapic: true, vmmHalted: false }), { code: 'EBADF' }, 'a handle that names no vCPU');
  t.throws(() => saveParkedVcpu(vcpu.kickHandle, inputs!.msrIndices, new Uint8Array(4), { lapic: true, vmmHalted: false }), /kvm_cpuid2/, 'a CPUID that is no kvm_cpuid2');
});

t.test('the TSC rate a save carries is the one the vCPU has, also after it is set between saves', { skip: noKvm }, async (t) => {
  const { m, cpuid, msrs } = machine(t);
  const { vcpu } = m;
  const save = () => vcpu.saveState(msrs, cpuid, { lapic: true, vmmHalted: false });
  const khz = vcpu.getTscKhz();
  t.equal(vcpuStateBlobHeader(save()).tscKhz, khz, 'the rate KVM gives');
  t.equal(vcpuStateBlobHeader(save()).tscKhz, khz, 'the same at the next save');
  // A faster rate needs no TSC scaling (KVM catches up); the rate remembered between saves is
  // forgotten once it is set.
  vcpu.setTscKhz(khz * 2);
  const atDouble = save();
  t.equal(vcpuStateBlobHeader(atDouble).tscKhz, khz * 2, 'the new rate after setTscKhz()');
  vcpu.setTscKhz(khz);
  t.equal(vcpuStateBlobHeader(save()).tscKhz, khz, 'and the first one again');
  // A restore of a state saved at another rate sets that rate: the next save says so.
  vcpu.restoreState(atDouble, cpuid, true);
  t.equal(vcpu.getTscKhz(), khz * 2, 'the restore set the saved rate');
  t.equal(vcpuStateBlobHeader(save()).tscKhz, khz * 2, 'and the next save carries it');
});

t.test('a damaged state is refused whole, before any ioctl', { skip: noKvm }, async (t) => {
  const { m, cpuid, msrs } = machine(t);
  const { vcpu } = m;
  const saved = vcpu.saveState(msrs, cpuid, { lapic: true, vmmHalted: false });
  const before = vcpu.getRegs();
  const damaged = (change: (bytes: Uint8Array, view: DataView) => void): Uint8Array => {
    const copy = saved.slice();
    change(copy, new DataView(copy.buffer));
    return copy;
  };
  const regsAt = () => {
    // The Regs section's length field: sections follow the 24-byte header in a known order.
    let at = 24;
    const view = new DataView(saved.buffer, saved.byteOffset);
    for (;;) {
      if (view.getUint32(at, true) === VcpuStateTag.Regs) return at;
      at += 8 + ((view.getUint32(at + 4, true) + 7) & ~7);
    }
  };
  const cases: [string, Uint8Array, RegExp][] = [
    ['bad magic', damaged((b) => (b[0] = 0)), /not a vCPU state/],
    ['another version', damaged((_, v) => v.setUint16(4, 9, true)), /version 9/],
    ['truncated', saved.subarray(0, saved.length - 8), /truncated|trailing|no section/],
    ['a struct of another size', damaged((_, v) => v.setUint32(regsAt() + 4, 136, true)), /holds 136 bytes/],
    ['an unknown section', damaged((_, v) => v.setUint32(regsAt(), 99, true)), /unknown section 99/],
  ];
  // Whatever is wrong, the registers stay as they were.
  vcpu.setRegs({ ...before, rax: 5n });
  for (const [name, bytes, message] of cases) {
    t.match(checkVcpuStateBlob(bytes), message, name);
    t.throws(() => vcpu.restoreState(bytes, cpuid, true), { code: 'ERR_INVALID_ARG_VALUE', message }, name);
  }
  t.equal(vcpu.getRegs().rax, 5n, 'nothing applied');
  const other = damaged((_, v) => v.setUint32(8, 3, true));
  t.throws(() => vcpu.restoreState(other, cpuid, true), { message: /state of vCPU 3 given to vCPU 0/ });
});
