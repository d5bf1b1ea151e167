// vCPU state ioctls: each get/set pair round-trips changed values on a fresh vCPU; single-step,
// injected interrupts and NMIs; errors for bad MSRs, duplicate ids and closed handles.
import { existsSync } from 'node:fs';
import t, { type Test } from 'tap';
import {
  Cap, ExitReason, KvmError, MpState, Msr, VcpuEventValid, encodeCpuid, encodeMsrs, type Regs,
} from '../../lib/index.js';
import { guestImage, LOAD_ADDR, noKvm, realModeMachine, runToHalt, type RealModeMachine, throwsKvm } from '../helpers/kvm.js';

/** A real-mode machine running `guest` (hello by default), with CPUID set as a VMM would. */
function machine(t: Test, options: { irqchip?: boolean; guest?: string } = {}): RealModeMachine {
  const m = realModeMachine(guestImage(options.guest ?? 'hello'), { setup: options.irqchip ? (vm) => vm.createIrqChip() : undefined });
  t.teardown(() => m.close());
  // MSRs such as SYSENTER_CS and XCR0 values are only accepted once the vCPU has its CPUID.
  m.vcpu.setCpuid2(m.kvm.getSupportedCpuid());
  return m;
}



const u32At = (bytes: Uint8Array, offset: number) => new DataView(bytes.buffer, bytes.byteOffset).getUint32(offset, true);
const setU32At = (bytes: Uint8Array, offset: number, value: number) =>
  new DataView(bytes.buffer, bytes.byteOffset).setUint32(offset, value, true);

t.test('getRegs returns what setRegs wrote, in every register', { skip: noKvm }, async (t) => {
  const { vcpu } = machine(t);
  const names = ['rax', 'rbx', 'rcx', 'rdx', 'rsi', 'rdi', 'rsp', 'rbp', 'r8', 'r9', 'r10', 'r11', 'r12', 'r13', 'r14', 'r15'] as const;
  const regs = {} as Regs;
  names.forEach((name, i) => {
    regs[name] = 0x0101010101010101n * BigInt(i + 1) + 0x8000000000000000n * BigInt(i % 2);
  });
  regs.rip = 0x7c23n;
  // Bit 1 is reserved-1; CF, PF, AF, ZF, SF, OF are plain status bits (no TF, no IF).
  regs.rflags = 0x2n | 0x1n | 0x4n | 0x10n | 0x40n | 0x80n | 0x800n;
  vcpu.setRegs(regs);
  t.same(vcpu.getRegs(), regs);
  t.throws(() => vcpu.setRegs({ ...regs, rax: -1n }), RangeError);
});

t.test('getSregs returns changed segments, control registers and tables', { skip: noKvm }, async (t) => {
  const { vcpu } = machine(t);
  const sregs = vcpu.getSregs();
  // Real mode: each base is its selector times 16.
  const selectors = { cs: 0x1000, ds: 0x2000, es: 0x3000, fs: 0x4000, gs: 0x5000, ss: 0x6000 } as const;
  for (const [name, selector] of Object.entries(selectors)) {
    const segment = sregs[name as keyof typeof selectors];
    segment.selector = selector;
    segment.base = BigInt(selector) << 4n;
  }
  sregs.cr0 = 0x10n; // ET only: caches on (CD, NW clear), still real mode
  sregs.cr2 = 0xdead0000n;
  sregs.cr3 = 0x5000n;
  sregs.efer = 0x1n; // SCE, which the supported CPUID offers (leaf 0x80000001 EDX bit 11)
  sregs.gdt = { base: 0x1000n, limit: 0x27 };
  sregs.idt = { base: 0n, limit: 0x3ff };
  vcpu.setSregs(sregs);
  t.same(vcpu.getSregs(), sregs);
});

t.test('getFpu returns the control word, x87 and XMM registers setFpu wrote', { skip: noKvm }, async (t) => {
  const { vcpu } = machine(t);
  const fpu = vcpu.getFpu();
  fpu.fcw = 0x27f; // 53-bit precision instead of the reset 64
  fpu.fpr = Uint8Array.from({ length: 128 }, (_, i) => 255 - i);
  fpu.xmm = Uint8Array.from({ length: 256 }, (_, i) => i);
  fpu.mxcsr = 0x1f80;
  vcpu.setFpu(fpu);
  const back = vcpu.getFpu();
  t.equal(back.fcw, 0x27f);
  t.same(back.xmm, fpu.xmm);
  // Each fpr slot is 16 bytes of which the x87 register uses 10.
  for (let i = 0; i < 8; i++) t.same(back.fpr.subarray(i * 16, i * 16 + 10), fpu.fpr.subarray(i * 16, i * 16 + 10), `st${i}`);
});

