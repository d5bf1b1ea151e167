// Ring dirty logging: KVM_CAP_DIRTY_LOG_RING(_ACQ_REL), harvesting kvm_dirty_gfn entries and
// KVM_RESET_DIRTY_RINGS (api.rst 8.29).
import t, { type Test } from 'tap';
import { Cap, ExitReason, harvestDirtyRing, Kvm, KvmError, type Vcpu } from '../../lib/index.js';
import { enterRealMode, LOAD_ADDR, noKvm } from '../helpers/kvm.js';
import { logPageAddrs, PAGE_BYTES, runTouch, touchMachine, touchValue, writeTouchTable, type TouchMachine } from '../helpers/touch.js';
import { FixtureWorker } from '../helpers/worker.js';
import { SMALL_RING_BYTES, smallRingSupport } from '../helpers/dirty-pages.js';

const RING_BYTES = 65536;
const GFN_BYTES = 16; // sizeof(struct kvm_dirty_gfn)
const RING_ENTRIES = RING_BYTES / GFN_BYTES;
const TOUCHED = [0, 3, 7, 8, 63];

const ringSupport = (): string | false => {
  if (noKvm) return noKvm;
  const kvm = Kvm.open();
  try {
    return kvm.checkExtension(Cap.DirtyLogRing) > 0 || kvm.checkExtension(Cap.DirtyLogRingAcqRel) > 0
      ? false
      : 'this host has no KVM_CAP_DIRTY_LOG_RING';
  } finally {
    kvm.close();
  }
};
const noRing = ringSupport();

const noSmallRing = smallRingSupport(noRing);

function ringMachine(t: Test): TouchMachine {
  const machine = touchMachine({ beforeSlots: (vm) => vm.enableDirtyRing(RING_BYTES) });
  t.teardown(() => machine.close());
  return machine;
}

/** Harvested entries as sorted "slot:page" strings. */
function harvest(vcpu: Vcpu, capacity = RING_ENTRIES): string[] {
  const into = new Float64Array(2 * capacity);
  const count = vcpu.harvestDirtyRing(into);
  return pairsOf(into.subarray(0, 2 * count));
}

const pairsOf = (flat: ArrayLike<number>): string[] => {
  const pairs: string[] = [];
  for (let i = 0; i < flat.length; i += 2) pairs.push(`${flat[i]}:${flat[i + 1]}`);
  return pairs.sort(byPage);
};
const byPage = (a: string, b: string) => Number(a.split(':')[1]) - Number(b.split(':')[1]);
const slot1 = (pages: readonly number[]) => pages.map((page) => `1:${page}`).sort(byPage);

function touch(machine: TouchMachine, pages: readonly number[], onExit?: (reason: number) => boolean): void {
  writeTouchTable(machine.memory, logPageAddrs(machine, pages));
  enterRealMode(machine.vcpu, LOAD_ADDR);
  runTouch(machine.vcpu, onExit);
}

t.test('the ring holds one entry per page the guest wrote', { skip: noRing }, async (t) => {
  const machine = ringMachine(t);
  touch(machine, TOUCHED);
  // Slot 0 holds the code and the table but does not log, so only slot 1's pages appear.
  t.same(harvest(machine.vcpu), slot1(TOUCHED));
  t.same(harvest(machine.vcpu), [], 'harvested entries are not returned twice');
  t.equal(machine.vm.resetDirtyRings(), TOUCHED.length, 'KVM_RESET_DIRTY_RINGS re-protects every harvested entry');
  t.equal(machine.vm.resetDirtyRings(), 0, 'and nothing the second time');
});

t.test('pages written again after a reset are logged again', { skip: noRing }, async (t) => {
  const machine = ringMachine(t);
  touch(machine, TOUCHED);
  t.same(harvest(machine.vcpu), slot1(TOUCHED));
  t.equal(machine.vm.resetDirtyRings(), TOUCHED.length);
  touch(machine, [3, 63, 20]);
  t.same(harvest(machine.vcpu), slot1([3, 20, 63]));
});

t.test('a page written twice before a reset is named at least once', { skip: noRing }, async (t) => {
  // KVM pushes an entry whenever it marks a page dirty. Whether the second write to a page
  // reaches KVM again depends on the MMU (an emulated write does, a write through an already
  // writable mapping does not), so a consumer de-duplicates.
  const machine = ringMachine(t);
  touch(machine, [5, 6]);
  touch(machine, [5, 6, 9]);
  const entries = harvest(machine.vcpu);
  t.same([...new Set(entries)], slot1([5, 6, 9]));
  t.ok(entries.length >= 3 && entries.length <= 5, `3 to 5 entries, got ${entries.length}`);
  t.equal(machine.vm.resetDirtyRings(), entries.length);
});

t.test('a small output array harvests in order, across calls', { skip: noRing }, async (t) => {
  const machine = ringMachine(t);
  touch(machine, TOUCHED);
  const first = harvest(machine.vcpu, 2);
  const rest = harvest(machine.vcpu, 16);
  t.equal(first.length, 2);
  t.equal(rest.length, TOUCHED.length - 2);
  t.same([...first, ...rest].sort(byPage), slot1(TOUCHED));
  t.equal(harvest(machine.vcpu, 0).length, 0, 'an empty array harvests nothing');
  t.equal(machine.vm.resetDirtyRings(), TOUCHED.length);
});

