// Bad input at every public entry point: wrong types and out-of-range values throw a TypeError or
// RangeError that names the argument, with the code Node gives its own (ERR_INVALID_ARG_TYPE,
// ERR_OUT_OF_RANGE for a number outside its bounds, ERR_INVALID_ARG_VALUE for another refused
// value), kernel refusals throw a KvmError, closed handles throw EBADF, and nothing crashes the
// process. The raw addon gets the same treatment.
import { constants as bufferConstants } from 'node:buffer';
import { spawnSync } from 'node:child_process';
import t, { type Test } from 'tap';
import {
  Cap, EventFd, GuestMemory, harvestDirtyRing, kickVcpu, Kvm, KvmError, Vm,
} from '../../lib/index.js';
import { native, ops } from '../../lib/kvm/native.js';
import { guestImage, noKvm, realModeMachine, runToHalt } from '../helpers/kvm.js';
import { FixtureWorker } from '../helpers/worker.js';

type ErrorClass = new (...args: never[]) => Error;

const HELLO = 'Hello from node-kvm!\n';
const MiB = 1 << 20;

/** The class that comes with each argument error's code. */
const ARG_ERROR_CLASS: Record<ArgErrorCode, ErrorClass> = { ERR_INVALID_ARG_TYPE: TypeError, ERR_OUT_OF_RANGE: RangeError, ERR_INVALID_ARG_VALUE: RangeError };
type ArgErrorCode = 'ERR_INVALID_ARG_TYPE' | 'ERR_OUT_OF_RANGE' | 'ERR_INVALID_ARG_VALUE';

/** Asserts that `fn` throws the argument error `code` (a TypeError or RangeError) whose message matches `message`. */
function rejects(t: Test, label: string, fn: () => unknown, code: ArgErrorCode, message: RegExp): void {
  let error: unknown;
  try {
    fn();
  } catch (caught) {
    error = caught;
  }
  if (error === undefined) {
    t.fail(`${label}: did not throw`);
    return;
  }
  t.type(error, ARG_ERROR_CLASS[code], `${label}: ${ARG_ERROR_CLASS[code].name}`);
  t.equal((error as { code?: unknown }).code, code, `${label}: code ${code}`);
  t.match((error as Error).message, message, `${label}: message matches ${message}`);
}

/** Asserts that `fn` throws a KvmError with these fields. */
function rejectsKvm(t: Test, label: string, fn: () => unknown, expected: { code: string; errno?: number; syscall?: string }): void {
  let error: unknown;
  try {
    fn();
  } catch (caught) {
    error = caught;
  }
  t.type(error, KvmError, `${label}: KvmError`);
  t.match(error, expected, `${label}: ${JSON.stringify(expected)}`);
}

function openKvm(t: Test): Kvm {
  const kvm = Kvm.open();
  t.teardown(() => kvm.close());
  return kvm;
}

function openVm(t: Test, kvm = openKvm(t)): Vm {
  const vm = kvm.createVm();
  t.teardown(() => vm.close());
  return vm;
}

function createMemory(t: Test, size = MiB): GuestMemory {
  const memory = GuestMemory.create(size);
  t.teardown(() => memory.close());
  return memory;
}

t.test('Kvm: open, checkExtension, createVm', { skip: noKvm }, async (t) => {
  rejects(t, 'Kvm.open(42)', () => Kvm.open(42 as unknown as string), 'ERR_INVALID_ARG_TYPE', /path/);
  const kvm = openKvm(t);
  rejects(t, "checkExtension('x')", () => kvm.checkExtension('x' as unknown as number), 'ERR_INVALID_ARG_TYPE', /cap/);
  rejects(t, 'checkExtension(-1)', () => kvm.checkExtension(-1), 'ERR_OUT_OF_RANGE', /cap/);
  rejects(t, 'checkExtension(1.5)', () => kvm.checkExtension(1.5), 'ERR_OUT_OF_RANGE', /cap/);
  rejects(t, 'createVm(-1)', () => kvm.createVm(-1), 'ERR_OUT_OF_RANGE', /type/);
  rejects(t, "createVm('0')", () => kvm.createVm('0' as unknown as number), 'ERR_INVALID_ARG_TYPE', /type/);
  rejects(t, 'getMsrs(3)', () => kvm.getMsrs(3 as unknown as number[]), 'ERR_INVALID_ARG_TYPE', /indices/);
});

t.test('Vm.createVcpu: id type and range, duplicate ids', { skip: noKvm }, async (t) => {
  const vm = openVm(t);
  rejects(t, 'createVcpu(-1)', () => vm.createVcpu(-1), 'ERR_OUT_OF_RANGE', /id/);
  rejects(t, "createVcpu('0')", () => vm.createVcpu('0' as unknown as number), 'ERR_INVALID_ARG_TYPE', /id/);
  rejects(t, 'createVcpu(2**32)', () => vm.createVcpu(2 ** 32), 'ERR_OUT_OF_RANGE', /id/);
  const vcpu = vm.createVcpu(0);
  t.teardown(() => vcpu.close());
  rejectsKvm(t, 'createVcpu(0) twice', () => vm.createVcpu(0), { code: 'EEXIST', errno: -17, syscall: 'ioctl(KVM_CREATE_VCPU)' });
});

