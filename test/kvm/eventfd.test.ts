// eventfd(2) itself, irqfd (an eventfd write raises a GSI in the in-kernel irqchip) and
// ioeventfd (a guest port write signals an eventfd instead of exiting to userspace).
import t, { type Test } from 'tap';
import { EventFd, IoDirection, IrqChip, Kvm, KvmError, type Vcpu, type Vm } from '../../lib/index.js';
import { enterRealMode, guestImage, LOAD_ADDR, noKvm, realModeMachine, runToHalt, type RealModeMachine } from '../helpers/kvm.js';

const POST_PORT = 0x80;
const LOOPS = 50;
// kvm_pic_state.irr and .imr (asm/kvm.h).
const PIC_IRR = 1;
const PIC_IMR = 2;

function eventFd(t: Test, options?: Parameters<typeof EventFd.create>[0]): EventFd {
  const efd = EventFd.create(options);
  t.teardown(() => efd.close());
  return efd;
}

function irqchipVm(t: Test): Vm {
  const kvm = Kvm.open();
  const vm = kvm.createVm();
  t.teardown(() => {
    vm.close();
    kvm.close();
  });
  vm.createIrqChip();
  return vm;
}

/** The exits guest, ready to loop `loops` times writing the counter's low byte to port 0x80. */
function exitsMachine(t: Test): RealModeMachine {
  const machine = realModeMachine(guestImage('exits'));
  t.teardown(() => machine.close());
  return machine;
}

/** Runs the exits guest from its start for `loops` iterations; returns the port 0x80 bytes that exited. */
function runLoops(vcpu: Vcpu, loops: number): number[] {
  enterRealMode(vcpu, LOAD_ADDR);
  vcpu.setRegs({ ...vcpu.getRegs(), rcx: BigInt(loops) });
  const exited: number[] = [];
  const output = runToHalt(vcpu, (port, direction, data) => {
    if (port !== POST_PORT || direction !== IoDirection.Out) throw new Error(`unexpected access to port 0x${port.toString(16)}`);
    exited.push(...data);
  });
  if (output !== '') throw new Error(`unexpected serial output ${JSON.stringify(output)}`);
  return exited;
}

/** Polls until `condition` holds; irqfd injects from a kernel work item, not in write(2). */
function waitFor(condition: () => boolean, timeoutMs = 2000): boolean {
  const sleeper = new Int32Array(new SharedArrayBuffer(4));
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) return false;
    Atomics.wait(sleeper, 0, 0, 1);
  }
  return true;
}

t.test('an eventfd adds writes and read() takes the whole count', async (t) => {
  const efd = eventFd(t);
  t.ok(Number.isInteger(efd.fd) && efd.fd > 2, `fd ${efd.fd}`);
  efd.write(3);
  efd.write(4n);
  t.equal(efd.read(), 7n);
  t.equal(efd.read(), 0n, 'a non-blocking read of zero returns 0n');
  const initial = eventFd(t, { initialValue: 9 });
  t.equal(initial.read(), 9n);
  t.throws(() => EventFd.create({ initialValue: -1 }), RangeError);
});

t.test('a semaphore eventfd hands out one at a time', async (t) => {
  const efd = eventFd(t, { semaphore: true });
  efd.write(3);
  t.same([efd.read(), efd.read(), efd.read(), efd.read()], [1n, 1n, 1n, 0n]);
});

t.test('a closed eventfd throws EBADF', async (t) => {
  const efd = EventFd.create();
  efd.close();
  efd.close();
  for (const use of [() => efd.read(), () => efd.write(1)]) {
    let error: unknown;
    try {
      use();
    } catch (e) {
      error = e;
    }
    t.type(error, KvmError);
    t.equal((error as KvmError).code, 'EBADF');
  }
});

