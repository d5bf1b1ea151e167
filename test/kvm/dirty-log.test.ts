// Bitmap dirty logging: KVM_MEM_LOG_DIRTY_PAGES, KVM_GET_DIRTY_LOG and, with
// KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_CLEAR_DIRTY_LOG (api.rst 4.8, 4.117, 7.18).
import t, { type Test } from 'tap';
import { Cap, DirtyLogManual, KvmError } from '../../lib/index.js';
import { enterRealMode, LOAD_ADDR, noKvm } from '../helpers/kvm.js';
import {
  dirtyBitmap, logPageAddrs, PAGE_BYTES, runTouch, touchMachine, touchValue, writeTouchTable, type TouchMachineOptions,
} from '../helpers/touch.js';

// Slot 1: 256 KiB at guest-physical 0x40000, 64 pages, so its bitmap is one 64-bit word.
const LOG_PAGES = 64;
const TOUCHED = [0, 3, 7, 8, 63];
const manualProtect = (flags: number): TouchMachineOptions => ({
  beforeSlots: (vm) => vm.enableCap(Cap.ManualDirtyLogProtect2, [flags]),
});

function touchedMachine(t: Test, options: TouchMachineOptions = {}, pages = TOUCHED) {
  const machine = touchMachine(options);
  t.teardown(() => machine.close());
  writeTouchTable(machine.memory, logPageAddrs(machine, pages));
  t.same(runTouch(machine.vcpu), { doneMarkers: 1 }, 'the guest ran to its done marker and halted');
  return machine;
}

/** Runs touch.S again from the start, over a new table. */
function touchAgain(machine: ReturnType<typeof touchMachine>, pages: readonly number[]): void {
  writeTouchTable(machine.memory, logPageAddrs(machine, pages));
  enterRealMode(machine.vcpu, LOAD_ADDR);
  runTouch(machine.vcpu);
}

t.test('the bitmap names exactly the pages the guest wrote', { skip: noKvm }, async (t) => {
  const machine = touchedMachine(t);
  const log = machine.vm.getDirtyLog(1);
  t.equal(log.length, 8, '64 pages make one 64-bit word');
  t.same(log, dirtyBitmap(LOG_PAGES, TOUCHED));
  const memory = new DataView(machine.memory.buffer);
  t.same(
    TOUCHED.map((page) => memory.getUint16(machine.logBase + page * PAGE_BYTES, true)),
    TOUCHED.map((_, i) => touchValue(i)),
    'each touched page holds 0xA500 + its table index',
  );
});

t.test('KVM_GET_DIRTY_LOG clears what it returns and re-arms the pages', { skip: noKvm }, async (t) => {
  const machine = touchedMachine(t);
  t.same(machine.vm.getDirtyLog(1), dirtyBitmap(LOG_PAGES, TOUCHED));
  t.same(machine.vm.getDirtyLog(1), dirtyBitmap(LOG_PAGES, []), 'the second call finds nothing new');
  touchAgain(machine, [7]);
  t.same(machine.vm.getDirtyLog(1), dirtyBitmap(LOG_PAGES, [7]), 'a page written again is reported again');
});

t.test('getDirtyLog fills a caller-provided bitmap', { skip: noKvm }, async (t) => {
  const machine = touchedMachine(t);
  const into = new Uint8Array(8).fill(0xee);
  t.equal(machine.vm.getDirtyLog(1, into), into, 'returns the bitmap it was given');
  t.same(into, dirtyBitmap(LOG_PAGES, TOUCHED), 'overwritten in full, stale bits included');
});

t.test('getDirtyLog rejects slots without a log and bitmaps of the wrong size', { skip: noKvm }, async (t) => {
  const machine = touchedMachine(t);
  const { vm } = machine;
  t.throws(() => vm.getDirtyLog(0), RangeError, 'slot 0 does not log dirty pages');
  t.throws(() => vm.getDirtyLog(5), RangeError, 'slot 5 does not exist');
  t.throws(() => vm.getDirtyLog(-1), RangeError);
  t.throws(() => vm.getDirtyLog(1, new Uint8Array(7)), RangeError, 'one byte short');
  t.throws(() => vm.getDirtyLog(1, new Uint8Array(16)), RangeError, 'one word too long');
  t.throws(() => vm.getDirtyLog(1, new Uint16Array(4) as unknown as Uint8Array), TypeError);
  t.same(vm.getDirtyLog(1), dirtyBitmap(LOG_PAGES, TOUCHED), 'rejected calls did not consume the log');
});