t.test('Vm.setUserMemoryRegion validates the region before the ioctl', { skip: noKvm }, async (t) => {
  const vm = openVm(t);
  const memory = createMemory(t);
  type Region = Parameters<Vm['setUserMemoryRegion']>[0];
  const bad = (region: Record<string, unknown>) => () => vm.setUserMemoryRegion(region as unknown as Region);
  rejects(t, 'region null', bad(null as unknown as Record<string, unknown>), 'ERR_INVALID_ARG_TYPE', /region/);
  rejects(t, 'memory missing', bad({ slot: 0, guestPhysAddr: 0 }), 'ERR_INVALID_ARG_TYPE', /memory/);
  rejects(t, 'memory {}', bad({ slot: 0, guestPhysAddr: 0, memory: {} }), 'ERR_INVALID_ARG_TYPE', /memory/);
  rejects(t, 'memory a plain ArrayBuffer', bad({ slot: 0, guestPhysAddr: 0, memory: new ArrayBuffer(4096) }), 'ERR_INVALID_ARG_TYPE', /memory/);
  rejects(t, 'slot -1', bad({ slot: -1, guestPhysAddr: 0, memory }), 'ERR_OUT_OF_RANGE', /slot/);
  rejects(t, "slot '0'", bad({ slot: '0', guestPhysAddr: 0, memory }), 'ERR_INVALID_ARG_TYPE', /slot/);
  rejects(t, 'guestPhysAddr 0x1001', bad({ slot: 0, guestPhysAddr: 0x1001, memory }), 'ERR_INVALID_ARG_VALUE', /guestPhysAddr/);
  rejects(t, 'guestPhysAddr -4096', bad({ slot: 0, guestPhysAddr: -4096, memory }), 'ERR_OUT_OF_RANGE', /guestPhysAddr/);
  rejects(t, "guestPhysAddr '0'", bad({ slot: 0, guestPhysAddr: '0', memory }), 'ERR_INVALID_ARG_TYPE', /guestPhysAddr/);
  rejects(t, 'guestPhysAddr 2^64', bad({ slot: 0, guestPhysAddr: 1n << 64n, memory }), 'ERR_OUT_OF_RANGE', /guestPhysAddr/);
  rejects(t, 'size 4097', bad({ slot: 0, guestPhysAddr: 0, memory, size: 4097 }), 'ERR_INVALID_ARG_VALUE', /size/);
  rejects(t, 'size 0', bad({ slot: 0, guestPhysAddr: 0, memory, size: 0 }), 'ERR_OUT_OF_RANGE', /size/);
  rejects(t, 'offset 100', bad({ slot: 0, guestPhysAddr: 0, memory, offset: 100 }), 'ERR_INVALID_ARG_VALUE', /offset/);
  rejects(t, 'offset + size beyond the memory', bad({ slot: 0, guestPhysAddr: 0, memory, offset: MiB, size: 4096 }), 'ERR_OUT_OF_RANGE', /offset/);
  rejects(t, 'flags "x"', bad({ slot: 0, guestPhysAddr: 0, memory, flags: 'x' }), 'ERR_INVALID_ARG_TYPE', /flags/);
  rejects(t, 'flags 1', bad({ slot: 0, guestPhysAddr: 0, memory, flags: 1 }), 'ERR_INVALID_ARG_TYPE', /flags/);
  const closed = GuestMemory.create(4096);
  closed.close();
  rejectsKvm(t, 'a closed GuestMemory', bad({ slot: 0, guestPhysAddr: 0, memory: closed }), { code: 'EBADF' });
  vm.setUserMemoryRegion({ slot: 0, guestPhysAddr: 0, memory });
  rejectsKvm(t, 'a second slot over the same guest-physical range', bad({ slot: 1, guestPhysAddr: 0x80000, memory }), {
    code: 'EEXIST', errno: -17, syscall: 'ioctl(KVM_SET_USER_MEMORY_REGION)',
  });
  rejects(t, 'deleteUserMemoryRegion(-1)', () => vm.deleteUserMemoryRegion(-1), 'ERR_OUT_OF_RANGE', /slot/);
});

// Without `size`, the default (the rest of the memory after `offset`) is negative; the error must
// still blame the offset that caused it.
t.test('Vm.setUserMemoryRegion: an offset past the end of the memory, no size', { skip: noKvm }, async (t) => {
  const vm = openVm(t);
  const memory = createMemory(t);
  rejects(t, 'offset = memory.size + 4096', () => vm.setUserMemoryRegion({ slot: 0, guestPhysAddr: 0, memory, offset: MiB + 4096 }), 'ERR_OUT_OF_RANGE', /offset/);
});

t.test('Vcpu: struct arguments are checked field by field', { skip: noKvm }, async (t) => {
  const kvm = openKvm(t);
  const vm = openVm(t, kvm);
  vm.createIrqChip();
  const vcpu = vm.createVcpu(0);
  t.teardown(() => vcpu.close());
  const regs = vcpu.getRegs();
  rejects(t, 'setRegs({})', () => vcpu.setRegs({} as unknown as typeof regs), 'ERR_INVALID_ARG_TYPE', /regs\.rax is missing/);
  rejects(t, 'setRegs(null)', () => vcpu.setRegs(null as unknown as typeof regs), 'ERR_INVALID_ARG_TYPE', /regs/);
  rejects(t, "rip 'x'", () => vcpu.setRegs({ ...regs, rip: 'x' as unknown as bigint }), 'ERR_INVALID_ARG_TYPE', /regs\.rip/);
  rejects(t, 'rip -1n', () => vcpu.setRegs({ ...regs, rip: -1n }), 'ERR_OUT_OF_RANGE', /regs\.rip/);
  rejects(t, 'rip 2n**64n', () => vcpu.setRegs({ ...regs, rip: 2n ** 64n }), 'ERR_OUT_OF_RANGE', /regs\.rip/);
  rejects(t, 'rip 1.5', () => vcpu.setRegs({ ...regs, rip: 1.5 as unknown as bigint }), 'ERR_INVALID_ARG_TYPE', /regs\.rip/);

  const sregs = vcpu.getSregs();
  rejects(t, "sregs.cs 'x'", () => vcpu.setSregs({ ...sregs, cs: 'x' as unknown as typeof sregs.cs }), 'ERR_INVALID_ARG_TYPE', /sregs\.cs/);
  rejects(t, "sregs.cs.selector '8'", () => vcpu.setSregs({ ...sregs, cs: { ...sregs.cs, selector: '8' as unknown as number } }), 'ERR_INVALID_ARG_TYPE', /sregs\.cs\.selector/);
  rejects(t, 'sregs.cs.type 256', () => vcpu.setSregs({ ...sregs, cs: { ...sregs.cs, type: 256 } }), 'ERR_OUT_OF_RANGE', /sregs\.cs\.type/);
  rejects(t, 'sregs.interruptBitmap of 3', () => vcpu.setSregs({ ...sregs, interruptBitmap: [0n, 0n, 0n] }), 'ERR_INVALID_ARG_VALUE', /sregs\.interruptBitmap/);
  rejects(t, 'sregs.gdt.limit 65536', () => vcpu.setSregs({ ...sregs, gdt: { ...sregs.gdt, limit: 65536 } }), 'ERR_OUT_OF_RANGE', /sregs\.gdt\.limit/);

  rejects(t, "setMsrs('x')", () => vcpu.setMsrs('x' as unknown as []), 'ERR_INVALID_ARG_TYPE', /msr entries/);
  rejects(t, 'getMsrs([{}])', () => vcpu.getMsrs([{}] as unknown as number[]), 'ERR_INVALID_ARG_TYPE', /index/);
  rejects(t, 'getMsrs(-1 index)', () => vcpu.getMsrs([-1]), 'ERR_OUT_OF_RANGE', /index/);
  rejects(t, "setMsrs data 'x'", () => vcpu.setMsrs([{ index: 0x10, data: 'x' as unknown as bigint }]), 'ERR_INVALID_ARG_TYPE', /data/);

  const entry = { function: 0, index: 0, flags: 0, eax: 0, ebx: 0, ecx: 0, edx: 0 };
  rejects(t, 'setCpuid2 with 5000 entries (addon limit)', () => vcpu.setCpuid2(Array.from({ length: 5000 }, () => entry)), 'ERR_OUT_OF_RANGE', /KVM_SET_CPUID2 count is too large/);
  rejects(t, "setCpuid2('x')", () => vcpu.setCpuid2('x' as unknown as []), 'ERR_INVALID_ARG_TYPE', /cpuid entries/);

  rejects(t, 'setXsave(10 bytes)', () => vcpu.setXsave(new Uint8Array(10)), 'ERR_INVALID_ARG_VALUE', /KVM_SET_XSAVE needs \d+ bytes, got 10/);
  rejects(t, 'setXsave([])', () => vcpu.setXsave([] as unknown as Uint8Array), 'ERR_INVALID_ARG_TYPE', /xsave/);
  rejects(t, 'setLapic regs of 1023 bytes', () => vcpu.setLapic({ regs: new Uint8Array(1023) }), 'ERR_INVALID_ARG_VALUE', /lapicState\.regs must hold exactly 1024 bytes/);
  rejects(t, 'setLapic regs an array', () => vcpu.setLapic({ regs: [] as unknown as Uint8Array }), 'ERR_INVALID_ARG_TYPE', /lapicState\.regs/);
  rejects(t, 'setXcrs of 17', () => vcpu.setXcrs(Array.from({ length: 17 }, () => ({ xcr: 0, value: 1n }))), 'ERR_INVALID_ARG_VALUE', /xcrs/);
  rejects(t, "setMpState('x')", () => vcpu.setMpState('x' as unknown as number), 'ERR_INVALID_ARG_TYPE', /mpState/);
  rejects(t, 'setGuestDebug debugreg of 2', () => vcpu.setGuestDebug({ debugreg: [0n, 0n] }), 'ERR_INVALID_ARG_VALUE', /debugreg/);
  rejects(t, "setGuestDebug('x')", () => vcpu.setGuestDebug('x' as unknown as null), 'ERR_INVALID_ARG_TYPE', /options/);
  rejects(t, 'interrupt(256)', () => vcpu.interrupt(256), 'ERR_OUT_OF_RANGE', /irq/);
  rejects(t, 'setTscKhz(0)', () => vcpu.setTscKhz(0), 'ERR_OUT_OF_RANGE', /khz/);
  rejects(t, 'translate(-1)', () => vcpu.translate(-1), 'ERR_OUT_OF_RANGE', /guestVirtAddr/);
  rejects(t, 'setNestedState of 4 bytes', () => vcpu.setNestedState(new Uint8Array(4)), 'ERR_INVALID_ARG_VALUE', /nested state/);
  rejects(t, "harvestDirtyRing('x')", () => vcpu.harvestDirtyRing('x' as unknown as Float64Array), 'ERR_INVALID_ARG_TYPE', /Float64Array/);
  rejects(t, 'enableCap with 5 args', () => vcpu.enableCap(0, [0, 0, 0, 0, 0]), 'ERR_INVALID_ARG_TYPE', /args/);
  rejects(t, 'enableCap arg -1', () => vcpu.enableCap(0, [-1]), 'ERR_OUT_OF_RANGE', /args\[0\]/);
  // Its args[0] is a host pointer the kernel writes through: refused before the ioctl.
  rejects(t, 'enableCap(Cap.HypervEnlightenedVmcs)', () => vcpu.enableCap(Cap.HypervEnlightenedVmcs, [0x1000]), 'ERR_INVALID_ARG_VALUE', /KVM_CAP_HYPERV_ENLIGHTENED_VMCS/);
});

