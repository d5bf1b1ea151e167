// DirtyTracker over the real /dev/kvm: exact page sets from the touch guest, in bitmap mode
// (with and without KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) and ring mode, merged with the VMM's own
// bitmap; spillDirtyRing for a full ring.
import t, { type Test } from 'tap';
import { Cap, DirtyLogManual, ExitReason, GuestMemory, Kvm, KvmError, MemoryFlag, type Vcpu } from '../../lib/index.js';
import { DirtyBitmap } from '../../lib/vmm/dirty-bitmap.js';
import {
  CLEAR_CHUNK_PAGES, DEFAULT_DIRTY_RING_BYTES, DirtyTracker, dirtyLogModesOffered, maxDirtyRingBytes, slotBasePages, spillDirtyRing,
  type DirtyTrackerOptions, type TrackedSlot,
} from '../../lib/vmm/dirty-tracker.js';
import type { DirtyLogMode, PageRange } from '../../lib/migration/types.js';
import { enterRealMode, LOAD_ADDR, noKvm } from '../helpers/kvm.js';
import { PAGE_BYTES, runTouch, touchMachine, touchValue, writeTouchTable, type TouchMachine, type TouchMachineOptions } from '../helpers/touch.js';
import { rangesOf, SMALL_RING_BYTES, smallRingSupport } from '../helpers/dirty-pages.js';

// touchMachine: slot 0 = [0, 0x40000) holds the code (0x7c00) and the table (0x500), slot 1 =
// [0x40000, 0x80000). Guest frames: slot 0 is 0..63, slot 1 is 64..127.
const SLOT1_FIRST_PAGE = 64;

const hostCaps = (): { ring: boolean; manual: number } => {
  if (noKvm) return { ring: false, manual: 0 };
  const kvm = Kvm.open();
  try {
    return { ring: maxDirtyRingBytes(kvm) > 0, manual: kvm.checkExtension(Cap.ManualDirtyLogProtect2) };
  } finally {
    kvm.close();
  }
};
const caps = hostCaps();
const noRing = noKvm || (caps.ring ? false : 'this host has no KVM_CAP_DIRTY_LOG_RING');

const noSmallRing = smallRingSupport(noRing);

interface Tracked {
  machine: TouchMachine;
  tracker: DirtyTracker;
  vmmDirty: DirtyBitmap;
  slots: TrackedSlot[];
}

/**
 * The touch machine with both slots tracked (slot 1 not logging until the tracker starts it) and
 * a VMM bitmap over all of its RAM.
 */
function tracked(
  t: Test, mode: DirtyLogMode,
  options: { machine?: TouchMachineOptions; tracker?: Partial<DirtyTrackerOptions>; ringBytes?: number } = {},
): Tracked {
  const machine = touchMachine({
    logFlags: {},
    ...(mode === 'ring' ? { beforeSlots: (vm) => vm.enableDirtyRing(options.ringBytes ?? DEFAULT_DIRTY_RING_BYTES) } : {}),
    ...options.machine,
  });
  const slots: TrackedSlot[] = [
    { slot: 0, guestPhysAddr: 0, memory: machine.memory, size: machine.logBase },
    { slot: 1, guestPhysAddr: machine.logBase, memory: machine.memory, offset: machine.logBase, size: machine.memory.size - machine.logBase },
  ];
  const vmmDirty = DirtyBitmap.create(machine.memory.size / PAGE_BYTES);
  const tracker = new DirtyTracker({
    vm: machine.vm, slots, mode, vmmDirty, ...(mode === 'ring' ? { vcpus: [machine.vcpu.kickHandle] } : {}), ...options.tracker,
  });
  t.teardown(() => {
    tracker.stop();
    machine.close();
  });
  return { machine, tracker, vmmDirty, slots };
}

/** Runs touch.S from the start over `guestPhysAddrs`. */
function touch(machine: TouchMachine, guestPhysAddrs: readonly number[], onExit?: (reason: number) => boolean): void {
  writeTouchTable(machine.memory, guestPhysAddrs);
  enterRealMode(machine.vcpu, LOAD_ADDR);
  runTouch(machine.vcpu, onExit);
}

