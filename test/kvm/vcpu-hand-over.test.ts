// A vCPU made on one thread and handed to another (vcpu.handOver(), adoptVcpu()): what a spare
// VM's vCPUs go through. While released it takes a saved state by its handle (restoreParkedVcpu)
// and a kick (seen by its adopter's first run); the adopter sees that state and the saved CPUID
// and runs the guest; a released vCPU that nobody adopts is closed by its handle, and adopting
// twice, or after a close, is refused.
import { readdirSync, readlinkSync } from 'node:fs';
import t, { type Test } from 'tap';
import { adoptVcpu, closeReleasedVcpu, encodeCpuid, ExitReason, GuestMemory, kickVcpu, Kvm, type CpuidEntry } from '../../lib/index.js';
import { restoreParkedVcpu } from '../../lib/kvm/vcpu.js';
import { vcpuStateFromRaw } from '../../lib/vmm/vcpu-state.js';
import { enterRealMode, guestImage, LOAD_ADDR, noKvm, runToHalt } from '../helpers/kvm.js';

/** How many vCPU fds this process holds. */
function vcpuFds(): number {
  let count = 0;
  for (const fd of readdirSync('/proc/self/fd')) {
    try {
      if (readlinkSync(`/proc/self/fd/${fd}`).startsWith('anon_inode:kvm-vcpu')) count++;
    } catch {
      // closed between the listing and the look
    }
  }
  return count;
}

/** A VM with the hello guest at 0x7c00 (no irqchip: a real-mode guest runs here without one), closed with the test. */
function helloVm(t: Test) {
  const kvm = Kvm.open();
  const vm = kvm.createVm();
  const memory = GuestMemory.create(1 << 20);
  vm.setUserMemoryRegion({ slot: 0, guestPhysAddr: 0, memory });
  memory.write(LOAD_ADDR, guestImage('hello'));
  t.teardown(() => {
    vm.close();
    memory.close();
    kvm.close();
  });
  return { kvm, vm };
}

/** The supported CPUID with the hypervisor leaf's signature changed: a CPUID KVM takes that differs in one known place. */
function markedCpuid(supported: CpuidEntry[]): { cpuid: CpuidEntry[]; leaf: number } {
  const leaf = supported.some((entry) => entry.function === 0x40000000) ? 0x40000000 : 0x80000002;
  return { cpuid: supported.map((entry) => (entry.function === leaf ? { ...entry, ebx: 0x656b616d } : entry)), leaf };
}

t.test('a handed-over vCPU takes a saved state by its handle; the adopter has it and runs the guest', { skip: noKvm }, async (t) => {
  const fdsBefore = vcpuFds();
  const source = helloVm(t);
  const supported = source.kvm.getSupportedCpuid();
  const plain = encodeCpuid(supported);
  const { cpuid: marked, leaf } = markedCpuid(supported);
  // The state to restore: the guest's entry in real mode, a register of its own, and the marked CPUID.
  const original = source.vm.createVcpu(0);
  t.teardown(() => original.close());
  original.setCpuid2(plain);
  enterRealMode(original, LOAD_ADDR);
  original.setRegs({ ...original.getRegs(), rbp: 0x5a5an });
  const saved = original.saveState(Uint32Array.of(0x174), encodeCpuid(marked), { lapic: false, vmmHalted: false });

  const target = helloVm(t);
  const made = target.vm.createVcpu(0);
  made.setCpuid2(plain);
  const released = made.handOver();
  t.equal(made.closed, true, 'the maker\'s object is closed');
  t.equal(released.vcpuId, 0);
  t.equal(vcpuFds(), fdsBefore + 2, 'the vCPU itself stays open');
  t.throws(() => made.getRegs(), { code: 'ERR_KVM_WRONG_THREAD', message: /handed over/ }, 'the maker cannot use it any more');

  t.same(restoreParkedVcpu(released, saved, plain, false), [], 'restored by its handle, no MSR refused');
  // Kicked while no thread has it: nobody is signalled, and its adopter's first run returns at once.
  t.equal(kickVcpu(released), true, 'a released vCPU can be kicked');
  const adopted = adoptVcpu(released);
  t.teardown(() => adopted.close());
  t.equal(adopted.run(), ExitReason.Intr, 'the kick reaches the adopter\'s first run');
  t.same(adopted.getRegs(), vcpuStateFromRaw(saved).regs, 'the adopter sees the restored registers');
  const entry = adopted.getCpuid2().find((e) => e.function === leaf);
  t.equal(entry?.ebx, 0x656b616d, 'the saved CPUID replaced the one the vCPU was made with');
  t.equal(runToHalt(adopted), 'Hello from node-kvm!\n', 'the adopted vCPU runs the guest');
  t.equal(adopted.getRegs().rbp, 0x5a5an);

  t.equal(closeReleasedVcpu(released), false, 'an adopted vCPU is its adopter\'s to close');
  t.throws(() => adoptVcpu(released), { code: 'ERR_KVM_WRONG_THREAD' }, 'nobody adopts it twice');
  adopted.close();
  t.equal(vcpuFds(), fdsBefore + 1, 'closed by its adopter');
});

t.test('a released vCPU nobody adopts is closed by its handle', { skip: noKvm }, async (t) => {
  const fdsBefore = vcpuFds();
  const { vm } = helloVm(t);
  const released = vm.createVcpu(0).handOver();
  t.equal(vcpuFds(), fdsBefore + 1);
  t.equal(closeReleasedVcpu(released), true, 'closed');
  t.equal(vcpuFds(), fdsBefore, 'its fd is gone');
  t.equal(closeReleasedVcpu(released), false, 'closing again does nothing');
  t.throws(() => adoptVcpu(released), { code: 'ERR_KVM_WRONG_THREAD' }, 'a closed one cannot be adopted');
  t.throws(() => adoptVcpu({ vcpuKick: 'x' } as never), { code: 'ERR_INVALID_ARG_TYPE' });
});