t.test('Vm: interrupts, eventfds, addresses and dirty logs', { skip: noKvm }, async (t) => {
  const vm = openVm(t);
  vm.createIrqChip();
  const eventfd = EventFd.create();
  t.teardown(() => eventfd.close());
  rejects(t, "setIrqLine('a', 1)", () => vm.setIrqLine('a' as unknown as number, 1), 'ERR_INVALID_ARG_TYPE', /irq/);
  rejects(t, 'setIrqLine(-1, 1)', () => vm.setIrqLine(-1, 1), 'ERR_OUT_OF_RANGE', /irq/);
  rejects(t, 'registerIrqfd(-1, 0)', () => vm.registerIrqfd(-1, 0), 'ERR_OUT_OF_RANGE', /eventfd/);
  rejects(t, "registerIrqfd('3', 0)", () => vm.registerIrqfd('3' as unknown as number, 0), 'ERR_INVALID_ARG_TYPE', /eventfd/);
  rejects(t, 'registerIrqfd(eventfd, -1)', () => vm.registerIrqfd(eventfd, -1), 'ERR_OUT_OF_RANGE', /gsi/);
  rejects(t, 'registerIrqfd resampleFd 1.5', () => vm.registerIrqfd(eventfd, 0, 1.5), 'ERR_OUT_OF_RANGE', /resampleFd/);
  rejects(t, 'registerIoeventfd len 3', () => vm.registerIoeventfd({ addr: 0, len: 3 }, eventfd), 'ERR_INVALID_ARG_VALUE', /len/);
  rejects(t, 'registerIoeventfd len 16', () => vm.registerIoeventfd({ addr: 0, len: 16 }, eventfd), 'ERR_OUT_OF_RANGE', /len/);
  rejects(t, 'registerIoeventfd addr -1', () => vm.registerIoeventfd({ addr: -1, len: 4 }, eventfd), 'ERR_OUT_OF_RANGE', /addr/);
  rejects(t, 'registerIoeventfd datamatch 2^64', () => vm.registerIoeventfd({ addr: 0, len: 4, datamatch: 1n << 64n }, eventfd), 'ERR_OUT_OF_RANGE', /datamatch/);
  rejects(t, 'registerIoeventfd(null)', () => vm.registerIoeventfd(null as unknown as { addr: 0; len: 0 }, eventfd), 'ERR_INVALID_ARG_TYPE', /options/);
  rejects(t, 'setTssAddr(2**40)', () => vm.setTssAddr(2 ** 40), 'ERR_OUT_OF_RANGE', /addr/);
  rejects(t, "setTssAddr('x')", () => vm.setTssAddr('x' as unknown as number), 'ERR_INVALID_ARG_TYPE', /addr/);
  rejects(t, 'setIdentityMapAddr(-1)', () => vm.setIdentityMapAddr(-1), 'ERR_OUT_OF_RANGE', /addr/);
  rejects(t, 'getIrqChip(3)', () => vm.getIrqChip(3), 'ERR_OUT_OF_RANGE', /chip/);
  rejects(t, 'signalMsi(null)', () => vm.signalMsi(null as unknown as { addressLo: 0; data: 0 }), 'ERR_INVALID_ARG_TYPE', /msi/);
  rejects(t, "signalMsi addressLo 'x'", () => vm.signalMsi({ addressLo: 'x' as unknown as number, data: 0 }), 'ERR_INVALID_ARG_TYPE', /addressLo/);
  rejects(t, "setGsiRouting('x')", () => vm.setGsiRouting('x' as unknown as []), 'ERR_INVALID_ARG_TYPE', /entries/);
  rejects(t, 'setGsiRouting type bogus', () => vm.setGsiRouting([{ gsi: 0, type: 'bogus' } as unknown as { gsi: 0; type: 'irqchip'; irqchip: 0; pin: 0 }]), 'ERR_INVALID_ARG_VALUE', /entries\[0\]\.type/);
  rejects(t, 'setGsiRouting irqchip 3', () => vm.setGsiRouting([{ gsi: 0, type: 'irqchip', irqchip: 3, pin: 0 }]), 'ERR_OUT_OF_RANGE', /entries\[0\]\.irqchip/);
  rejects(t, 'enableDirtyRing(4097)', () => vm.enableDirtyRing(4097), 'ERR_INVALID_ARG_VALUE', /bytes/);
  rejects(t, 'createPit2 flags -1', () => vm.createPit2(-1), 'ERR_OUT_OF_RANGE', /flags/);
  rejects(t, 'createPit2(null)', () => vm.createPit2(null as unknown as number), 'ERR_INVALID_ARG_TYPE', /^flags must be a number or an object$/);
  rejects(t, 'clearDirtyLog on a slot that does not exist', () => vm.clearDirtyLog(7, 0, 64), 'ERR_INVALID_ARG_VALUE', /slot 7/);
  rejects(t, 'getDirtyLog on a slot that does not exist', () => vm.getDirtyLog(7), 'ERR_INVALID_ARG_VALUE', /slot 7/);
  const memory = createMemory(t);
  vm.setUserMemoryRegion({ slot: 0, guestPhysAddr: 0, memory });
  rejects(t, 'getDirtyLog on a slot that does not log', () => vm.getDirtyLog(0), 'ERR_INVALID_ARG_VALUE', /slot 0 does not log dirty pages/);
  rejects(t, 'Vm.fromFd(-1)', () => Vm.fromFd(-1), 'ERR_OUT_OF_RANGE', /fd/);
  rejects(t, "Vm.fromFd('3')", () => Vm.fromFd('3' as unknown as number), 'ERR_INVALID_ARG_TYPE', /fd/);
  rejectsKvm(t, 'Vm.fromFd of an fd that is no VM', () => Vm.fromFd(eventfd.fd), { code: 'EBADF' });
});