t.test('the SYSENTER MSRs round-trip', { skip: noKvm }, async (t) => {
  const { vcpu } = machine(t);
  const sysenter = [
    { index: Msr.IA32_SYSENTER_CS, data: 0x8n },
    { index: Msr.IA32_SYSENTER_ESP, data: 0xffff800000001000n },
    { index: Msr.IA32_SYSENTER_EIP, data: 0xffffffff81000000n },
  ];
  vcpu.setMsrs(sysenter);
  t.same(vcpu.getMsrs(sysenter.map((msr) => msr.index)), sysenter);

});

// kvm_pvm runs guest RDTSC on the host TSC without an offset, so a written TSC value never takes
// effect there; everywhere else it must.
const tscOffsetTodo = existsSync('/sys/module/kvm_pvm') ? 'kvm_pvm does not offset the guest TSC' : false;

t.test('the TSC counts on from the value written', { skip: noKvm, todo: tscOffsetTodo }, async (t) => {
  const { vcpu } = machine(t);
  const tscSet = 1n << 40n;
  vcpu.setMsrs([{ index: Msr.IA32_TSC, data: tscSet }]);
  const [tsc] = vcpu.getMsrs([Msr.IA32_TSC]);
  t.equal(tsc!.index, Msr.IA32_TSC);
  t.ok(tsc!.data >= tscSet, `TSC ${tsc!.data} >= ${tscSet}`);
  t.ok(tsc!.data < tscSet + 10n ** 12n, `TSC ${tsc!.data} has not run away from the value set`);
});

t.test('an MSR KVM does not know fails with its index in hex', { skip: noKvm }, async (t) => {
  const { vcpu } = machine(t);
  throwsKvm(t, () => vcpu.setMsrs([{ index: Msr.IA32_SYSENTER_CS, data: 0x10n }, { index: 0x12345, data: 1n }]), {
    code: 'EINVAL', syscall: 'ioctl(KVM_SET_MSRS)', message: /0x12345/,
  });
  // KVM_SET_MSRS stops at the first failure: the entry before it was written.
  t.same(vcpu.getMsrs([Msr.IA32_SYSENTER_CS]), [{ index: Msr.IA32_SYSENTER_CS, data: 0x10n }]);
  throwsKvm(t, () => vcpu.getMsrs([Msr.IA32_SYSENTER_EIP, 0x12345]), { code: 'EINVAL', syscall: 'ioctl(KVM_GET_MSRS)', message: /0x12345/ });
});

t.test('setMsrs and setCpuid2 take the encoded lists as well as entries', { skip: noKvm }, async (t) => {
  const { vcpu, kvm } = machine(t);
  const sysenter = [{ index: Msr.IA32_SYSENTER_CS, data: 0x18n }, { index: Msr.IA32_SYSENTER_EIP, data: 0xffffffff81001000n }];
  vcpu.setMsrs(encodeMsrs(sysenter));
  t.same(vcpu.getMsrs(sysenter.map((msr) => msr.index)), sysenter);
  // The refused MSR is named from the encoded list too.
  throwsKvm(t, () => vcpu.setMsrs(encodeMsrs([{ index: Msr.IA32_SYSENTER_CS, data: 0x20n }, { index: 0x12345, data: 7n }])), {
    code: 'EINVAL', syscall: 'ioctl(KVM_SET_MSRS)', message: /MSR 0x12345 cannot be set to 0x7/,
  });
  t.same(vcpu.getMsrs([Msr.IA32_SYSENTER_CS]), [{ index: Msr.IA32_SYSENTER_CS, data: 0x20n }]);

  const leaf0 = kvm.getSupportedCpuid().filter((entry) => entry.function === 0).map((entry) => ({ ...entry, ebx: 0x6b76656e }));
  vcpu.setCpuid2(encodeCpuid(leaf0));
  t.same(vcpu.getCpuid2().find((entry) => entry.function === 0)?.ebx, 0x6b76656e, 'leaf 0 as encoded');

  // A list whose count claims more entries than its bytes hold never reaches the kernel.
  const short = encodeCpuid(leaf0).subarray(0, 8);
  t.throws(() => vcpu.setCpuid2(short), { name: 'RangeError', message: /fewer entries than its count/ });
  t.throws(() => vcpu.setMsrs(new Uint8Array(3)), RangeError);
});