t.test('irqfd: an eventfd write raises the GSI on the master PIC', { skip: noKvm }, async (t) => {
  const vm = irqchipVm(t);
  const efd = eventFd(t);
  const masterIrr = () => vm.getIrqChip(IrqChip.PicMaster).chip[PIC_IRR]!;
  t.equal(vm.getIrqChip(IrqChip.PicMaster).chip[PIC_IMR], 0, 'IRQ5 is not masked');
  vm.registerIrqfd(efd, 5);
  t.equal(masterIrr(), 0);
  efd.write(1);
  t.ok(waitFor(() => masterIrr() === 0x20), `master PIC irr is 0x20 (got 0x${masterIrr().toString(16)})`);
  t.equal(efd.read(), 0n, 'KVM consumed the count');

  vm.unregisterIrqfd(efd, 5);
  const master = vm.getIrqChip(IrqChip.PicMaster);
  master.chip[PIC_IRR] = 0;
  vm.setIrqChip(master);
  efd.write(1);
  // Nobody reads the eventfd any more, so nothing can raise the line.
  t.equal(efd.read(), 1n, 'the count stays for us to read');
  t.equal(masterIrr(), 0, 'no interrupt after unregistering');
});

t.test('irqfd rejects a second registration of the same eventfd', { skip: noKvm }, async (t) => {
  const vm = irqchipVm(t);
  const efd = eventFd(t);
  vm.registerIrqfd(efd.fd, 6);
  let error: unknown;
  try {
    vm.registerIrqfd(efd, 6);
  } catch (e) {
    error = e;
  }
  t.type(error, KvmError);
  t.equal((error as KvmError).code, 'EBUSY');
  t.equal((error as KvmError).syscall, 'ioctl(KVM_IRQFD)');
  t.throws(() => vm.registerIrqfd(-1, 6), RangeError);
  vm.unregisterIrqfd(efd, 6);
});

t.test('ioeventfd absorbs every guest write to the port', { skip: noKvm }, async (t) => {
  const { vm, vcpu } = exitsMachine(t);
  const efd = eventFd(t);
  const match = { addr: POST_PORT, len: 1, pio: true };
  t.same(runLoops(vcpu, 3), [3, 2, 1], 'without an ioeventfd each write exits, AL counting down');
  vm.registerIoeventfd(match, efd);
  t.same(runLoops(vcpu, LOOPS), [], 'no port 0x80 exits reach userspace');
  t.equal(efd.read(), BigInt(LOOPS), 'one signal per write');
  vm.unregisterIoeventfd(match, efd);
  t.equal(runLoops(vcpu, LOOPS).length, LOOPS, 'after unregistering the writes exit again');
  t.equal(efd.read(), 0n);
});

t.test('ioeventfd with datamatch absorbs only the matching write', { skip: noKvm }, async (t) => {
  const { vm, vcpu } = exitsMachine(t);
  const efd = eventFd(t);
  const match = { addr: POST_PORT, len: 1, pio: true, datamatch: 25 };
  vm.registerIoeventfd(match, efd);
  const exited = runLoops(vcpu, LOOPS);
  t.equal(exited.length, LOOPS - 1);
  t.notOk(exited.includes(25), 'AL = 25 never exited');
  t.same(exited, Array.from({ length: LOOPS }, (_, i) => LOOPS - i).filter((value) => value !== 25));
  t.equal(efd.read(), 1n);
  vm.unregisterIoeventfd(match, efd);
  t.equal(runLoops(vcpu, LOOPS).length, LOOPS, 'after unregistering every write exits');
  t.equal(efd.read(), 0n);
});

t.test('ioeventfd arguments are validated', { skip: noKvm }, async (t) => {
  const { vm } = exitsMachine(t);
  const efd = eventFd(t);
  t.throws(() => vm.registerIoeventfd({ addr: POST_PORT, len: 3, pio: true }, efd), RangeError);
  t.throws(() => vm.registerIoeventfd({ addr: -1, len: 1, pio: true }, efd), RangeError);
  t.throws(() => vm.registerIoeventfd(null as unknown as { addr: number; len: number }, efd), TypeError);
  vm.registerIoeventfd({ addr: POST_PORT, len: 1, pio: true }, efd);
  let error: unknown;
  try {
    vm.registerIoeventfd({ addr: POST_PORT, len: 1, pio: true }, efd);
  } catch (e) {
    error = e;
  }
  t.type(error, KvmError);
  t.equal((error as KvmError).code, 'EEXIST', 'the same match registered twice');
});
