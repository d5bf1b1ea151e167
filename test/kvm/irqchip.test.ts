// The in-kernel interrupt controllers (two i8259 PICs, the IOAPIC, local APICs) and PIT, GSI
// routing, MSIs, the VM clock, and the VMX helper pages (TSS, identity map).
import t, { type Test } from 'tap';
import { IrqChip, Kvm, KvmError, type Vcpu, type Vm } from '../../lib/index.js';
import { noKvm, throwsKvm } from '../helpers/kvm.js';

function openVm(t: Test, options: { irqchip?: boolean } = {}): Vm {
  const kvm = Kvm.open();
  const vm = kvm.createVm();
  t.teardown(() => {
    vm.close();
    kvm.close();
  });
  if (options.irqchip) vm.createIrqChip();
  return vm;
}

function vcpuOf(t: Test, vm: Vm): Vcpu {
  const vcpu = vm.createVcpu(0);
  t.teardown(() => vcpu.close());
  return vcpu;
}


// struct kvm_pic_state (asm/kvm.h): one byte per field, in this order.
const PIC = { lastIrr: 0, irr: 1, imr: 2, isr: 3, priorityAdd: 4, irqBase: 5 } as const;
// struct kvm_ioapic_state: base_address u64 @0, ioregsel u32 @8, id u32 @12, irr u32 @16,
// pad u32 @20, redirtbl[24] u64 @24.
const IOAPIC = { baseAddress: 0, irr: 16, redirtbl: 24 } as const;
const REDIR_MASKED = 1n << 16n;
// Local APIC register page (SDM vol. 3, table 11-1).
const LAPIC = { svr: 0xf0, irr: 0x200 } as const;
const SVR_APIC_ENABLED = 0x100;

const view = (bytes: Uint8Array) => new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
const redirEntry = (chip: Uint8Array, pin: number) => view(chip).getBigUint64(IOAPIC.redirtbl + pin * 8, true);

/** Whether `vector` is set in the local APIC's IRR (eight 32-bit registers, 16 bytes apart). */
function lapicIrrHas(vcpu: Vcpu, vector: number): boolean {
  const regs = vcpu.getLapic().regs;
  return ((view(regs).getUint32(LAPIC.irr + (vector >> 5) * 0x10, true) >>> (vector & 31)) & 1) === 1;
}

/** Software-enables the local APIC (SVR bit 8): a disabled one drops fixed interrupts. */
function enableLapic(vcpu: Vcpu): void {
  const lapic = vcpu.getLapic();
  view(lapic.regs).setUint32(LAPIC.svr, view(lapic.regs).getUint32(LAPIC.svr, true) | SVR_APIC_ENABLED, true);
  vcpu.setLapic(lapic);
}

t.test('a second createIrqChip fails with EEXIST', { skip: noKvm }, async (t) => {
  const vm = openVm(t, { irqchip: true });
  throwsKvm(t, () => vm.createIrqChip(), { code: 'EEXIST', syscall: 'ioctl(KVM_CREATE_IRQCHIP)' });
});

t.test('without an irqchip its ioctls fail with ENXIO', { skip: noKvm }, async (t) => {
  const vm = openVm(t);
  throwsKvm(t, () => vm.getIrqChip(IrqChip.PicMaster), { code: 'ENXIO', syscall: 'ioctl(KVM_GET_IRQCHIP)' });
  throwsKvm(t, () => vm.setIrqLine(3, true), { code: 'ENXIO', syscall: 'ioctl(KVM_IRQ_LINE)' });
  throwsKvm(t, () => vm.getPit2(), { code: 'ENXIO', syscall: 'ioctl(KVM_GET_PIT2)' });
});

t.test('the PIT: created once, its channel state round-trips', { skip: noKvm }, async (t) => {
  const vm = openVm(t, { irqchip: true });
  vm.createPit2();
  throwsKvm(t, () => vm.createPit2(), { code: 'EEXIST', syscall: 'ioctl(KVM_CREATE_PIT2)' });
  const pit = vm.getPit2();
  t.equal(pit.channels.length, 3);
  t.equal(pit.channels[0]!.count, 0x10000, 'a reset channel counts from 65536');
  pit.channels[0]!.count = 0x1234;
  pit.channels[0]!.mode = 2; // rate generator
  pit.channels[0]!.rwMode = 3; // low byte then high byte
  vm.setPit2(pit);
  const back = vm.getPit2().channels[0]!;
  t.equal(back.count, 0x1234);
  t.equal(back.mode, 2);
  t.equal(back.rwMode, 3);
});

