// Coalesced port I/O: writes to a registered zone stop exiting and queue in the ring that every
// vCPU's mapping shows; the VMM drains them in order.
import t, { type Test } from 'tap';
import { Cap, ExitReason, type CoalescedMmio } from '../../lib/index.js';
import { guestImage, noKvm, realModeMachine, throwsKvm } from '../helpers/kvm.js';

const EXITS_PORT = 0x80;

function exitsMachine(t: Test, count: number) {
  const machine = realModeMachine(guestImage('exits'));
  t.teardown(() => machine.close());
  machine.vcpu.setRegs({ ...machine.vcpu.getRegs(), rcx: BigInt(count) });
  return machine;
}

/** Runs to HLT, draining the ring at every exit; returns the port exits seen and all entries. */
function run(vcpu: ReturnType<typeof exitsMachine>['vcpu']): { portExits: number; entries: CoalescedMmio[] } {
  let portExits = 0;
  const entries: CoalescedMmio[] = [];
  for (;;) {
    const reason = vcpu.run();
    entries.push(...vcpu.drainCoalescedMmio());
    if (reason === ExitReason.Hlt) return { portExits, entries };
    if (reason !== ExitReason.Io || vcpu.kvmRun.ioPort !== EXITS_PORT) throw new Error(`unexpected exit ${reason}`);
    portExits++;
  }
}

t.test('writes to a coalesced port queue in order instead of exiting', { skip: noKvm }, async (t) => {
  const { vm, vcpu, kvm } = exitsMachine(t, 50);
  if (!kvm.checkExtension(Cap.CoalescedPio)) {
    throwsKvm(t, () => vm.registerCoalescedMmio({ addr: EXITS_PORT, size: 1, pio: true }), { code: 'EINVAL' });
    return;
  }
  vm.registerCoalescedMmio({ addr: EXITS_PORT, size: 1, pio: true });
  const { portExits, entries } = run(vcpu);
  t.equal(portExits, 0, 'no write exited');
  t.equal(entries.length, 50);
  // The guest writes AL = the low byte of its down-counter: 50, 49, ..., 1.
  t.same(entries.map((e) => e.data[0]), Array.from({ length: 50 }, (_, i) => 50 - i));
  t.ok(entries.every((e) => e.physAddr === BigInt(EXITS_PORT) && e.len === 1 && e.pio === 1), 'port 0x80, 1 byte, PIO');
  t.same(vcpu.drainCoalescedMmio(), [], 'drained');
});

t.test('a full ring makes the next write exit, and nothing is lost', { skip: noKvm }, async (t) => {
  const { vm, vcpu, kvm } = exitsMachine(t, 400);
  if (!kvm.checkExtension(Cap.CoalescedPio)) {
    throwsKvm(t, () => vm.registerCoalescedMmio({ addr: EXITS_PORT, size: 1, pio: true }), { code: 'EINVAL' });
    return;
  }
  vm.registerCoalescedMmio({ addr: EXITS_PORT, size: 1, pio: true });
  const { portExits, entries } = run(vcpu);
  t.ok(portExits > 0, `some writes exited when the ring was full (${portExits})`);
  t.equal(portExits + entries.length, 400, 'every write either exited or was queued');
});

t.test('unregistering stops coalescing; bad zones are refused', { skip: noKvm }, async (t) => {
  const { vm, vcpu } = exitsMachine(t, 5);
  vm.registerCoalescedMmio({ addr: EXITS_PORT, size: 1, pio: true });
  vm.unregisterCoalescedMmio({ addr: EXITS_PORT, size: 1, pio: true });
  const { portExits, entries } = run(vcpu);
  t.same({ portExits, entries: entries.length }, { portExits: 5, entries: 0 });
  t.throws(() => vm.registerCoalescedMmio({ addr: -1, size: 1 }), RangeError);
  t.throws(() => vm.registerCoalescedMmio({ addr: 0xd0000000, size: 0 }), RangeError);
  t.throws(() => vm.registerCoalescedMmio(null as never), TypeError);
});