/** Guest-physical addresses of guest frames. */
const frames = (pages: readonly number[]): number[] => pages.map((page) => page * PAGE_BYTES);

/** Sorted, merged ranges of a set of guest frames. */
// Slot 1 pages 0, 3, 7, 8, 63 and slot 0 page 32 (above the code at 0x7c00 and the table).
const TOUCHED = [SLOT1_FIRST_PAGE + 0, SLOT1_FIRST_PAGE + 3, SLOT1_FIRST_PAGE + 7, SLOT1_FIRST_PAGE + 8, SLOT1_FIRST_PAGE + 63, 32];

t.test('modes offered and ring sizes', { skip: noKvm }, async (t) => {
  const kvm = Kvm.open();
  t.teardown(() => kvm.close());
  const ringBytes = Math.max(kvm.checkExtension(Cap.DirtyLogRing), kvm.checkExtension(Cap.DirtyLogRingAcqRel), 0);
  t.equal(maxDirtyRingBytes(kvm), ringBytes);
  t.same(dirtyLogModesOffered(kvm), ringBytes > 0 ? ['bitmap', 'ring'] : ['bitmap']);
  const vm = kvm.createVm();
  t.teardown(() => vm.close());
  t.same(dirtyLogModesOffered(vm), dirtyLogModesOffered(kvm), 'a Vm answers the same');
  t.equal(DEFAULT_DIRTY_RING_BYTES & (DEFAULT_DIRTY_RING_BYTES - 1), 0, 'the default ring is a power of two');
  if (ringBytes > 0) t.ok(DEFAULT_DIRTY_RING_BYTES <= ringBytes, `within the host's ${ringBytes} bytes`);
  t.throws(() => dirtyLogModesOffered({} as Kvm), { name: 'TypeError', message: 'source must be a Kvm or a Vm' });
});

t.test('bitmap mode names exactly the guest frames written after start()', { skip: noKvm }, async (t) => {
  const { machine, tracker } = tracked(t, 'bitmap');
  t.equal(tracker.mode, 'bitmap');
  t.equal(tracker.active, false);
  touch(machine, frames([SLOT1_FIRST_PAGE + 5, 40]));
  tracker.start();
  t.equal(tracker.active, true);
  t.equal(tracker.manualProtect, (caps.manual & DirtyLogManual.ProtectEnable) !== 0, 'manual protect where the host offers it');
  t.equal(tracker.initiallySet, false, 'a small slot is write-protected as logging is turned on, not through an initially-set log');
  t.same(tracker.harvest(), [], 'writes before start() are not reported');
  touch(machine, frames(TOUCHED));
  t.same(tracker.harvest(), rangesOf(TOUCHED), 'both slots, by guest frame number');
  const memory = new DataView(machine.memory.buffer);
  t.same(TOUCHED.map((page) => memory.getUint16(page * PAGE_BYTES, true)), TOUCHED.map((_, i) => touchValue(i)));
  t.same(tracker.harvest(), [], 'nothing new');
  touch(machine, frames([SLOT1_FIRST_PAGE + 3, SLOT1_FIRST_PAGE + 4, 33]));
  t.same(tracker.harvest(), rangesOf([SLOT1_FIRST_PAGE + 3, SLOT1_FIRST_PAGE + 4, 33]), 'the second harvest: only pages written since the first');
  t.same(tracker.harvest(), []);
});

