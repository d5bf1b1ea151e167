import t from 'tap';
import { ExitReason } from '../../lib/index.js';
import { guestImage, noKvm, realModeMachine, runToHalt } from '../helpers/kvm.js';

t.test('hello prints its line on COM1 and halts', { skip: noKvm }, async (t) => {
  const machine = realModeMachine(guestImage('hello'));
  t.teardown(() => machine.close());
  t.equal(runToHalt(machine.vcpu), 'Hello from node-kvm!\n');
  t.equal(machine.vcpu.kvmRun.exitReason, ExitReason.Hlt);
  t.same(machine.vcpu.exit(), { reason: 'hlt' });
});

t.test('the first exit decodes as a one-byte write to COM1', { skip: noKvm }, async (t) => {
  const machine = realModeMachine(guestImage('hello'));
  t.teardown(() => machine.close());
  t.equal(machine.vcpu.run(), ExitReason.Io);
  const exit = machine.vcpu.exit();
  if (exit.reason !== 'io') throw new Error(`expected io, got ${exit.reason}`);
  t.equal(exit.direction, 'out');
  t.equal(exit.port, 0x3f8);
  t.equal(exit.size, 1);
  t.equal(exit.count, 1);
  t.same([...exit.data], ['H'.charCodeAt(0)]);
});
