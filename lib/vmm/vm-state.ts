// VM-wide state kept by KVM: the in-kernel interrupt controllers, the PIT and the kvmclock base.
import { IrqChip } from '../kvm/constants.js';
import { kvmClockData, kvmIrqchip, kvmPitState2, type ClockData, type IrqchipState, type PitState2 } from '../kvm/structs.js';
import { checkVmStateBlob, vmStateBlobHasIrqchip, vmStateBlobSections } from '../kvm/vm-state-blob.js';
import type { Vm } from '../kvm/vm.js';
import { argValueError } from '../kvm/errors.js';

/** The VM-wide state a snapshot or migration carries: the in-kernel PICs and IOAPIC, the PIT, and the kvmclock. */
export interface VmState {
  /** PIC master, PIC slave, IOAPIC; null without the in-kernel irqchip. */
  irqchips: IrqchipState[] | null;
  pit: PitState2 | null;
  clock: ClockData;
}

/** The same state raw: Vm.saveState()'s buffer of KVM's structs (lib/kvm/vm-state-blob.ts), what a migration sends. */
export type RawVmState = Uint8Array;

/** The VM's state raw, in one native call. */
export function saveRawVmState(vm: Vm, irqchip: boolean): RawVmState {
  return vm.saveState(irqchip);
}

/** A raw VM state as objects (to look into it; a migration never needs to). Throws for a malformed one. */
export function vmStateFromRaw(raw: RawVmState): VmState {
  const problem = checkVmStateBlob(raw);
  if (problem !== null) throw argValueError(`bad VM state: ${problem}`);
  const sections = vmStateBlobSections(raw);
  const irqchip = vmStateBlobHasIrqchip(raw);
  return {
    irqchips: irqchip ? [1, 2, 3].map((tag) => kvmIrqchip.decode(sections.get(tag)!)) : null,
    pit: irqchip ? kvmPitState2.decode(sections.get(4)!) : null,
    clock: kvmClockData.decode(sections.get(5)!),
  };
}

export function saveVmState(vm: Vm, irqchip: boolean): VmState {
  return {
    irqchips: irqchip ? [IrqChip.PicMaster, IrqChip.PicSlave, IrqChip.Ioapic].map((chip) => vm.getIrqChip(chip)) : null,
    pit: irqchip ? vm.getPit2() : null,
    clock: vm.getClock(),
  };
}

/** Before the vCPUs' state, as the LAPICs' state refers to the IOAPIC's routing. */
export function restoreVmState(vm: Vm, state: VmState | RawVmState, irqchip: boolean): void {
  // Raw: checked whole, then applied in the same order, in one native call.
  if (state instanceof Uint8Array) return vm.restoreState(state, irqchip);
  if (irqchip !== (state.irqchips !== null)) {
    throw argValueError(`the saved machine ${state.irqchips ? 'has' : 'has no'} in-kernel irqchip, this one ${irqchip ? 'has' : 'has none'}`);
  }
  if (state.pit) vm.setPit2(state.pit);
  // Only the clock value: KVM_CLOCK_REALTIME would make KVM add the time that passed since the
  // save, which is what a migration wants but a snapshot restored days later does not.
  vm.setClock({ ...state.clock, flags: 0 });
  for (const chip of state.irqchips ?? []) vm.setIrqChip(chip);
}