const noInitiallySet = noKvm || ((caps.manual & DirtyLogManual.ProtectEnable) && (caps.manual & DirtyLogManual.InitiallySet) ? false : 'no KVM_DIRTY_LOG_INITIALLY_SET');
t.test('bitmap mode with KVM_DIRTY_LOG_INITIALLY_SET asked for: the same pages', { skip: noInitiallySet }, async (t) => {
  const { machine, tracker } = tracked(t, 'bitmap', { tracker: { initiallySet: true } });
  touch(machine, frames([SLOT1_FIRST_PAGE + 5, 40]));
  tracker.start();
  t.equal(tracker.initiallySet, true);
  t.same(tracker.harvest(), [], 'writes before start() are not reported, nor the initially-set bits');
  touch(machine, frames(TOUCHED));
  t.same(tracker.harvest(), rangesOf(TOUCHED));
  t.same(tracker.harvest(), []);
  tracker.stop();
  // Started again without it: the VM's capability is set anew, and the log starts clear.
  const again = new DirtyTracker({ vm: machine.vm, slots: [{ slot: 1, guestPhysAddr: machine.logBase, memory: machine.memory, offset: machine.logBase }], mode: 'bitmap', vmmDirty: DirtyBitmap.create(machine.memory.size / PAGE_BYTES), initiallySet: false });
  t.teardown(() => again.stop());
  again.start();
  t.equal(again.initiallySet, false);
  touch(machine, frames([SLOT1_FIRST_PAGE + 9]));
  t.same(again.harvest(), [{ firstPage: SLOT1_FIRST_PAGE + 9, pageCount: 1 }]);
  t.throws(() => new DirtyTracker({ vm: machine.vm, slots: [], mode: 'bitmap', vmmDirty: DirtyBitmap.create(1), initiallySet: 1 as unknown as boolean }), {
    name: 'TypeError', message: 'initiallySet must be a boolean',
  });
});

t.test('bitmap mode without manual protect (plain KVM_GET_DIRTY_LOG)', { skip: noKvm }, async (t) => {
  const { machine, tracker } = tracked(t, 'bitmap', { tracker: { manualProtect: false } });
  touch(machine, frames([SLOT1_FIRST_PAGE + 1]));
  tracker.start();
  t.equal(tracker.manualProtect, false);
  t.same(tracker.harvest(), []);
  touch(machine, frames(TOUCHED));
  t.same(tracker.harvest(), rangesOf(TOUCHED));
  touch(machine, frames([SLOT1_FIRST_PAGE + 63]));
  t.same(tracker.harvest(), [{ firstPage: SLOT1_FIRST_PAGE + 63, pageCount: 1 }]);
  t.same(tracker.harvest(), []);
});

t.test('manual protect clears the log in chunks, re-arming each chunk', { skip: noKvm || (caps.manual ? false : 'no manual protect') }, async (t) => {
  // Slot 1 of 100 pages with 64-page chunks: a full chunk, then a short one ending the slot.
  const { machine, tracker } = tracked(t, 'bitmap', { machine: { logBytes: 100 * PAGE_BYTES }, tracker: { clearChunkPages: 64 } });
  tracker.start();
  const pages = [0, 63, 64, 65, 99].map((page) => SLOT1_FIRST_PAGE + page);
  touch(machine, frames(pages));
  t.same(tracker.harvest(), rangesOf(pages));
  t.same(tracker.harvest(), [], 'every chunk was cleared');
  touch(machine, frames(pages));
  t.same(tracker.harvest(), rangesOf(pages), 'and every chunk re-armed');
  touch(machine, frames([SLOT1_FIRST_PAGE + 99]));
  t.same(tracker.harvest(), [{ firstPage: SLOT1_FIRST_PAGE + 99, pageCount: 1 }], 'a chunk with nothing dirty is left alone');
  t.throws(() => new DirtyTracker({ vm: machine.vm, slots: [], mode: 'bitmap', vmmDirty: DirtyBitmap.create(1), clearChunkPages: 100 }), {
    name: 'RangeError', message: 'clearChunkPages must be a positive multiple of 64, got 100',
  });
});