t.test('harvestDirtyRing by kick handle, from this thread and from a worker', { skip: noRing }, async (t) => {
  const machine = ringMachine(t);
  touch(machine, TOUCHED);
  const into = new Float64Array(4);
  t.equal(harvestDirtyRing(machine.vcpu.kickHandle, into), 2, 'limited by the array: two pairs');
  const worker = new FixtureWorker('harvest-worker', { kickHandle: machine.vcpu.kickHandle, capacity: RING_ENTRIES });
  const fromWorker = await worker.next<{ count: number; pairs: number[] }>();
  t.equal(await worker.exited, 0);
  t.equal(fromWorker.count, TOUCHED.length - 2, 'the worker continues where this thread stopped');
  t.same([...pairsOf(into), ...pairsOf(fromWorker.pairs)].sort(byPage), slot1(TOUCHED));
  t.equal(machine.vm.resetDirtyRings(), TOUCHED.length, 'entries harvested by either thread are reset');
  touch(machine, [TOUCHED[0]!]);
  t.same(pairsOf(into.subarray(0, 2 * harvestDirtyRing(machine.vcpu.kickHandle, into))), slot1([TOUCHED[0]!]));
});

t.test('a full ring stops the vCPU until entries are harvested and reset', { skip: noSmallRing }, async (t) => {
  // 4 KiB holds 256 entries, and KVM exits with KVM_EXIT_DIRTY_RING_FULL once all but its
  // reserved entries are used (kvm_dirty_ring_soft_full). Slot 1 spans guest-physical
  // 0x20000-0xfffff: 224 pages, all reachable from real mode as segment:0.
  const ringBytes = SMALL_RING_BYTES;
  const ringEntries = ringBytes / GFN_BYTES;
  const logPages = 224;
  const machine = touchMachine({ beforeSlots: (vm) => vm.enableDirtyRing(ringBytes), codeBytes: 0x20000, logBytes: logPages * PAGE_BYTES });
  t.teardown(() => machine.close());
  const pages = Array.from({ length: logPages }, (_, page) => page);
  const harvested: string[] = [];
  const harvestedAtFull: number[] = [];
  touch(machine, pages, (reason) => {
    if (reason !== ExitReason.DirtyRingFull) return false;
    const batch = harvest(machine.vcpu, ringEntries);
    harvestedAtFull.push(batch.length);
    harvested.push(...batch);
    t.equal(machine.vm.resetDirtyRings(), batch.length, 'reset re-protects the whole batch');
    return true;
  });
  t.ok(harvestedAtFull.length >= 1, 'the guest filled the ring at least once');
  t.ok(harvestedAtFull.every((count) => count > 0 && count < ringEntries), `each full ring held fewer than ${ringEntries} entries: ${harvestedAtFull}`);
  harvested.push(...harvest(machine.vcpu));
  t.same(harvested.sort(byPage), slot1(pages), 'every page exactly once, across all harvests');
  const memory = new DataView(machine.memory.buffer);
  t.equal(memory.getUint16(machine.logBase + (logPages - 1) * PAGE_BYTES, true), touchValue(logPages - 1), 'the guest finished its last store');
});

t.test('harvestDirtyRing needs a ring enabled before the vCPU was created', { skip: noKvm }, async (t) => {
  const machine = touchMachine();
  t.teardown(() => machine.close());
  t.throws(() => machine.vcpu.harvestDirtyRing(new Float64Array(8)), { name: 'KvmError', code: 'ERR_KVM_NO_DIRTY_RING' });
  t.throws(() => harvestDirtyRing(machine.vcpu.kickHandle, new Float64Array(8)), { name: 'KvmError', code: 'ERR_KVM_NO_DIRTY_RING' });
});

t.test('enableDirtyRing checks the size and the moment', { skip: noRing }, async (t) => {
  const kvm = Kvm.open();
  const vm = kvm.createVm();
  t.teardown(() => {
    vm.close();
    kvm.close();
  });
  t.throws(() => vm.enableDirtyRing(3000), RangeError, 'not a power of two');
  t.throws(() => vm.enableDirtyRing(12288), RangeError, 'not a power of two');
  t.throws(() => vm.enableDirtyRing(2048), RangeError, 'smaller than a page');
  t.throws(() => vm.enableDirtyRing('65536' as unknown as number), TypeError);
  const vcpu = vm.createVcpu(0);
  t.teardown(() => vcpu.close());
  t.throws(() => vm.enableDirtyRing(RING_BYTES), { name: 'KvmError', code: 'EINVAL' }, 'after createVcpu the kernel refuses');
});

t.test('a VM with a ring refuses the bitmap interface', { skip: noRing }, async (t) => {
  // api.rst 8.29: the ring and KVM_GET_DIRTY_LOG / KVM_CLEAR_DIRTY_LOG are mutually exclusive.
  const machine = ringMachine(t);
  t.throws(() => machine.vm.getDirtyLog(1), { name: 'KvmError', syscall: 'ioctl(KVM_GET_DIRTY_LOG)' });
});

t.test('harvesting a closed vCPU by its handle throws EBADF', { skip: noRing }, async (t) => {
  const machine = ringMachine(t);
  const handle = machine.vcpu.kickHandle;
  machine.vcpu.close();
  t.throws(() => harvestDirtyRing(handle, new Float64Array(8)), { name: 'KvmError', code: 'EBADF' });
  t.throws(() => machine.vcpu.harvestDirtyRing(new Float64Array(8)), { name: 'KvmError', code: 'EBADF' });
  t.throws(() => harvestDirtyRing(handle, new Uint32Array(8) as unknown as Float64Array), TypeError);
  t.throws(() => harvestDirtyRing({} as never, new Float64Array(8)), TypeError);
});