t.test('writes by the host through memory.buffer are not in the log', { skip: noKvm }, async (t) => {
  // KVM sees only guest writes (they fault on write-protected pages, or set PML/D bits). The VMM's
  // own stores go straight to the mapping, so a VMM that migrates memory tracks them itself.
  const machine = touchedMachine(t, {}, [0]);
  machine.memory.bytes(machine.logBase + 5 * PAGE_BYTES, 4).set([1, 2, 3, 4]);
  new DataView(machine.memory.buffer).setUint32(machine.logBase + 9 * PAGE_BYTES, 0xdeadbeef, true);
  t.same(machine.vm.getDirtyLog(1), dirtyBitmap(LOG_PAGES, [0]), 'only the guest-written page 0');
  t.same(machine.vm.getDirtyLog(1), dirtyBitmap(LOG_PAGES, []));
});

t.test('manual protect: the log stays set until clearDirtyLog', { skip: noKvm }, async (t) => {
  const machine = touchedMachine(t, manualProtect(DirtyLogManual.ProtectEnable));
  const { vm } = machine;
  t.same(vm.getDirtyLog(1), dirtyBitmap(LOG_PAGES, TOUCHED));
  t.same(vm.getDirtyLog(1), dirtyBitmap(LOG_PAGES, TOUCHED), 'KVM_GET_DIRTY_LOG no longer clears');
  vm.clearDirtyLog(1, 0, LOG_PAGES);
  t.same(vm.getDirtyLog(1), dirtyBitmap(LOG_PAGES, []), 'cleared without a bitmap: every page');
  touchAgain(machine, [3]);
  t.same(vm.getDirtyLog(1), dirtyBitmap(LOG_PAGES, [3]), 'a cleared page is tracked again');
});

t.test('manual protect: a bitmap clears only the pages it names', { skip: noKvm }, async (t) => {
  const machine = touchedMachine(t, manualProtect(DirtyLogManual.ProtectEnable));
  const { vm } = machine;
  vm.clearDirtyLog(1, 0, LOG_PAGES, dirtyBitmap(LOG_PAGES, [0, 7]));
  t.same(vm.getDirtyLog(1), dirtyBitmap(LOG_PAGES, [3, 8, 63]));
  vm.clearDirtyLog(1, 0, LOG_PAGES, dirtyBitmap(LOG_PAGES, [3, 8, 63]));
  t.same(vm.getDirtyLog(1), dirtyBitmap(LOG_PAGES, []));
});

t.test('clearDirtyLog checks its range against the slot', { skip: noKvm }, async (t) => {
  const machine = touchedMachine(t, manualProtect(DirtyLogManual.ProtectEnable));
  const { vm } = machine;
  t.throws(() => vm.clearDirtyLog(1, 32, 32), RangeError, 'firstPage must be a multiple of 64');
  t.throws(() => vm.clearDirtyLog(1, 0, LOG_PAGES + 1), RangeError, 'one page past the slot');
  t.throws(() => vm.clearDirtyLog(1, 64, 64), RangeError, 'starts at the end of the slot');
  t.throws(() => vm.clearDirtyLog(1, 0, 32), RangeError, 'a partial word that does not end the slot');
  t.throws(() => vm.clearDirtyLog(1, 0, LOG_PAGES, new Uint8Array(4)), RangeError, 'bitmap shorter than numPages');
  t.throws(() => vm.clearDirtyLog(5, 0, 64), RangeError, 'slot 5 does not exist');
  t.throws(() => vm.clearDirtyLog(0, 0, 64), RangeError, 'slot 0 does not log dirty pages, as getDirtyLog(0) says');
  t.throws(() => vm.clearDirtyLog(1, -64, 64), RangeError);
  t.same(vm.getDirtyLog(1), dirtyBitmap(LOG_PAGES, TOUCHED), 'rejected calls cleared nothing');
});

t.test('manual protect with KVM_DIRTY_LOG_INITIALLY_SET: a new slot starts all dirty', { skip: noKvm }, async (t) => {
  const machine = touchMachine(manualProtect(DirtyLogManual.ProtectEnable | DirtyLogManual.InitiallySet));
  t.teardown(() => machine.close());
  const { vm } = machine;
  const allPages = Array.from({ length: LOG_PAGES }, (_, page) => page);
  t.same(vm.getDirtyLog(1), dirtyBitmap(LOG_PAGES, allPages), 'before the guest ran at all');
  vm.clearDirtyLog(1, 0, LOG_PAGES);
  t.same(vm.getDirtyLog(1), dirtyBitmap(LOG_PAGES, []));
  writeTouchTable(machine.memory, logPageAddrs(machine, TOUCHED));
  runTouch(machine.vcpu);
  t.same(vm.getDirtyLog(1), dirtyBitmap(LOG_PAGES, TOUCHED), 'then only what the guest writes');
});

t.test('a closed VM refuses getDirtyLog with EBADF', { skip: noKvm }, async (t) => {
  const machine = touchedMachine(t);
  machine.vcpu.close();
  machine.vm.close();
  t.throws(() => machine.vm.getDirtyLog(1), KvmError);
  t.throws(() => machine.vm.getDirtyLog(1), { code: 'EBADF' });
});