t.test('pages marked in the VMM bitmap are merged in', { skip: noKvm }, async (t) => {
  const { machine, tracker, vmmDirty } = tracked(t, 'bitmap');
  vmmDirty.markPages(10, 1);
  tracker.start();
  t.same(tracker.harvest(), [{ firstPage: 10, pageCount: 1 }], 'start() leaves vmmDirty alone');
  // Host writes: invisible to KVM, so the VMM marks them.
  machine.memory.bytes(SLOT1_FIRST_PAGE * PAGE_BYTES + PAGE_BYTES - 2, 4).set([1, 2, 3, 4]);
  vmmDirty.mark(SLOT1_FIRST_PAGE * PAGE_BYTES + PAGE_BYTES - 2, 4);
  machine.memory.bytes(50 * PAGE_BYTES, 1)[0] = 9;
  machine.memory.bytes(51 * PAGE_BYTES, 1)[0] = 9;
  touch(machine, frames(TOUCHED));
  t.same(tracker.harvest(), rangesOf([...TOUCHED, SLOT1_FIRST_PAGE + 1]), 'guest writes plus marked host writes, merged (64-65 is one range)');
  t.ok(vmmDirty.isEmpty(), 'harvest took the marks');
  vmmDirty.markPages(0, 128);
  t.same(tracker.harvest(), [{ firstPage: 0, pageCount: 128 }]);
  t.same(tracker.harvest(), []);
});

t.test('requeued pages come back in the next harvest, exactly once', { skip: noKvm }, async (t) => {
  const { machine, tracker } = tracked(t, 'bitmap');
  tracker.start();
  touch(machine, frames(TOUCHED));
  const failed = tracker.harvest();
  t.same(failed, rangesOf(TOUCHED));
  tracker.requeue(failed);
  tracker.requeue([{ firstPage: 120, pageCount: 8 }, { firstPage: 5, pageCount: 0 }]);
  touch(machine, frames([SLOT1_FIRST_PAGE + 1]));
  t.same(tracker.harvest(), rangesOf([...TOUCHED, SLOT1_FIRST_PAGE + 1, 120, 121, 122, 123, 124, 125, 126, 127]), 'requeued plus new, merged');
  t.same(tracker.harvest(), [], 'not twice');
  t.throws(() => tracker.requeue([{ firstPage: 127, pageCount: 2 }]), {
    name: 'RangeError', message: 'ranges[0] (127 +2) must lie within the 128 tracked guest frames',
  });
  t.throws(() => tracker.requeue([{ firstPage: 1, pageCount: 1 }, { firstPage: -1, pageCount: 1 }]), RangeError);
  t.throws(() => tracker.requeue([{ firstPage: '1', pageCount: 1 } as unknown as PageRange]), TypeError);
  t.throws(() => tracker.requeue({} as PageRange[]), TypeError);
  t.same(tracker.harvest(), [], 'a refused requeue adds nothing, not even its valid ranges');
});

t.test('stop() turns logging off; start() again begins afresh', { skip: noKvm }, async (t) => {
  const { machine, tracker } = tracked(t, 'bitmap');
  tracker.start();
  t.throws(() => tracker.start(), { message: 'dirty tracking is already on; stop() it first' });
  touch(machine, frames([SLOT1_FIRST_PAGE + 2]));
  tracker.stop();
  t.equal(tracker.active, false);
  // The slot no longer has KVM_MEM_LOG_DIRTY_PAGES, so it has no log to read.
  t.throws(() => machine.vm.getDirtyLog(1), { name: 'RangeError', message: 'slot 1 does not log dirty pages' });
  t.throws(() => tracker.harvest(), { message: 'dirty tracking is off; call start() first' });
  tracker.stop();
  t.equal(tracker.active, false, 'stop() again does nothing');
  touch(machine, frames([SLOT1_FIRST_PAGE + 4]));
  tracker.start();
  t.same(tracker.harvest(), [], 'neither the write before stop() nor the one while stopped');
  touch(machine, frames([SLOT1_FIRST_PAGE + 6]));
  t.same(tracker.harvest(), [{ firstPage: SLOT1_FIRST_PAGE + 6, pageCount: 1 }]);
});