t.test('GuestMemory, EventFd and the cross-thread helpers', async (t) => {
  rejects(t, "GuestMemory.create('4096')", () => GuestMemory.create('4096' as unknown as number), 'ERR_INVALID_ARG_TYPE', /size/);
  rejects(t, 'GuestMemory.create(4097)', () => GuestMemory.create(4097), 'ERR_INVALID_ARG_VALUE', /size/);
  rejects(t, "GuestMemory.attach({guestMemory: 'x'})", () => GuestMemory.attach({ guestMemory: 'x' } as unknown as { guestMemory: number }), 'ERR_INVALID_ARG_TYPE', /handle/);
  rejects(t, 'GuestMemory.attach({guestMemory: 1.5})', () => GuestMemory.attach({ guestMemory: 1.5 }), 'ERR_OUT_OF_RANGE', /memory/);
  rejectsKvm(t, 'GuestMemory.attach of an id never issued', () => GuestMemory.attach({ guestMemory: 0xfffffff0 }), { code: 'EBADF' });
  const memory = createMemory(t, 4096);
  rejects(t, 'bytes(-1)', () => memory.bytes(-1), 'ERR_OUT_OF_RANGE', /offset/);
  rejects(t, 'bytes(0, 4097)', () => memory.bytes(0, 4097), 'ERR_OUT_OF_RANGE', /outside guest memory/);
  rejects(t, "write(0, 'x')", () => memory.write(0, 'x' as unknown as Uint8Array), 'ERR_INVALID_ARG_TYPE', /data/);
  rejects(t, 'bytes(2n**40n)', () => memory.bytes(2n ** 40n as unknown as number), 'ERR_OUT_OF_RANGE', /^\[1099511627776, 1099511627776\) is outside guest memory of 4096 bytes$/);
  rejects(t, 'bytes(4097)', () => memory.bytes(4097), 'ERR_OUT_OF_RANGE', /^\[4097, 4097\) is outside guest memory of 4096 bytes$/);
  t.equal(memory.bytes(4096).length, 0, 'bytes(size) is the empty view at the end');
  t.equal(memory.bytes(1n as unknown as number).length, 4095, 'a bigint offset: the view runs to the end');
  rejects(t, 'EventFd.create(null)', () => EventFd.create(null as unknown as {}), 'ERR_INVALID_ARG_TYPE', /^options must be an object$/);
  rejects(t, 'EventFd.create initialValue -1', () => EventFd.create({ initialValue: -1 }), 'ERR_OUT_OF_RANGE', /initialValue/);
  rejects(t, "kickVcpu('x')", () => kickVcpu('x' as unknown as { vcpuKick: number }), 'ERR_INVALID_ARG_TYPE', /handle/);
  rejects(t, "harvestDirtyRing('x')", () => harvestDirtyRing('x' as unknown as { vcpuKick: number }, new Float64Array(2)), 'ERR_INVALID_ARG_TYPE', /handle/);
  t.equal(kickVcpu({ vcpuKick: 0xfffffff0 }), false, 'kicking a vCPU id never issued reports false');
  rejectsKvm(t, 'harvestDirtyRing of an id never issued', () => harvestDirtyRing({ vcpuKick: 0xfffffff0 }, new Float64Array(2)), { code: 'EBADF' });
});

// eventfd(2): the counter takes 0..2^64-2 per write.
t.test('EventFd.write checks its value', async (t) => {
  const eventfd = EventFd.create();
  t.teardown(() => eventfd.close());
  rejects(t, "write('1')", () => eventfd.write('1' as unknown as number), 'ERR_INVALID_ARG_TYPE', /value/);
  rejects(t, 'write({})', () => eventfd.write({} as unknown as number), 'ERR_INVALID_ARG_TYPE', /value/);
  rejects(t, 'write(-1)', () => eventfd.write(-1), 'ERR_OUT_OF_RANGE', /value/);
  rejects(t, 'write(1.5)', () => eventfd.write(1.5), 'ERR_OUT_OF_RANGE', /value/);
  rejects(t, 'write(2n**64n - 1n)', () => eventfd.write(2n ** 64n - 1n), 'ERR_OUT_OF_RANGE', /value/);
  eventfd.read(); // whatever a lenient write() above may have added
  eventfd.write(2n ** 64n - 2n);
  rejectsKvm(t, 'write past the counter maximum on a non-blocking eventfd', () => eventfd.write(1), { code: 'EAGAIN', syscall: 'write(eventfd)' });
  t.equal(eventfd.read(), 2n ** 64n - 2n, 'the counter holds the largest value');
});

// A closed EventFd's fd number goes back to the kernel and names the next file opened; using the
// closed object must not reach that file.
t.test('a closed EventFd passed to registerIrqfd or registerIoeventfd is refused', { skip: noKvm }, async (t) => {
  const vm = openVm(t);
  vm.createIrqChip();
  const closed = EventFd.create();
  closed.close();
  const reuser = EventFd.create();
  t.teardown(() => reuser.close());
  t.equal(reuser.fd, closed.fd, 'the next eventfd reuses the number');
  rejectsKvm(t, 'registerIrqfd(closed)', () => vm.registerIrqfd(closed, 5), { code: 'EBADF' });
  rejectsKvm(t, 'registerIoeventfd(closed)', () => vm.registerIoeventfd({ addr: 0x1000, len: 4 }, closed), { code: 'EBADF' });
});