t.test('each irqchip reads back with its id, and a changed state round-trips', { skip: noKvm }, async (t) => {
  const vm = openVm(t, { irqchip: true });
  for (const chip of [IrqChip.PicMaster, IrqChip.PicSlave, IrqChip.Ioapic]) {
    const state = vm.getIrqChip(chip);
    t.equal(state.chipId, chip);
    t.equal(state.chip.length, 512);
  }
  const ioapic = vm.getIrqChip(IrqChip.Ioapic);
  t.equal(view(ioapic.chip).getBigUint64(IOAPIC.baseAddress, true), 0xfec00000n, 'the IOAPIC sits at 0xfec00000');
  for (let pin = 0; pin < 24; pin++) t.equal(redirEntry(ioapic.chip, pin), REDIR_MASKED, `pin ${pin} starts masked`);
  // Pin 3: vector 0x23, fixed delivery, physical destination APIC 1, unmasked.
  const entry = 0x23n | (1n << 56n);
  view(ioapic.chip).setBigUint64(IOAPIC.redirtbl + 3 * 8, entry, true);
  vm.setIrqChip(ioapic);
  const ioapicBack = vm.getIrqChip(IrqChip.Ioapic).chip;
  t.equal(redirEntry(ioapicBack, 3), entry);
  t.equal(redirEntry(ioapicBack, 2), REDIR_MASKED, 'the neighbours are untouched');

  const master = vm.getIrqChip(IrqChip.PicMaster);
  master.chip[PIC.imr] = 0xfb; // everything masked except the cascade (IRQ2)
  master.chip[PIC.irqBase] = 0x08;
  vm.setIrqChip(master);
  const masterBack = vm.getIrqChip(IrqChip.PicMaster).chip;
  t.equal(masterBack[PIC.imr], 0xfb);
  t.equal(masterBack[PIC.irqBase], 0x08);
  t.equal(vm.getIrqChip(IrqChip.PicSlave).chip[PIC.imr], 0, 'the slave PIC is a separate chip');

  t.throws(() => vm.getIrqChip(3), RangeError);
  throwsKvm(t, () => vm.setIrqChip({ chipId: 5, chip: new Uint8Array(512) }), { code: 'EINVAL', syscall: 'ioctl(KVM_SET_IRQCHIP)' });
});

t.test('raising GSI 3 latches bit 3 in the master PIC irr', { skip: noKvm }, async (t) => {
  const vm = openVm(t, { irqchip: true });
  const before = vm.getIrqChip(IrqChip.PicMaster).chip;
  t.equal(before[PIC.imr], 0, 'KVM resets the PIC with nothing masked');
  t.equal(before[PIC.irr], 0);
  vm.setIrqLine(3, true);
  const raised = vm.getIrqChip(IrqChip.PicMaster).chip;
  t.equal(raised[PIC.irr], 0x08);
  t.equal(raised[PIC.lastIrr], 0x08, 'the line is high');
  vm.setIrqLine(3, false);
  const lowered = vm.getIrqChip(IrqChip.PicMaster).chip;
  t.equal(lowered[PIC.lastIrr], 0, 'the line is low again');
  t.equal(lowered[PIC.irr], 0x08, 'an edge stays latched until the CPU acknowledges it');
});

t.test('a masked PIC input still latches its edge in irr', { skip: noKvm }, async (t) => {
  const vm = openVm(t, { irqchip: true });
  const master = vm.getIrqChip(IrqChip.PicMaster);
  master.chip[PIC.imr] = 0x08;
  vm.setIrqChip(master);
  vm.setIrqLine(3, true);
  const chip = vm.getIrqChip(IrqChip.PicMaster).chip;
  // i8259: IMR gates the output to the CPU, not the request register.
  t.equal(chip[PIC.irr], 0x08);
  t.equal(chip[PIC.imr], 0x08);
  t.equal(chip[PIC.isr], 0, 'nothing in service');
  // The same GSI reaches IOAPIC pin 3 too; a masked IOAPIC pin records it in the IOAPIC irr.
  t.equal(view(vm.getIrqChip(IrqChip.Ioapic).chip).getUint32(IOAPIC.irr, true), 0x08);
});