t.test('a slot registered as logging keeps its log after stop(); read-only slots are not logged', { skip: noKvm }, async (t) => {
  const machine = touchMachine();
  t.teardown(() => machine.close());
  const rom = GuestMemory.create(4 * PAGE_BYTES);
  t.teardown(() => rom.close());
  machine.vm.setUserMemoryRegion({ slot: 2, guestPhysAddr: 0x100000, memory: rom, flags: { readonly: true } });
  const vmmDirty = DirtyBitmap.create(0x104000 / PAGE_BYTES);
  const tracker = new DirtyTracker({
    vm: machine.vm, mode: 'bitmap', vmmDirty,
    slots: [
      { slot: 1, guestPhysAddr: machine.logBase, memory: machine.memory, offset: machine.logBase, size: machine.logBase, flags: MemoryFlag.LogDirtyPages },
      { slot: 2, guestPhysAddr: 0x100000, memory: rom, flags: MemoryFlag.Readonly },
    ],
  });
  tracker.start();
  t.throws(() => machine.vm.getDirtyLog(2), RangeError, 'the read-only slot was not re-registered with a log');
  vmmDirty.markPages(0x100, 2);
  touch(machine, frames([SLOT1_FIRST_PAGE + 9]));
  t.same(tracker.harvest(), [{ firstPage: SLOT1_FIRST_PAGE + 9, pageCount: 1 }, { firstPage: 0x100, pageCount: 2 }]);
  tracker.stop();
  t.doesNotThrow(() => machine.vm.getDirtyLog(1), 'slot 1 logs as it did before start()');
});

t.test('the constructor checks its options', { skip: noKvm }, async (t) => {
  const machine = touchMachine({ logFlags: {} });
  t.teardown(() => machine.close());
  const { vm, memory } = machine;
  const vmmDirty = DirtyBitmap.create(128);
  const make = (options: Partial<DirtyTrackerOptions>) => () => new DirtyTracker({ vm, slots: [], mode: 'bitmap', vmmDirty, ...options });
  t.throws(make({ mode: 'log' as DirtyLogMode }), { name: 'RangeError', message: "mode must be 'bitmap' or 'ring', got log" });
  t.throws(make({ vm: {} as never }), { name: 'TypeError', message: 'vm must be a Vm' });
  t.throws(make({ vmmDirty: {} as never }), { name: 'TypeError', message: 'vmmDirty must be a DirtyBitmap' });
  t.throws(make({ mode: 'ring' }), {
    name: 'TypeError', message: "mode 'ring' needs options.vcpus: the kick handles of every vCPU, whose dirty rings harvest() drains",
  });
  t.throws(make({ mode: 'ring', vcpus: [{} as never] }), { name: 'TypeError', message: 'vcpus[0] must be a VcpuKickHandle (vcpu.kickHandle)' });
  t.throws(make({ slots: [{ slot: 1, guestPhysAddr: 0x40000, memory }] }), {
    name: 'RangeError', message: "slots[0] (guest frames 64..191) lies beyond vmmDirty's 128 pages",
  });
  t.throws(make({ slots: [{ slot: 1, guestPhysAddr: 0x40001, memory, size: PAGE_BYTES }] }), {
    name: 'RangeError', message: 'slots[0].guestPhysAddr must be page-aligned, got 0x40001',
  });
  t.throws(make({ slots: [{ slot: 1, guestPhysAddr: 0, memory, size: 100 }] }), RangeError);
  t.throws(make({ slots: [{ slot: 1, guestPhysAddr: 0, memory, offset: memory.size }] }), RangeError);
  t.throws(make({ slots: [{ slot: 1, guestPhysAddr: 0, memory: {} as never }] }), { name: 'TypeError', message: 'slots[0].memory must be a GuestMemory' });
  t.throws(make({ slots: [{ slot: 1, guestPhysAddr: 0, memory, flags: 4 }] }), RangeError);
  t.throws(make({ slots: [{ slot: 1, guestPhysAddr: 0, memory, size: PAGE_BYTES }, { slot: 1, guestPhysAddr: PAGE_BYTES, memory, size: PAGE_BYTES }] }), {
    name: 'RangeError', message: 'slot 1 is listed twice in slots',
  });
  t.throws(make({ slots: {} as never }), TypeError);
});