// Every method of a closed handle, with arguments that are valid for the open one.
t.test('every Kvm, Vm, Vcpu, GuestMemory and EventFd method after close() throws EBADF', { skip: noKvm }, async (t) => {
  const kvm = Kvm.open();
  const featureMsrs = kvm.getMsrFeatureIndexList();
  const vm = kvm.createVm();
  vm.createIrqChip();
  vm.createPit2();
  const pit = vm.getPit2();
  const pic = vm.getIrqChip(0);
  const clock = vm.getClock();
  const memory = GuestMemory.create(MiB);
  const slotMemory = GuestMemory.create(MiB);
  vm.setUserMemoryRegion({ slot: 0, guestPhysAddr: 0, memory: slotMemory, flags: { logDirtyPages: true } });
  const eventfd = EventFd.create();
  const vcpu = vm.createVcpu(0);
  const cpuid = kvm.getSupportedCpuid();
  vcpu.setCpuid2(cpuid);
  const state = {
    regs: vcpu.getRegs(), sregs: vcpu.getSregs(), fpu: vcpu.getFpu(), lapic: vcpu.getLapic(), xsave: vcpu.getXsave(),
    xcrs: vcpu.getXcrs(), events: vcpu.getVcpuEvents(), debugRegs: vcpu.getDebugRegs(), khz: vcpu.getTscKhz(),
  };
  const nested = new Uint8Array(128);
  new DataView(nested.buffer).setUint32(4, 128, true);
  const kickHandle = vcpu.kickHandle;
  const memoryHandle = memory.handle;

  vcpu.close();
  vm.close();
  kvm.close();
  memory.close();
  eventfd.close();
  slotMemory.close();
  const fresh: GuestMemory[] = [];
  t.teardown(() => fresh.forEach((m) => m.close()));
  const freshMemory = () => {
    fresh.push(GuestMemory.create(MiB));
    return fresh[fresh.length - 1]!;
  };

  const calls: [string, () => unknown][] = [
    ['kvm.apiVersion', () => kvm.apiVersion],
    ['kvm.checkExtension', () => kvm.checkExtension(Cap.Irqchip)],
    ['kvm.vcpuMmapSize', () => kvm.vcpuMmapSize],
    ['kvm.maxVcpus', () => kvm.maxVcpus],
    ['kvm.nrMemslots', () => kvm.nrMemslots],
    ['kvm.getSupportedCpuid', () => kvm.getSupportedCpuid()],
    ['kvm.getEmulatedCpuid', () => kvm.getEmulatedCpuid()],
    ['kvm.getMsrIndexList', () => kvm.getMsrIndexList()],
    ['kvm.getMsrFeatureIndexList', () => kvm.getMsrFeatureIndexList()],
    ['kvm.getMsrs', () => kvm.getMsrs(featureMsrs.slice(0, 1))],
    ['kvm.createVm', () => kvm.createVm()],
    ['vm.checkExtension', () => vm.checkExtension(Cap.Irqchip)],
    ['vm.enableCap', () => vm.enableCap(Cap.ManualDirtyLogProtect2, [1])],
    ['vm.setUserMemoryRegion', () => vm.setUserMemoryRegion({ slot: 1, guestPhysAddr: MiB, memory: freshMemory() })],
    ['vm.deleteUserMemoryRegion', () => vm.deleteUserMemoryRegion(0)],
    ['vm.createVcpu', () => vm.createVcpu(1)],
    ['vm.setBootCpuId', () => vm.setBootCpuId(0)],
    ['vm.createIrqChip', () => vm.createIrqChip()],
    ['vm.createPit2', () => vm.createPit2()],
    ['vm.getPit2', () => vm.getPit2()],
    ['vm.setPit2', () => vm.setPit2(pit)],
    ['vm.getIrqChip', () => vm.getIrqChip(0)],
    ['vm.setIrqChip', () => vm.setIrqChip(pic)],
    ['vm.setIrqLine', () => vm.setIrqLine(4, 1)],
    ['vm.signalMsi', () => vm.signalMsi({ addressLo: 0xfee00000, data: 0x30 })],
    ['vm.setGsiRouting', () => vm.setGsiRouting([{ gsi: 4, type: 'irqchip', irqchip: 0, pin: 4 }])],
    ['vm.registerIrqfd', () => vm.registerIrqfd(5, 4)],
    ['vm.unregisterIrqfd', () => vm.unregisterIrqfd(5, 4)],
    ['vm.registerIoeventfd', () => vm.registerIoeventfd({ addr: 0x1000, len: 4 }, 5)],
    ['vm.unregisterIoeventfd', () => vm.unregisterIoeventfd({ addr: 0x1000, len: 4 }, 5)],
    ['vm.setTssAddr', () => vm.setTssAddr(0xfffbd000)],
    ['vm.setIdentityMapAddr', () => vm.setIdentityMapAddr(0xfffbc000)],
    ['vm.getClock', () => vm.getClock()],
    ['vm.setClock', () => vm.setClock(clock)],
    ['vm.getDirtyLog', () => vm.getDirtyLog(0)],
    ['vm.clearDirtyLog', () => vm.clearDirtyLog(0, 0, 64)],
    ['vm.enableDirtyRing', () => vm.enableDirtyRing(65536)],
    ['vm.resetDirtyRings', () => vm.resetDirtyRings()],
    ['vcpu.run', () => vcpu.run()],
    ['vcpu.exit', () => vcpu.exit()],
    ['vcpu.kick', () => vcpu.kick()],
    ['vcpu.kickHandle', () => vcpu.kickHandle],
    ['vcpu.getRegs', () => vcpu.getRegs()],
    ['vcpu.setRegs', () => vcpu.setRegs(state.regs)],
    ['vcpu.getSregs', () => vcpu.getSregs()],
    ['vcpu.setSregs', () => vcpu.setSregs(state.sregs)],
    ['vcpu.getFpu', () => vcpu.getFpu()],
    ['vcpu.setFpu', () => vcpu.setFpu(state.fpu)],
    ['vcpu.getMsrs', () => vcpu.getMsrs([0x10])],
    ['vcpu.setMsrs', () => vcpu.setMsrs([{ index: 0x10, data: 0n }])],
    ['vcpu.setCpuid2', () => vcpu.setCpuid2(cpuid)],
    ['vcpu.getCpuid2', () => vcpu.getCpuid2()],
    ['vcpu.getLapic', () => vcpu.getLapic()],
    ['vcpu.setLapic', () => vcpu.setLapic(state.lapic)],
    ['vcpu.getXsave', () => vcpu.getXsave()],
    ['vcpu.setXsave', () => vcpu.setXsave(state.xsave)],
    ['vcpu.getXcrs', () => vcpu.getXcrs()],
    ['vcpu.setXcrs', () => vcpu.setXcrs(state.xcrs)],
    ['vcpu.getVcpuEvents', () => vcpu.getVcpuEvents()],
    ['vcpu.setVcpuEvents', () => vcpu.setVcpuEvents(state.events)],
    ['vcpu.getMpState', () => vcpu.getMpState()],
    ['vcpu.setMpState', () => vcpu.setMpState(0)],
    ['vcpu.getDebugRegs', () => vcpu.getDebugRegs()],
    ['vcpu.setDebugRegs', () => vcpu.setDebugRegs(state.debugRegs)],
    ['vcpu.getTscKhz', () => vcpu.getTscKhz()],
    ['vcpu.setTscKhz', () => vcpu.setTscKhz(state.khz)],
    ['vcpu.getNestedState', () => vcpu.getNestedState()],
    ['vcpu.setNestedState', () => vcpu.setNestedState(nested)],
    ['vcpu.translate', () => vcpu.translate(0)],
    ['vcpu.setGuestDebug', () => vcpu.setGuestDebug(null)],
    ['vcpu.kvmclockCtrl', () => vcpu.kvmclockCtrl()],
    ['vcpu.nmi', () => vcpu.nmi()],
    ['vcpu.smi', () => vcpu.smi()],
    ['vcpu.interrupt', () => vcpu.interrupt(0x20)],
    ['vcpu.enableCap', () => vcpu.enableCap(0)],
    ['vcpu.checkExtension', () => vcpu.checkExtension(Cap.Irqchip)],
    ['vcpu.harvestDirtyRing', () => vcpu.harvestDirtyRing(new Float64Array(2))],
    ['harvestDirtyRing(kickHandle)', () => harvestDirtyRing(kickHandle, new Float64Array(2))],
    ['memory.bytes', () => memory.bytes()],
    ['memory.write', () => memory.write(0, Uint8Array.of(1))],
    ['memory.handle', () => memory.handle],
    ['memory.nativeId', () => memory.nativeId],
    ['eventfd.write', () => eventfd.write(1)],
    ['eventfd.read', () => eventfd.read()],
  ];
  for (const [name, call] of calls) {
    let error: unknown;
    try {
      call();
    } catch (caught) {
      error = caught;
    }
    t.ok(isClosedError(error), `${name}: KvmError EBADF (got ${describe(error)})`);
  }
  t.equal(kickVcpu(kickHandle), false, 'kickVcpu on a closed vCPU reports false');
  // Once the closed view's finalizer has run, nothing holds the mapping: attach must fail.
  await new Promise<void>((resolve) => setImmediate(resolve));
  rejectsKvm(t, 'GuestMemory.attach of a closed memory', () => GuestMemory.attach(memoryHandle), { code: 'EBADF' });
  for (const handle of [kvm, vm, vcpu, memory, eventfd]) {
    t.doesNotThrow(() => handle.close(), `${handle.constructor.name}.close() again does nothing`);
  }
});

