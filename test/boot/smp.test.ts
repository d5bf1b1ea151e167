// The smp guest: the BSP wakes the APs with INIT-SIPI-SIPI through the in-kernel local APIC and
// every CPU prints its APIC id. vCPU 0 runs on this thread; each AP on a worker thread of its own.
import t from 'tap';
import { bootMsrs, guestCpuid, planBoot, applyBootState, writeBootPlan } from '../../lib/boot/index.js';
import { GuestMemory, Kvm, kickVcpu, type Vcpu, type VcpuKickHandle } from '../../lib/index.js';
import { bootGuest, elfGuest, runGuest, SharedConsole } from '../helpers/boot-runner.js';
import { noKvm } from '../helpers/kvm.js';
import { FixtureWorker } from '../helpers/worker.js';

const MiB = 1 << 20;

t.test('alone, the BSP checks in and finds 1 cpu', { skip: noKvm }, async (t) => {
  const guest = bootGuest(elfGuest('smp'), { irqchip: true, vcpus: 1 });
  t.teardown(() => guest.close());
  t.same(runGuest(guest.vcpu), { output: 'cpu 0\nall 1 cpus up\n', end: { reason: 'debug-exit', code: 0x20 } });
});

for (const vcpus of [3]) {
  t.test(`with ${vcpus} vCPUs on ${vcpus} threads, every CPU checks in once, the BSP first`, { skip: noKvm }, async (t) => {
    const memoryBytes = 64 * MiB;
    const plan = planBoot(elfGuest('smp'), { memoryBytes, vcpus });
    const kvm = Kvm.open();
    const vm = kvm.createVm();
    const memory = GuestMemory.create(memoryBytes);
    const supported = kvm.getSupportedCpuid();
    const stop = new Int32Array(new SharedArrayBuffer(4));
    const sharedConsole = new SharedConsole();
    const workers: FixtureWorker[] = [];
    const kicks: VcpuKickHandle[] = [];
    let bsp: Vcpu | undefined;
    t.teardown(async () => {
      Atomics.store(stop, 0, 1);
      for (const kick of kicks) kickVcpu(kick);
      await Promise.all(workers.map((worker) => worker.exited));
      bsp?.close();
      vm.close();
      memory.close();
      kvm.close();
    });
    vm.createIrqChip();
    vm.setUserMemoryRegion({ slot: 0, guestPhysAddr: 0, memory });
    writeBootPlan(plan, memory);

    // Every AP must exist before the BSP sends INIT: an IPI to a vCPU not yet created is lost.
    for (let id = 1; id < vcpus; id++) {
      workers.push(new FixtureWorker('../boot/fixtures/ap-worker', {
        vmFd: vm.fd, vcpuId: id, cpuid: guestCpuid(supported, id, vcpus), msrs: bootMsrs(), console: sharedConsole.buffer, stop: stop.buffer,
      }));
    }
    for (const worker of workers) kicks.push((await worker.next<{ kick: VcpuKickHandle }>()).kick);

    bsp = vm.createVcpu(0);
    bsp.setCpuid2(guestCpuid(supported, 0, vcpus));
    bsp.setMsrs(bootMsrs());
    applyBootState(bsp, plan.bsp);
    const { end } = runGuest(bsp, { console: sharedConsole });

    t.same(end, { reason: 'debug-exit', code: 0x20 });
    const lines = sharedConsole.text.split('\n');
    t.equal(lines.pop(), '', 'the output ends with a newline');
    t.equal(lines[0], 'cpu 0', 'the BSP checks in before it wakes the APs');
    t.same(lines.slice(1, vcpus).sort(), Array.from({ length: vcpus - 1 }, (_, i) => `cpu ${i + 1}`), 'each AP prints its own APIC id once');
    t.equal(lines[vcpus], `all ${vcpus} cpus up`);
    t.equal(lines.length, vcpus + 1, 'nothing else is printed');

    Atomics.store(stop, 0, 1);
    for (const kick of kicks) kickVcpu(kick);
    for (const worker of workers) t.same(await worker.next(), { exits: [] }, 'the AP only halted (in the kernel) until kicked');
  });
}