t.test('start() fails cleanly where KVM refuses, leaving logging off', { skip: noRing }, async (t) => {
  // A VM with a ring refuses KVM_GET_DIRTY_LOG (api.rst 8.29), so bitmap mode cannot start there.
  const { machine, tracker } = tracked(t, 'ring');
  const bitmapTracker = new DirtyTracker({
    vm: machine.vm, mode: 'bitmap', vmmDirty: DirtyBitmap.create(128), manualProtect: false,
    slots: [{ slot: 1, guestPhysAddr: machine.logBase, memory: machine.memory, offset: machine.logBase }],
  });
  t.throws(() => bitmapTracker.start(), { name: 'KvmError', syscall: 'ioctl(KVM_GET_DIRTY_LOG)' });
  t.equal(bitmapTracker.active, false);
  t.throws(() => machine.vm.getDirtyLog(1), RangeError, 'slot 1 was put back without its log');
  t.equal(tracker.active, false);
});

t.test('ring mode names exactly the guest frames written after start()', { skip: noRing }, async (t) => {
  const { machine, tracker, vmmDirty } = tracked(t, 'ring');
  t.equal(tracker.mode, 'ring');
  touch(machine, frames([SLOT1_FIRST_PAGE + 5]));
  tracker.start();
  t.same(tracker.harvest(), [], 'nothing from before start()');
  touch(machine, frames(TOUCHED));
  t.same(tracker.harvest(), rangesOf(TOUCHED));
  t.same(tracker.harvest(), []);
  // The same pages several times between harvests: the ring may repeat them, the tracker does not.
  touch(machine, frames([SLOT1_FIRST_PAGE + 3, SLOT1_FIRST_PAGE + 20, 33]));
  touch(machine, frames([SLOT1_FIRST_PAGE + 3, SLOT1_FIRST_PAGE + 20, SLOT1_FIRST_PAGE + 21]));
  vmmDirty.markPages(60, 4);
  t.same(tracker.harvest(), rangesOf([SLOT1_FIRST_PAGE + 3, SLOT1_FIRST_PAGE + 20, SLOT1_FIRST_PAGE + 21, 33, 60, 61, 62, 63]), 'deduplicated, merged with vmmDirty');
  t.equal(machine.vm.resetDirtyRings(), 0, 'harvest() already reset the rings');
  tracker.requeue([{ firstPage: 1, pageCount: 1 }]);
  t.same(tracker.harvest(), [{ firstPage: 1, pageCount: 1 }]);
  t.same(tracker.harvest(), []);
  tracker.stop();
  touch(machine, frames([SLOT1_FIRST_PAGE + 7]));
  t.equal(machine.vcpu.harvestDirtyRing(new Float64Array(16)), 0, 'after stop() the guest writes no ring entries');
});

t.test('spillDirtyRing moves a vCPU ring into the bitmap and resets it', { skip: noRing }, async (t) => {
  const { machine, slots } = tracked(t, 'ring');
  machine.vm.setUserMemoryRegion({ slot: 1, guestPhysAddr: machine.logBase, memory: machine.memory, offset: machine.logBase, flags: { logDirtyPages: true } });
  const into = DirtyBitmap.create(128);
  const pages = [0, 3, 7, 8, 63].map((page) => SLOT1_FIRST_PAGE + page);
  touch(machine, frames(pages));
  const bases = slotBasePages(slots);
  t.same([...bases], [[0, 0], [1, SLOT1_FIRST_PAGE]]);
  t.equal(spillDirtyRing(machine.vcpu, machine.vm, bases, into, new Float64Array(4)), pages.length, 'every entry, through a small scratch array');
  t.same(into.takeRanges(), rangesOf(pages));
  t.equal(machine.vcpu.harvestDirtyRing(new Float64Array(16)), 0, 'the ring is empty');
  t.equal(machine.vm.resetDirtyRings(), 0, 'and already reset');
  touch(machine, frames([SLOT1_FIRST_PAGE + 3]));
  t.equal(spillDirtyRing(machine.vcpu, machine.vm, bases, into), 1, 'reset pages are logged again; the default scratch');
  t.same(into.takeRanges(), [{ firstPage: SLOT1_FIRST_PAGE + 3, pageCount: 1 }]);
  touch(machine, frames([SLOT1_FIRST_PAGE + 4, SLOT1_FIRST_PAGE + 5]));
  t.throws(() => spillDirtyRing(machine.vcpu, machine.vm, new Map([[0, 0]]), into), {
    name: 'RangeError', message: 'dirty ring entry for slot 1, which slotBasePages does not name',
  });
  t.equal(machine.vm.resetDirtyRings(), 0, 'the rings were reset before the throw');
  t.throws(() => spillDirtyRing(machine.vcpu, machine.vm, {} as never, into), TypeError);
  t.throws(() => spillDirtyRing(machine.vcpu, machine.vm, bases, into, new Float64Array(1)), TypeError);
});