t.test('Symbol.dispose closes every handle kind', { skip: noKvm }, async (t) => {
  const kvm = Kvm.open();
  const vm = kvm.createVm();
  const handles = [vm.createVcpu(0), vm, GuestMemory.create(4096), EventFd.create(), kvm];
  for (const handle of handles) {
    handle[Symbol.dispose]();
    t.equal(handle.closed, true, `${handle.constructor.name} is closed`);
  }
  rejectsKvm(t, 'vm.createVcpu after dispose', () => vm.createVcpu(1), { code: 'EBADF' });
});

function isClosedError(error: unknown): boolean {
  return error instanceof KvmError && error.code === 'EBADF' && /closed/.test(error.message);
}

function describe(error: unknown): string {
  if (error === undefined) return 'no error';
  if (error instanceof Error) return `${error.constructor.name} ${(error as KvmError).code ?? ''} ${error.message}`;
  return String(error);
}

t.test('vm.close() while its vCPU is open: the guest still runs and prints', { skip: noKvm }, async (t) => {
  const machine = realModeMachine(guestImage('hello'));
  t.teardown(() => machine.close());
  machine.vm.close();
  t.equal(machine.vm.closed, true);
  t.equal(runToHalt(machine.vcpu), HELLO, 'the slot memory stays mapped for the vCPU');
  t.equal(machine.vcpu.getRegs().rip > 0x7c00n, true, 'registers still readable');
});

t.test('GuestMemory closed while a slot maps it: the guest still runs', { skip: noKvm }, async (t) => {
  const machine = realModeMachine(guestImage('hello'));
  t.teardown(() => machine.close());
  machine.memory.close();
  t.equal(machine.memory.buffer.byteLength, 0, 'the JavaScript view is gone');
  // A turn of the event loop lets the detached buffer's finalizer drop its reference.
  await new Promise<void>((resolve) => setImmediate(resolve));
  t.equal(runToHalt(machine.vcpu), HELLO, 'the slot holds the mapping');
});