t.test('signalMsi delivers to an enabled local APIC', { skip: noKvm }, async (t) => {
  const vm = openVm(t, { irqchip: true });
  const msi = { addressLo: 0xfee00000, data: 0x30 }; // APIC 0, fixed, vector 0x30
  throwsKvm(t, () => vm.signalMsi(msi), { code: 'EPERM', syscall: 'ioctl(KVM_SIGNAL_MSI)' });
  const vcpu = vcpuOf(t, vm);
  t.equal(vm.signalMsi(msi), 0, 'a software-disabled APIC (SVR bit 8 clear) does not accept it');
  t.equal(lapicIrrHas(vcpu, 0x30), false);
  enableLapic(vcpu);
  const delivered = vm.signalMsi(msi);
  t.equal(typeof delivered, 'number');
  t.ok(delivered > 0, `delivered to ${delivered} vCPU`);
  t.equal(lapicIrrHas(vcpu, 0x30), true, 'vector 0x30 is requested in the APIC IRR');
  t.throws(() => vm.signalMsi(null as unknown as { addressLo: number; data: number }), TypeError);
});

t.test('setGsiRouting takes irqchip and MSI routes; an MSI route delivers its vector', { skip: noKvm }, async (t) => {
  const vm = openVm(t, { irqchip: true });
  const vcpu = vcpuOf(t, vm);
  enableLapic(vcpu);
  vm.setGsiRouting([
    { gsi: 0, type: 'irqchip', irqchip: IrqChip.PicMaster, pin: 0 },
    { gsi: 0, type: 'irqchip', irqchip: IrqChip.Ioapic, pin: 2 },
    { gsi: 10, type: 'msi', addressLo: 0xfee00000, data: 0x41 },
  ]);
  t.equal(lapicIrrHas(vcpu, 0x41), false);
  vm.setIrqLine(10, true);
  t.equal(lapicIrrHas(vcpu, 0x41), true, 'GSI 10 now raises vector 0x41');
  t.throws(() => vm.setGsiRouting([{ gsi: 1, type: 'bogus' } as unknown as { gsi: number; type: 'msi'; addressLo: number; data: number }]), {
    name: 'RangeError', message: /entries\[0\]\.type/,
  });
  t.throws(() => vm.setGsiRouting([{ gsi: 1, type: 'irqchip', irqchip: 3, pin: 0 }]), RangeError);
  t.throws(() => vm.setGsiRouting({} as unknown as []), TypeError);
  vm.setGsiRouting([]);
});

t.test('getClock reads on from the value setClock wrote', { skip: noKvm }, async (t) => {
  const vm = openVm(t);
  const first = vm.getClock();
  t.equal(typeof first.clock, 'bigint');
  const clockNs = 1n << 40n;
  vm.setClock({ clock: clockNs, flags: 0, realtime: 0n, hostTsc: 0n });
  const back = vm.getClock();
  t.ok(back.clock >= clockNs, `clock ${back.clock} >= ${clockNs}`);
  t.ok(back.clock < clockNs + 10n ** 10n, 'and within 10 s of it');
});

t.test('setTssAddr and setIdentityMapAddr before the first vCPU', { skip: noKvm }, async (t) => {
  const vm = openVm(t);
  vm.setTssAddr(0xfffbd000);
  vm.setIdentityMapAddr(0xfffbc000);
  t.throws(() => vm.setTssAddr(0xfffff000), RangeError, 'the three TSS pages must end below 4 GiB');
  t.throws(() => vm.setIdentityMapAddr(-1), RangeError);
  vcpuOf(t, vm);
  // api.rst: the identity map must be placed before any vCPU exists.
  throwsKvm(t, () => vm.setIdentityMapAddr(0xfffbc000), { code: 'EINVAL', syscall: 'ioctl(KVM_SET_IDENTITY_MAP_ADDR)' });
});