t.test('a full ring spilled from the exit loop loses no page', { skip: noSmallRing }, async (t) => {
  // 4 KiB holds 256 entries; 224 pages of slot 1 fill it (see test/kvm/dirty-ring.test.ts). Slot 1
  // spans guest-physical 0x20000-0xfffff, all reachable from real mode.
  const logPages = 224;
  const codePages = 32;
  const { machine, tracker, vmmDirty, slots } = tracked(t, 'ring', {
    ringBytes: SMALL_RING_BYTES, machine: { codeBytes: codePages * PAGE_BYTES, logBytes: logPages * PAGE_BYTES },
  });
  tracker.start();
  const bases = slotBasePages(slots);
  let fullExits = 0;
  const spill = (vcpu: Vcpu) => (reason: number) => {
    if (reason !== ExitReason.DirtyRingFull) return false;
    fullExits++;
    spillDirtyRing(vcpu, machine.vm, bases, vmmDirty);
    return true;
  };
  const pages = Array.from({ length: logPages }, (_, page) => codePages + page);
  touch(machine, frames(pages), spill(machine.vcpu));
  t.ok(fullExits >= 1, `the ring filled (${fullExits} times)`);
  t.notOk(vmmDirty.isEmpty(), 'spilled pages wait in vmmDirty');
  t.same(tracker.harvest(), [{ firstPage: codePages, pageCount: logPages }], 'spilled and still-ringed pages together, each once');
  t.same(tracker.harvest(), []);
});

t.test('a 1 GiB slot: start() consumes the initially-set log in chunks', { skip: noKvm }, async (t) => {
  // Guest RAM the guest never touches: the log still spans 262144 pages plus 64 (two clear
  // chunks), above 4 GiB.
  const memory = GuestMemory.create(CLEAR_CHUNK_PAGES * PAGE_BYTES + 64 * PAGE_BYTES);
  const kvm = Kvm.open();
  const vm = kvm.createVm();
  t.teardown(() => {
    vm.close();
    memory.close();
    kvm.close();
  });
  const guestPhysAddr = 2 ** 32;
  vm.setUserMemoryRegion({ slot: 3, guestPhysAddr, memory });
  const firstPage = guestPhysAddr / PAGE_BYTES;
  const vmmDirty = DirtyBitmap.create(firstPage + memory.size / PAGE_BYTES);
  const tracker = new DirtyTracker({ vm, mode: 'bitmap', vmmDirty, slots: [{ slot: 3, guestPhysAddr, memory }], initiallySet: true });
  t.teardown(() => tracker.stop());
  tracker.start();
  t.equal(tracker.initiallySet, (caps.manual & DirtyLogManual.InitiallySet) !== 0);
  t.same(tracker.harvest(), [], 'no page reported: start() cleared every chunk');
  vmmDirty.mark(guestPhysAddr + CLEAR_CHUNK_PAGES * PAGE_BYTES - 1, 2);
  vmmDirty.markPages(firstPage + 5, 1);
  t.same(tracker.harvest(), [{ firstPage: firstPage + 5, pageCount: 1 }, { firstPage: firstPage + CLEAR_CHUNK_PAGES - 1, pageCount: 2 }]);
  const log = vm.getDirtyLog(3);
  t.equal(log.length, (CLEAR_CHUNK_PAGES + 64) / 8);
  t.ok(log.every((byte) => byte === 0), "KVM's log is clear");
});