t.test('the raw addon rejects garbage without crashing', { skip: noKvm }, async (t) => {
  const vm = openVm(t);
  const vcpu = vm.createVcpu(0);
  t.teardown(() => vcpu.close());
  const memory = createMemory(t);
  const vcpuHandle = vcpu.kickHandle.vcpuKick;
  const vmHandle = native.vmFromFd(vm.fd);
  const getRegs = ops['KVM_GET_REGS']!;

  rejects(t, 'ioctl(handle, 9999)', () => native.ioctl(vcpuHandle, 9999), 'ERR_OUT_OF_RANGE', /op/);
  rejects(t, 'ioctl(handle, -1)', () => native.ioctl(vcpuHandle, -1), 'ERR_OUT_OF_RANGE', /op/);
  rejects(t, "ioctl(handle, 'x')", () => native.ioctl(vcpuHandle, 'x' as unknown as number), 'ERR_INVALID_ARG_TYPE', /op/);
  rejects(t, "ioctl('x', op)", () => native.ioctl('x' as unknown as number, getRegs, new Uint8Array(144)), 'ERR_INVALID_ARG_TYPE', /vcpu/);
  rejects(t, 'ioctl(-1, op)', () => native.ioctl(-1, getRegs, new Uint8Array(144)), 'ERR_OUT_OF_RANGE', /vcpu/);
  rejectsKvm(t, 'ioctl(a VM handle, a vCPU op)', () => native.ioctl(vmHandle, getRegs, new Uint8Array(144)), { code: 'EBADF' });
  rejects(t, 'KVM_GET_REGS with 1 byte', () => native.ioctl(vcpuHandle, getRegs, new Uint8Array(1)), 'ERR_INVALID_ARG_VALUE', /KVM_GET_REGS needs exactly 144 bytes, got 1/);
  rejects(t, 'KVM_GET_REGS with a number', () => native.ioctl(vcpuHandle, getRegs, 5), 'ERR_INVALID_ARG_TYPE', /KVM_GET_REGS needs a Uint8Array/);
  rejects(t, 'KVM_GET_REGS with a Uint16Array', () => native.ioctl(vcpuHandle, getRegs, new Uint16Array(72) as unknown as Uint8Array), 'ERR_INVALID_ARG_TYPE', /Uint8Array/);
  rejects(t, 'KVM_SET_TSS_ADDR with 2^64', () => native.ioctl(vmHandle, ops['KVM_SET_TSS_ADDR']!, 1n << 64n), 'ERR_OUT_OF_RANGE', /KVM_SET_TSS_ADDR/);
  rejects(t, 'KVM_SET_TSS_ADDR with a Uint8Array', () => native.ioctl(vmHandle, ops['KVM_SET_TSS_ADDR']!, new Uint8Array(8)), 'ERR_INVALID_ARG_TYPE', /integer/);
  const msrs = new Uint8Array(8);
  new DataView(msrs.buffer).setUint32(0, 3, true);
  rejects(t, 'KVM_GET_MSRS count beyond the buffer', () => native.ioctl(vcpuHandle, ops['KVM_GET_MSRS']!, msrs), 'ERR_INVALID_ARG_VALUE', /fewer entries than its count/);
  rejects(t, 'KVM_GET_MSRS without a header', () => native.ioctl(vcpuHandle, ops['KVM_GET_MSRS']!, new Uint8Array(4)), 'ERR_INVALID_ARG_VALUE', /too small/);
  const nested = new Uint8Array(128);
  new DataView(nested.buffer).setUint32(4, 1 << 30, true);
  rejects(t, 'KVM_SET_NESTED_STATE size beyond the buffer', () => native.ioctl(vcpuHandle, ops['KVM_SET_NESTED_STATE']!, nested), 'ERR_INVALID_ARG_VALUE', /nested state size/);

  // The addon copies arguments before the ioctl, so a SharedArrayBuffer is read and written
  // like any other buffer.
  const shared = new Uint8Array(new SharedArrayBuffer(144));
  const plain = new Uint8Array(144);
  native.ioctl(vcpuHandle, getRegs, shared);
  native.ioctl(vcpuHandle, getRegs, plain);
  t.same([...shared], [...plain], 'KVM_GET_REGS into a SharedArrayBuffer view');
  rejects(t, 'KVM_GET_REGS into a short SharedArrayBuffer view', () => native.ioctl(vcpuHandle, getRegs, new Uint8Array(new SharedArrayBuffer(8))), 'ERR_INVALID_ARG_VALUE', /144 bytes/);

  rejectsKvm(t, 'run(12345)', () => native.run(12345), { code: 'EBADF', errno: -9 });
  rejects(t, "run('x')", () => native.run('x' as unknown as number), 'ERR_INVALID_ARG_TYPE', /vcpu/);
  rejectsKvm(t, 'setUserMemoryRegion with a bogus memory id', () => native.setUserMemoryRegion(vmHandle, 0, 0, 0, 999999, 0, 4096), { code: 'EBADF' });
  rejects(t, 'setUserMemoryRegion with memory 1.5', () => native.setUserMemoryRegion(vmHandle, 0, 0, 0, 1.5, 0, 4096), 'ERR_OUT_OF_RANGE', /memory/);
  rejects(t, 'setUserMemoryRegion with unknown flags', () => native.setUserMemoryRegion(vmHandle, 0, 0x80, 0, memory.nativeId, 0, 4096), 'ERR_INVALID_ARG_VALUE', /flags/);
  rejects(t, 'setUserMemoryRegion beyond the memory', () => native.setUserMemoryRegion(vmHandle, 0, 0, 0, memory.nativeId, MiB, 4096), 'ERR_OUT_OF_RANGE', /offset \+ size/);
  rejects(t, 'setUserMemoryRegion at 2^52', () => native.setUserMemoryRegion(vmHandle, 0, 0, 2 ** 52, memory.nativeId, 0, 4096), 'ERR_OUT_OF_RANGE', /guestPhysAddr/);
  rejects(t, "getDirtyLog(vm, 'x')", () => native.getDirtyLog(vmHandle, 'x' as unknown as number), 'ERR_INVALID_ARG_TYPE', /slot/);
  rejects(t, 'clearDirtyLog(vm, 0, -1, 64)', () => native.clearDirtyLog(vmHandle, 0, -1, 64), 'ERR_OUT_OF_RANGE', /firstPage/);
  rejects(t, 'detachBuffer(42)', () => native.detachBuffer(42 as unknown as ArrayBuffer), 'ERR_INVALID_ARG_TYPE', /buffer/);
  rejects(t, 'memoryCreate(4097)', () => native.memoryCreate(4097, false, false, false), 'ERR_INVALID_ARG_VALUE', /size/);
  rejects(t, "memoryCreate('x')", () => native.memoryCreate('x' as unknown as number, false, false, false), 'ERR_INVALID_ARG_TYPE', /size/);
  rejectsKvm(t, 'memoryAttach(999999)', () => native.memoryAttach(999999), { code: 'EBADF' });
  rejectsKvm(t, 'memoryWrite(999999, ...)', () => native.memoryWrite(999999, 0, Uint8Array.of(1)), { code: 'EBADF' });
  rejects(t, 'memoryWrite past the end', () => native.memoryWrite(memory.nativeId, MiB - 1, Uint8Array.of(1, 2)), 'ERR_OUT_OF_RANGE', /beyond the end/);
  rejects(t, 'memoryWrite at 2^64-1', () => native.memoryWrite(memory.nativeId, (1n << 64n) - 1n as unknown as number, Uint8Array.of(1)), 'ERR_OUT_OF_RANGE', /beyond the end/);
  rejects(t, 'memoryWrite of a Uint16Array', () => native.memoryWrite(memory.nativeId, 0, new Uint16Array(2) as unknown as Uint8Array), 'ERR_INVALID_ARG_TYPE', /Uint8Array/);
  rejects(t, 'memoryFill past the end', () => native.memoryFill(memory.nativeId, 1, MiB, 0), 'ERR_OUT_OF_RANGE', /beyond the end/);
  rejects(t, 'memoryFill with byte 256', () => native.memoryFill(memory.nativeId, 0, 1, 256), 'ERR_OUT_OF_RANGE', /byte/);
  const mappings = GuestMemory.stats().mappings;
  native.memoryRelease(999999);
  t.equal(GuestMemory.stats().mappings, mappings, 'releasing an unknown memory id releases nothing');
  memory.write(0, Uint8Array.of(0x5a));
  t.equal(memory.bytes(0, 1)[0], 0x5a, 'and the memory in use is untouched');
  rejects(t, 'createEventFd(-1)', () => native.createEventFd(-1, false, true), 'ERR_OUT_OF_RANGE', /initialValue/);
  rejects(t, "createVcpu(vm, '0')", () => native.createVcpu(vmHandle, '0' as unknown as number), 'ERR_INVALID_ARG_TYPE', /id/);
  rejects(t, 'harvestDirtyRing(vcpu, [])', () => native.harvestDirtyRing(vcpuHandle, [] as unknown as Float64Array), 'ERR_INVALID_ARG_TYPE', /Float64Array/);
  rejectsKvm(t, 'vmFromFd(-1)', () => native.vmFromFd(-1), { code: 'EBADF' });
  t.equal(native.kick(12345), false, 'kick(unknown id) reports false');
  t.doesNotThrow(() => native.closeVcpu(12345), 'closing an unknown vCPU id does nothing');

  // Detaching a live vCPU's kvm_run buffer drops only the JavaScript view; the addon's own
  // reference keeps the page mapped for KVM_RUN.
  native.detachBuffer(vcpu.kvmRun.view.buffer as ArrayBuffer);
  t.equal(vcpu.kvmRun.bytes.length, 0, 'the kvm_run view is detached');
  t.equal(typeof vcpu.getRegs().rip, 'bigint', 'the vCPU still answers');
});

