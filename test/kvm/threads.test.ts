// The binding across worker_threads, as the VMM uses it: a vCPU per worker reached by its kick
// handle, a VM shared by fd, guest memory shared by handle, and workers that end abruptly.
import t, { type Test } from 'tap';
import { Cap, ExitReason, GuestMemory, Kvm, KVM_API_VERSION, kickVcpu, type GuestMemoryHandle, type VcpuKickHandle, type Vm } from '../../lib/index.js';
import { enterRealMode, guestImage, LOAD_ADDR, noKvm, runToHalt } from '../helpers/kvm.js';
import { FixtureWorker, sleep } from '../helpers/worker.js';

const MiB = 1 << 20;
// spin.S: `cli` at 0x7c00, then `jmp .` at 0x7c01, where every interrupted run stops.
const SPIN_LOOP_RIP = BigInt(LOAD_ADDR + 1);
const nextTurn = () => new Promise<void>((resolve) => setImmediate(resolve));

/** A VM owned by this thread with `guest` at 0x7c00 in 1 MiB of RAM, and no vCPU yet. */
function mainThreadVm(t: Test, guest: string): { vm: Vm; memory: GuestMemory } {
  const kvm = Kvm.open();
  const vm = kvm.createVm();
  const memory = GuestMemory.create(MiB);
  vm.setUserMemoryRegion({ slot: 0, guestPhysAddr: 0, memory });
  memory.write(LOAD_ADDR, guestImage(guest));
  t.teardown(() => {
    vm.close();
    memory.close();
    kvm.close();
  });
  return { vm, memory };
}

/**
 * Awaits the worker's exit in teardown. A worker blocked in KVM_RUN cannot be terminated
 * cleanly, so a test that failed midway kicks its vCPU first.
 */
function reap(t: Test, worker: FixtureWorker, kickHandle: () => VcpuKickHandle | undefined = () => undefined): void {
  t.teardown(async () => {
    const handle = kickHandle();
    if (handle) kickVcpu(handle);
    await worker.exited;
  });
}

t.test('a vCPU running in a worker leaves run() when kicked from the main thread', { skip: noKvm }, async (t) => {
  // Several rounds in a row: each kick must land, whether the worker is already inside
  // KVM_RUN (the signal) or about to enter it (immediate_exit).
  for (let round = 1; round <= 3; round++) {
    await t.test(`round ${round}`, async (t) => {
      const { vm } = mainThreadVm(t, 'spin');
      const worker = new FixtureWorker('kick-worker', { vmFd: vm.fd });
      let kickHandle: VcpuKickHandle | undefined;
      reap(t, worker, () => kickHandle);
      ({ kickHandle } = await worker.next<{ kickHandle: VcpuKickHandle }>());
      await sleep(50);
      t.equal(kickVcpu(kickHandle), true, 'the vCPU was open when kicked');
      t.same(await worker.next(), { reason: ExitReason.Intr, rip: SPIN_LOOP_RIP, otherExits: [] }, 'run() returned Intr in the spin loop');
      t.equal(await worker.exited, 0, 'the worker closed its vCPU and exited normally');
      t.equal(kickVcpu(kickHandle), false, 'its closed vCPU can no longer be kicked');
    });
  }
});

t.test('guest memory written in one worker is read in another', { skip: noKvm }, async (t) => {
  const memory = GuestMemory.create(MiB);
  t.teardown(() => memory.close());
  const handle: GuestMemoryHandle = memory.handle;
  memory.write(0x2000, Uint8Array.of(0x10, 0x20, 0x30));
  const writer = new FixtureWorker('memory-worker', { handle, writes: [[0x80000, [0xca, 0xfe, 0xba, 0xbe]]], reads: [[0x2000, 3]] });
  reap(t, writer);
  t.same(await writer.next(), [[0x10, 0x20, 0x30]], "a worker reads the main thread's bytes");
  t.equal(await writer.exited, 0);
  const reader = new FixtureWorker('memory-worker', { handle, reads: [[0x7fffe, 8]] });
  reap(t, reader);
  t.same(await reader.next(), [[0, 0, 0xca, 0xfe, 0xba, 0xbe, 0, 0]], "another reads the first worker's bytes, exactly where it wrote them");
  t.equal(await reader.exited, 0);
  t.same([...memory.bytes(0x80000, 4)], [0xca, 0xfe, 0xba, 0xbe], 'and so does the main thread');
});

t.test('a Vm.fromFd view in a worker throws EBADF once the main thread closes the VM', { skip: noKvm }, async (t) => {
  const kvm = Kvm.open();
  const vm = kvm.createVm();
  t.teardown(() => {
    vm.close();
    kvm.close();
  });
  const worker = new FixtureWorker('vm-view-worker', { vmFd: vm.fd });
  reap(t, worker);
  t.same(await worker.next(), { owning: false, readonlyMem: vm.checkExtension(Cap.ReadonlyMem) }, 'the view works while the VM is open');
  vm.close();
  worker.post('closed');
  const closedError = { isKvmError: true, name: 'KvmError', code: 'EBADF' };
  t.same(await worker.next(), { checkExtension: closedError, createVcpu: closedError, fromFd: closedError });
  t.equal(await worker.exited, 0, 'the worker caught the errors and ended normally');
});

t.test('a worker that exits with its handles open does not take the process down', { skip: noKvm }, async (t) => {
  await nextTurn();
  const mappingsBefore = GuestMemory.stats().mappings;
  const { vm } = mainThreadVm(t, 'hello');
  const worker = new FixtureWorker('abandon-worker', { vmFd: vm.fd });
  reap(t, worker);
  const left = await worker.next<{ vmViewKick: VcpuKickHandle; ownKick: VcpuKickHandle; memoryHandle: GuestMemoryHandle; released: VcpuKickHandle }>();
  t.equal(await worker.exited, 0);
  t.equal(kickVcpu(left.vmViewKick), false, 'its vCPU in our VM was closed with the thread');
  t.equal(kickVcpu(left.ownKick), false, 'and so was the vCPU of its own VM');
  t.equal(kickVcpu(left.released), false, 'and the vCPU it handed over that nobody adopted');
  await nextTurn();
  t.throws(() => GuestMemory.attach(left.memoryHandle), { name: 'KvmError', code: 'EBADF' }, 'its guest memory is unmapped');
  t.equal(GuestMemory.stats().mappings, mappingsBefore + 1, 'only our own VM memory is still mapped');
  // Our VM is intact: another vCPU runs a guest in it.
  const vcpu = vm.createVcpu(1);
  t.teardown(() => vcpu.close());
  enterRealMode(vcpu, LOAD_ADDR);
  t.equal(runToHalt(vcpu), 'Hello from node-kvm!\n');
});

t.test('the addon loads in a worker and runs a guest there', { skip: noKvm }, async (t) => {
  const worker = new FixtureWorker('hello-worker');
  reap(t, worker);
  t.same(await worker.next(), { apiVersion: KVM_API_VERSION, output: 'Hello from node-kvm!\n' });
  t.equal(await worker.exited, 0);
});
