// Stream version 4: the VmState section may hold the VM's raw state (KVM's structs, one native
// call each way: lib/kvm/vm-state-blob.ts). Saved whole, checked whole before anything is applied,
// put back as the structured form was; the reader takes it checked and copied and still reads a
// version 3 stream's JSON VM state.
import t, { type Test } from 'tap';
import { IrqChip, Kvm, type Vm } from '../../lib/index.js';
import { checkVmStateBlob, isVmStateBlob, vmStateBlobHasIrqchip } from '../../lib/kvm/vm-state-blob.js';
import { SectionParser } from '../../lib/migration/section-parser.js';
import { StateSectionReader, encodeStateSections } from '../../lib/migration/state-sections.js';
import { vmStateFromRaw } from '../../lib/vmm/vm-state.js';
import { noKvm } from '../helpers/kvm.js';

function openVm(t: Test, irqchip: boolean): Vm {
  const kvm = Kvm.open();
  const vm = kvm.createVm();
  t.teardown(() => {
    vm.close();
    kvm.close();
  });
  if (irqchip) {
    vm.createIrqChip();
    vm.createPit2();
  }
  return vm;
}

const IOAPIC_REDIRTBL = 24;
const view = (bytes: Uint8Array) => new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);

t.test('saved in one call, put back in one: irqchips, PIT and clock', { skip: noKvm }, async (t) => {
  const source = openVm(t, true);
  const ioapic = source.getIrqChip(IrqChip.Ioapic);
  view(ioapic.chip).setBigUint64(IOAPIC_REDIRTBL + 3 * 8, 0x23n | (1n << 56n), true);
  source.setIrqChip(ioapic);
  const master = source.getIrqChip(IrqChip.PicMaster);
  master.chip[2] = 0xfb; // IMR
  source.setIrqChip(master);
  const pit = source.getPit2();
  pit.channels[0]!.count = 0x1234;
  source.setPit2(pit);
  source.setClock({ clock: 5_000_000_000n, flags: 0, realtime: 0n, hostTsc: 0n });

  const raw = source.saveState(true);
  t.ok(isVmStateBlob(raw));
  t.equal(checkVmStateBlob(raw), null);
  t.ok(vmStateBlobHasIrqchip(raw));

  const destination = openVm(t, true);
  destination.restoreState(raw, true);
  t.equal(view(destination.getIrqChip(IrqChip.Ioapic).chip).getBigUint64(IOAPIC_REDIRTBL + 3 * 8, true), 0x23n | (1n << 56n), 'the IOAPIC routing');
  t.equal(destination.getIrqChip(IrqChip.PicMaster).chip[2], 0xfb, 'the PIC mask');
  t.equal(destination.getPit2().channels[0]!.count, 0x1234, 'the PIT counter');
  const clock = destination.getClock().clock;
  t.ok(clock >= 5_000_000_000n && clock < 6_000_000_000n, `the clock's value (${clock})`);

  t.throws(() => openVm(t, false).restoreState(raw, false), { message: /the saved machine has in-kernel irqchip, this one has none/ });
  const noChip = openVm(t, false).saveState(false);
  t.equal(checkVmStateBlob(noChip), null);
  t.notOk(vmStateBlobHasIrqchip(noChip));
  t.ok(noChip.length < raw.length, 'without the irqchip: the clock alone');
});

t.test('a damaged state is refused whole, before any of it is applied', { skip: noKvm }, async (t) => {
  const source = openVm(t, true);
  const pit = source.getPit2();
  pit.channels[0]!.count = 0x4321;
  source.setPit2(pit);
  const raw = source.saveState(true);
  const destination = openVm(t, true);
  const before = destination.getPit2().channels[0]!.count;

  const wrongChip = raw.slice();
  view(wrongChip).setUint32(16 + 8, IrqChip.Ioapic, true); // the first section's chip_id
  t.match(checkVmStateBlob(wrongChip), /irqchip section 1 holds chip 2/);
  const truncated = raw.subarray(0, raw.length - 8);
  t.match(checkVmStateBlob(truncated), /truncated|trailing/);
  const wrongSize = raw.slice();
  view(wrongSize).setUint32(16 + 4, 100, true);
  t.match(checkVmStateBlob(wrongSize), /holds 100 bytes/);
  for (const bad of [wrongChip, truncated, wrongSize]) {
    t.throws(() => destination.restoreState(bad, true), { message: /bad VM state/ });
  }
  // The PIT comes first on restore: still the destination's own, so nothing was applied.
  t.equal(destination.getPit2().channels[0]!.count, before);
});

t.test('the stream reader takes a raw VmState checked and copied, and refuses a damaged one', { skip: noKvm }, async (t) => {
  const raw = openVm(t, true).saveState(true);
  const read = (vm: unknown) => {
    const reader = new StateSectionReader('the stream', 0);
    const parser = new SectionParser({ section: (section) => void reader.take(section) });
    const buffer = Buffer.alloc(64 * 1024);
    for (const chunk of encodeStateSections({ machine: { memoryBytes: 8192, vcpus: 0 }, vm, vcpus: [], devices: {} })) {
      buffer.set(chunk);
      parser.push(buffer.subarray(0, chunk.length));
      buffer.fill(0xee);
    }
    return reader.finish();
  };
  t.same(Buffer.from(read(raw).vm as Uint8Array), Buffer.from(raw), 'intact after its buffer was reused');
  t.same(read({ clock: { clock: 7n, flags: 0 } }).vm, { clock: { clock: 7n, flags: 0 } }, 'a version 3 stream\'s JSON VM state still reads');
  const damaged = raw.slice();
  view(damaged).setUint32(8, 9, true); // the section count
  t.throws(() => read(damaged), { name: 'MigrationError', code: 'EFORMAT', message: /the VmState section is malformed: too many sections/ });
});

t.test('vmStateFromRaw: the raw state as the structured form reads it', { skip: noKvm }, async (t) => {
  const vm = openVm(t, true);
  const state = vmStateFromRaw(vm.saveState(true));
  t.same(state.irqchips!.map((chip) => chip.chipId), [IrqChip.PicMaster, IrqChip.PicSlave, IrqChip.Ioapic]);
  t.same(state.irqchips![2]!.chip, vm.getIrqChip(IrqChip.Ioapic).chip, 'the IOAPIC as KVM_GET_IRQCHIP reads it');
  t.equal(state.pit!.channels[0]!.count, vm.getPit2().channels[0]!.count);
  t.equal(vmStateFromRaw(openVm(t, false).saveState(false)).irqchips, null);
});