t.test("another thread's vCPU cannot be run: KvmError ERR_KVM_WRONG_THREAD", { skip: noKvm }, async (t) => {
  const vm = openVm(t);
  const vcpu = vm.createVcpu(0);
  t.teardown(() => vcpu.close());
  const worker = new FixtureWorker('wrong-thread-worker', { kickHandle: vcpu.kickHandle });
  t.same(await worker.next(), {
    name: 'KvmError', code: 'ERR_KVM_WRONG_THREAD', message: "vCPU 0 belongs to the thread that created it; use its kick handle from other threads",
  });
  t.equal(await worker.exited, 0);
});

// An op number must name an op: NaN or 1.5 must not silently become op 0 or 1.
t.test('the raw ioctl rejects a non-integer op', { skip: noKvm }, async (t) => {
  const vm = openVm(t);
  const vcpu = vm.createVcpu(0);
  t.teardown(() => vcpu.close());
  const vcpuHandle = vcpu.kickHandle.vcpuKick;
  rejects(t, 'ioctl(handle, NaN)', () => native.ioctl(vcpuHandle, NaN), 'ERR_OUT_OF_RANGE', /op/);
  rejects(t, 'ioctl(handle, 1.5)', () => native.ioctl(vcpuHandle, 1.5, 0), 'ERR_OUT_OF_RANGE', /op/);
});

/** Runs `body` (ES module code that may use `kvm`, the binding) in a child process; returns its JSON output. */
function inChild(t: Test, body: string, timeoutMs = 20_000): unknown {
  const bindingUrl = new URL('../../lib/kvm/index.js', import.meta.url).href;
  const nativeUrl = new URL('../../lib/kvm/native.js', import.meta.url).href;
  const script = `const kvm = await import(${JSON.stringify(bindingUrl)}); const { native } = await import(${JSON.stringify(nativeUrl)});\n${body}`;
  const child = spawnSync(process.execPath, [...process.execArgv, '--input-type=module', '-e', script], { encoding: 'utf8', timeout: timeoutMs, killSignal: 'SIGKILL' });
  const stderr = child.stderr.trim().split('\n').slice(-3).join(' | ');
  t.equal(child.error?.message, undefined, 'the child finished in time');
  t.equal(child.signal, null, `the child was not killed by a signal (stderr: ${stderr})`);
  t.equal(child.status, 0, 'the child exited normally');
  const lines = child.stdout.trim().split('\n');
  return child.status === 0 ? JSON.parse(lines[lines.length - 1]!) : undefined;
}

// KVM stores the TSC rate as a u32 but KVM_GET_TSC_KHZ returns it through an int: a rate above
// 2^31 comes back negative without being an error, and 0xfffffffc comes back as -EINTR. The addon
// read any negative result as a failure with a stale errno, and retried EINTR forever. Run in a
// child process so that a hang fails the test instead of stalling the suite.
t.test('setTscKhz above 2^31 is refused or read back; a rate that reads as -EINTR does not hang', { skip: noKvm }, async (t) => {
  const results = inChild(t, `
    const vm = kvm.Kvm.open().createVm();
    const vcpu = vm.createVcpu(0);
    const outcome = (fn) => { try { return fn(); } catch (e) { return e.constructor.name + ': ' + e.message; } };
    // A kicked KVM_RUN fails with EINTR, which leaves errno at EINTR in this thread.
    const leaveErrnoAtEintr = () => { vcpu.kick(); vcpu.run(); };
    const typed = [];
    for (const khz of [2 ** 31, 2 ** 32 - 4]) {
      const before = vcpu.getTscKhz();
      let stored = true;
      try { vcpu.setTscKhz(khz); } catch (e) { if (!(e instanceof kvm.KvmError || e instanceof RangeError)) throw e; stored = false; }
      leaveErrnoAtEintr();
      typed.push({ khz, expected: stored ? khz : before, got: outcome(() => vcpu.getTscKhz()) });
    }
    const handle = vcpu.kickHandle.vcpuKick;
    const ops = native.ioctlOps();
    native.ioctl(handle, ops.KVM_SET_TSC_KHZ, 0xfffffffc);
    leaveErrnoAtEintr();
    const raw = outcome(() => native.ioctl(handle, ops.KVM_GET_TSC_KHZ));
    console.log(JSON.stringify({ typed, raw }));
  `, 10_000) as { typed: { khz: number; expected: number; got: unknown }[]; raw: unknown } | undefined;
  for (const { khz, expected, got } of results?.typed ?? []) t.equal(got, expected, `getTscKhz() after setTscKhz(${khz})`);
  t.match(results?.raw, /^KvmError: .*EINTR/, 'the raw read of 0xfffffffc kHz reports the -EINTR the kernel returned');
});

// More guest memory than one ArrayBuffer can hold on this Node (buffer.constants.MAX_LENGTH) must
// be refused up front. Run in a child process: if the addon crashes, only the child dies.
t.test('guest memory larger than the largest ArrayBuffer throws RangeError, in a child process', async (t) => {
  const size = Math.ceil((bufferConstants.MAX_LENGTH + 1) / 4096) * 4096;
  const result = inChild(t, `
    const outcome = (fn) => { try { fn(); return 'returned'; } catch (e) { return e.constructor.name + ' [' + e.code + ']: ' + e.message; } };
    console.log(JSON.stringify({
      create: outcome(() => kvm.GuestMemory.create(${size})),
      createMemfd: outcome(() => kvm.GuestMemory.create(${size}, { backing: 'memfd' })),
      native: outcome(() => native.memoryCreate(${size}, false, false, false)),
    }));
  `);
  const tooLarge = /^RangeError \[ERR_OUT_OF_RANGE\]: .*size/;
  t.match(result, { create: tooLarge, createMemfd: tooLarge, native: tooLarge }, `size ${size}`);
});