t.test('getCpuid2 returns the leaves setCpuid2 set', { skip: noKvm }, async (t) => {
  const { vcpu, kvm } = machine(t);
  const supported = kvm.getSupportedCpuid();
  const key = (entry: { function: number; index: number }) => `${entry.function.toString(16)}.${entry.index}`;
  const back = vcpu.getCpuid2();
  const set = new Set(supported.map(key));
  t.same(back.map(key).filter((k) => !set.has(k)), [], 'no leaf that was not set');
  // KVM rewrites runtime bits (APIC id, OSXSAVE, XSAVE sizes) and may drop leaves whose registers
  // are all zero, which read the same as absent ones.
  const returned = new Set(back.map(key));
  const nonZero = supported.filter((entry) => entry.eax || entry.ebx || entry.ecx || entry.edx);
  t.same(nonZero.map(key).filter((k) => !returned.has(k)), [], 'every non-zero leaf comes back');
  const leaf0 = back.find((entry) => entry.function === 0);
  t.same(leaf0, supported.find((entry) => entry.function === 0), 'leaf 0 (max leaf, vendor) is unchanged');
});

t.test('getLapic returns the TPR setLapic wrote', { skip: noKvm }, async (t) => {
  const { vcpu } = machine(t, { irqchip: true });
  const lapic = vcpu.getLapic();
  t.equal(lapic.regs.length, 1024);
  const TPR = 0x80;
  setU32At(lapic.regs, TPR, 0x20);
  vcpu.setLapic(lapic);
  t.equal(u32At(vcpu.getLapic().regs, TPR), 0x20);
});

t.test('getXsave returns an XMM byte and MXCSR that setXsave wrote', { skip: noKvm }, async (t) => {
  const { vcpu, vm } = machine(t);
  const xsave = vcpu.getXsave();
  t.equal(xsave.length, Math.max(4096, vm.checkExtension(Cap.Xsave2)));
  // Legacy area (SDM vol. 1, 13.4.1): MXCSR at 24, XMM0 at 160; XSTATE_BV at 512, bit 1 = SSE.
  const MXCSR = 24;
  const XMM0 = 160;
  const XSTATE_BV = 512;
  xsave[XMM0 + 3] = 0xa5;
  setU32At(xsave, MXCSR, 0x3f80); // round down, all exceptions masked
  xsave[XSTATE_BV] = xsave[XSTATE_BV]! | 0x2;
  vcpu.setXsave(xsave);
  const back = vcpu.getXsave();
  t.equal(back[XMM0 + 3], 0xa5);
  t.equal(u32At(back, MXCSR), 0x3f80);
  t.equal(vcpu.getFpu().xmm[3], 0xa5, 'the FPU view sees the same XMM0');
  t.throws(() => vcpu.setXsave([] as unknown as Uint8Array), TypeError);
  t.throws(() => vcpu.setXsave(new Uint8Array(16)), RangeError);
});

t.test('getXcrs returns the XCR0 setXcrs wrote', { skip: noKvm }, async (t) => {
  const { vcpu } = machine(t);
  const before = vcpu.getXcrs();
  t.same(before.find((xcr) => xcr.xcr === 0)?.value, 1n, 'XCR0 resets to x87 only');
  vcpu.setXcrs([{ xcr: 0, value: 0x3n }]); // x87 | SSE
  t.same(vcpu.getXcrs().find((xcr) => xcr.xcr === 0), { xcr: 0, value: 0x3n });
  t.throws(() => vcpu.setXcrs(new Array(17).fill({ xcr: 0, value: 1n })), RangeError);
});

t.test('getVcpuEvents returns the NMI and interrupt-shadow state set', { skip: noKvm }, async (t) => {
  const { vcpu } = machine(t, { irqchip: true });
  const events = vcpu.getVcpuEvents();
  t.same(events.nmi, { injected: 0, pending: 0, masked: 0 });
  events.nmi.pending = 1;
  events.nmi.masked = 1;
  events.interrupt.shadow = 1; // KVM_X86_SHADOW_INT_MOV_SS
  events.flags = VcpuEventValid.NmiPending | VcpuEventValid.Shadow;
  vcpu.setVcpuEvents(events);
  const back = vcpu.getVcpuEvents();
  t.same(back.nmi, { injected: 0, pending: 1, masked: 1 });
  t.equal(back.interrupt.shadow, 1);
  t.equal(back.flags & VcpuEventValid.NmiPending, VcpuEventValid.NmiPending);
});

