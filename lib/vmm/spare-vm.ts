// A VM with its guest RAM's slot, the in-kernel interrupt controllers, the GSI routing and the PIT,
// made ahead of the restore that takes it (VcpuWorkerPool's spare VM): those ioctls cost a
// restore from nothing about 1 ms, and on a busy host each may wait much longer for a grace
// period or the CPU. The slot is made over placeholder RAM (an anonymous memfd, never touched),
// and the restore maps its snapshot's RAM image over the same addresses
// (GuestMemory.mapFileOver()): no slot is added to a VM that already has its irqchip, which
// would wait for an RCU grace period. Its vCPUs are made too (KVM_CREATE_VCPU, the kvm_run
// mapping, the CPUID a booted machine of the shape gets) and handed over (vcpu.handOver()): the
// restore puts the saved state on them from the main thread and its vCPU threads adopt them,
// rather than each thread creating its own in the restore.
import { guestCpuid } from '../boot/index.js';
import { Platform } from '../boot/platform.js';
import { IrqChip } from '../kvm/constants.js';
import { GuestMemory, Kvm, closeReleasedVcpu, encodeCpuid, type CpuidEntry, type GsiRoute, type ReleasedVcpu, type Vm } from '../kvm/index.js';

// Three pages KVM may use for the real-mode TSS, and one for the EPT identity map (Intel), just
// below the BIOS area at the top of the 32-bit space, away from guest RAM.
const TSS_ADDR = 0xfffbd000;
const IDENTITY_MAP_ADDR = 0xfffbc000;
/** The one memory slot: all of guest RAM at guest-physical 0. */
export const RAM_SLOT = 0;

/**
 * GSIs as a PC wires them, as QEMU routes them: ISA IRQs 0-15 to the PICs (IRQ 2 is the cascade)
 * and GSI n to IOAPIC pin n, except the PIT's IRQ 0, which reaches the IOAPIC on pin 2 (the MADT
 * says so with an interrupt source override). KVM's default routing would put it on pin 0.
 */
export const PC_GSI_ROUTES: readonly GsiRoute[] = [
  ...Array.from({ length: 16 }, (_, irq) => irq).filter((irq) => irq !== 2).map((irq): GsiRoute => ({
    gsi: irq, type: 'irqchip', irqchip: irq < 8 ? IrqChip.PicMaster : IrqChip.PicSlave, pin: irq % 8,
  })),
  ...Array.from({ length: Platform.ioApicPins }, (_, gsi) => gsi).filter((gsi) => gsi !== Platform.pitGsi).map((gsi): GsiRoute => ({
    gsi, type: 'irqchip', irqchip: IrqChip.Ioapic, pin: gsi === 0 ? Platform.pitGsi : gsi,
  })),
];

/** A new VM's fixed addresses (TSS, identity map). */
export function setVmAddresses(vm: Vm): void {
  vm.setTssAddr(TSS_ADDR);
  vm.setIdentityMapAddr(IDENTITY_MAP_ADDR);
}

/**
 * Guest RAM's slot, then (with `irqchip`) the interrupt controllers, the PC's GSI routing and the
 * PIT. The slot goes first: a slot added to a VM that has them waits for an RCU grace period
 * (about 6 ms on this host); added before, it does not, and KVM takes the controllers after the
 * slots as well as before.
 */
export function addRamAndIrqchip(vm: Vm, memory: GuestMemory, irqchip: boolean): void {
  vm.setUserMemoryRegion({ slot: RAM_SLOT, guestPhysAddr: 0, memory });
  if (irqchip) {
    vm.createIrqChip();
    vm.setGsiRouting(PC_GSI_ROUTES);
    vm.createPit2({ speakerDummy: true });
  }
}

/** What a spare VM is made for: a machine of this RAM size and vCPU count, with or without the in-kernel irqchip. */
export interface SpareVmShape {
  memoryBytes: number;
  irqchip: boolean;
  vcpus: number;
}

/** A spare VM's vCPU: made and let go of by the thread that made the spare, and the CPUID it was given (a kvm_cpuid2). */
export interface SpareVcpu {
  released: ReleasedVcpu;
  cpuid: Uint8Array;
}

// What the host's KVM offers does not change while the process runs: asked once.
let supportedCpuidCache: CpuidEntry[] | null = null;

/** A VM made ahead: its parts become a restored machine's (which closes them), or close() gives them back. */
export class SpareVm {
  readonly shape: SpareVmShape;
  readonly kvm: Kvm;
  readonly vm: Vm;
  /** Placeholder RAM under the slot ('anonymous', untouched): the restore maps its RAM over it. */
  readonly memory: GuestMemory;
  /** One per vCPU, by id, not adopted by any thread yet; close() closes those still not. */
  readonly vcpus: readonly SpareVcpu[];

  private constructor(shape: SpareVmShape, kvm: Kvm, vm: Vm, memory: GuestMemory, vcpus: SpareVcpu[]) {
    this.shape = shape;
    this.kvm = kvm;
    this.vm = vm;
    this.memory = memory;
    this.vcpus = vcpus;
  }

  /** Makes one; on failure, closes what it had made and throws. */
  static create(shape: SpareVmShape): SpareVm {
    const made: { close(): void }[] = [];
    try {
      const kvm = Kvm.open();
      made.unshift(kvm);
      const vm = kvm.createVm();
      made.unshift(vm);
      setVmAddresses(vm);
      const memory = GuestMemory.create(shape.memoryBytes);
      made.unshift(memory);
      addRamAndIrqchip(vm, memory, shape.irqchip);
      // After the irqchip, which KVM wants before any vCPU (each gets its LAPIC).
      supportedCpuidCache ??= kvm.getSupportedCpuid();
      const vcpus: SpareVcpu[] = [];
      for (let id = 0; id < shape.vcpus; id++) {
        const vcpu = vm.createVcpu(id);
        try {
          const cpuid = encodeCpuid(guestCpuid(supportedCpuidCache, id, shape.vcpus));
          vcpu.setCpuid2(cpuid);
          const released = vcpu.handOver();
          made.unshift({ close: () => closeReleasedVcpu(released) });
          vcpus.push({ released, cpuid });
        } finally {
          vcpu.close(); // (nothing once handed over)
        }
      }
      return new SpareVm({ memoryBytes: shape.memoryBytes, irqchip: shape.irqchip, vcpus: shape.vcpus }, kvm, vm, memory, vcpus);
    } catch (error) {
      for (const part of made) part.close();
      throw error;
    }
  }

  fits(shape: SpareVmShape): boolean {
    return shape.memoryBytes === this.shape.memoryBytes && shape.irqchip === this.shape.irqchip && shape.vcpus === this.shape.vcpus;
  }

  close(): void {
    this.#closeParts();
    this.vm.close();
    this.kvm.close();
  }

  /** close(), with KVM's teardown of the VM (15-20 ms) on libuv's pool rather than this thread. */
  async closeAsync(): Promise<void> {
    this.#closeParts();
    await this.vm.closeAsync();
    this.kvm.close();
  }

  #closeParts(): void {
    // Those a restore's threads adopted are theirs to close.
    for (const vcpu of this.vcpus) closeReleasedVcpu(vcpu.released);
    this.memory.close();
  }
}