t.test('getMpState returns Halted and Runnable as set', { skip: noKvm }, async (t) => {
  const { vcpu } = machine(t, { irqchip: true });
  t.equal(vcpu.getMpState(), MpState.Runnable, 'the BSP starts runnable');
  vcpu.setMpState(MpState.Halted);
  t.equal(vcpu.getMpState(), MpState.Halted);
  vcpu.setMpState(MpState.Runnable);
  t.equal(vcpu.getMpState(), MpState.Runnable);
});

t.test('getDebugRegs returns the DR0-DR3 and DR7 set', { skip: noKvm }, async (t) => {
  const { vcpu } = machine(t);
  const regs = vcpu.getDebugRegs();
  regs.db = [0x1000n, 0x2000n, 0x3000n, 0xffff_ffff_8000_0000n];
  regs.dr7 = 0x401n; // L0 plus the reserved-1 bit 10
  vcpu.setDebugRegs(regs);
  const back = vcpu.getDebugRegs();
  t.same(back.db, regs.db);
  t.equal(back.dr7, 0x401n);
});

t.test('TSC frequency: read, and set as far as the host can scale it', { skip: noKvm }, async (t) => {
  const { vcpu, vm } = machine(t);
  const khz = vcpu.getTscKhz();
  t.ok(khz > 0, `TSC ${khz} kHz`);
  vcpu.setTscKhz(khz);
  t.equal(vcpu.getTscKhz(), khz, 'setting the current rate keeps it');
  const half = Math.floor(khz / 2);
  if (vm.checkExtension(Cap.TscControl) > 0) {
    vcpu.setTscKhz(half);
    t.equal(vcpu.getTscKhz(), half, 'with TSC scaling, a new rate reads back');
  } else {
    // Without scaling KVM can only emulate a faster TSC (by catch-up), never a slower one.
    throwsKvm(t, () => vcpu.setTscKhz(half), { code: 'EINVAL', syscall: 'ioctl(KVM_SET_TSC_KHZ)' });
  }
  t.throws(() => vcpu.setTscKhz(0), RangeError);
});

t.test('nested state round-trips where supported, else fails with EINVAL', { skip: noKvm }, async (t) => {
  const { vcpu, vm } = machine(t);
  if (vm.checkExtension(Cap.NestedState) > 0) {
    const state = vcpu.getNestedState();
    t.ok(state.length >= 128, 'at least the kvm_nested_state header');
    vcpu.setNestedState(state);
    t.same(vcpu.getNestedState(), state);
  } else {
    throwsKvm(t, () => vcpu.getNestedState(), { code: 'EINVAL', syscall: 'ioctl(KVM_GET_NESTED_STATE)' });
  }
});

t.test('translate maps real-mode addresses to themselves', { skip: noKvm }, async (t) => {
  const { vcpu } = machine(t);
  t.same(vcpu.translate(0x7c00), { physicalAddress: 0x7c00n, valid: true, writeable: true, usermode: false });
  t.same(vcpu.translate(0x12345n).physicalAddress, 0x12345n);
  t.throws(() => vcpu.translate(-1), RangeError);
});

t.test('single-stepping stops after each instruction, then the guest runs on', { skip: noKvm }, async (t) => {
  const { vcpu } = machine(t);
  vcpu.setGuestDebug({ singlestep: true });
  // hello.S: mov $0x3f8,%dx (3 bytes); mov $msg,%si (3); cs lodsb (2); test %al,%al (2); je (2).
  for (const next of [0x7c03n, 0x7c06n, 0x7c08n, 0x7c0an, 0x7c0cn]) {
    t.equal(vcpu.run(), ExitReason.Debug);
    const exit = vcpu.exit();
    if (exit.reason !== 'debug') throw new Error(`expected a debug exit, got ${exit.reason}`);
    t.equal(exit.exception, 1, '#DB');
    t.equal(exit.pc, next);
    t.equal(vcpu.getRegs().rip, next);
  }
  vcpu.setGuestDebug(null);
  t.equal(runToHalt(vcpu), 'Hello from node-kvm!\n');
});

t.test('interrupt() queues an external interrupt that the next entry delivers', { skip: noKvm }, async (t) => {
  const { vcpu, memory } = machine(t);
  // The guest runs with IF=0, yet KVM_INTERRUPT injects unconditionally (api.rst: userspace
  // must wait for ready_for_interrupt_injection). Vector 32's real-mode IVT entry points at a HLT.
  const HANDLER = 0x600;
  const ram = new DataView(memory.buffer);
  memory.write(HANDLER, Uint8Array.of(0xf4));
  ram.setUint16(32 * 4, HANDLER, true);
  ram.setUint16(32 * 4 + 2, 0, true);
  vcpu.setRegs({ ...vcpu.getRegs(), rsp: 0x7000n });
  vcpu.interrupt(32);
  const queued = vcpu.getVcpuEvents().interrupt;
  t.equal(queued.injected, 1);
  t.equal(queued.nr, 32);
  t.same(vcpu.getSregs().interruptBitmap, [1n << 32n, 0n, 0n, 0n], 'the sregs bitmap shows vector 32 pending');
  t.equal(vcpu.run(), ExitReason.Hlt);
  t.equal(vcpu.getRegs().rip, BigInt(HANDLER + 1), 'halted in the handler');
  t.equal(vcpu.getVcpuEvents().interrupt.injected, 0, 'delivered');
  // The real-mode interrupt frame: IP, CS, FLAGS.
  t.same([ram.getUint16(0x7000 - 6, true), ram.getUint16(0x7000 - 4, true), ram.getUint16(0x7000 - 2, true)], [LOAD_ADDR, 0, 0x2]);
  t.throws(() => vcpu.interrupt(256), RangeError);
});

t.test('interrupt() is refused with the in-kernel irqchip', { skip: noKvm }, async (t) => {
  const { vcpu } = machine(t, { irqchip: true });
  throwsKvm(t, () => vcpu.interrupt(32), { code: 'ENXIO', syscall: 'ioctl(KVM_INTERRUPT)' });
});

t.test('nmi() leaves an NMI pending or injected', { skip: noKvm }, async (t) => {
  const { vcpu } = machine(t, { irqchip: true });
  vcpu.nmi();
  const { nmi } = vcpu.getVcpuEvents();
  t.equal(nmi.pending + nmi.injected, 1);
});

t.test('kvmclockCtrl fails with EINVAL while the guest has no kvmclock', { skip: noKvm }, async (t) => {
  const { vcpu } = machine(t);
  throwsKvm(t, () => vcpu.kvmclockCtrl(), { code: 'EINVAL', syscall: 'ioctl(KVM_KVMCLOCK_CTRL)' });
});

t.test('vcpu.checkExtension answers like its VM', { skip: noKvm }, async (t) => {
  const { vcpu, vm } = machine(t);
  t.ok(vcpu.checkExtension(Cap.Irqchip) > 0);
  t.equal(vcpu.checkExtension(Cap.Xsave2), vm.checkExtension(Cap.Xsave2));
  t.equal(vcpu.checkExtension(Cap.NestedState), vm.checkExtension(Cap.NestedState));
});

t.test('a second vCPU with the same id fails with EEXIST', { skip: noKvm }, async (t) => {
  const { vm, vcpu } = machine(t);
  t.ok(Number.isInteger(vcpu.fd) && vcpu.fd > 2, `fd ${vcpu.fd}`);
  t.equal(vcpu.id, 0);
  throwsKvm(t, () => vm.createVcpu(0), { code: 'EEXIST', syscall: 'ioctl(KVM_CREATE_VCPU)' });
  const second = vm.createVcpu(1);
  t.teardown(() => second.close());
  t.not(second.fd, vcpu.fd);
});

t.test('a closed vCPU throws EBADF', { skip: noKvm }, async (t) => {
  const { vm } = machine(t);
  const vcpu = vm.createVcpu(1);
  vcpu.close();
  vcpu.close();
  t.equal(vcpu.closed, true);
  throwsKvm(t, () => vcpu.run(), { code: 'EBADF' });
  throwsKvm(t, () => vcpu.getRegs(), { code: 'EBADF' });
  throwsKvm(t, () => vcpu.setMsrs([{ index: Msr.IA32_TSC, data: 0n }]), { code: 'EBADF' });
  throwsKvm(t, () => vcpu.exit(), { code: 'EBADF' });
});
