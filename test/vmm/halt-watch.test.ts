// With the in-kernel irqchip (every machine's default), KVM halts a vCPU itself: the halt watch
// (lib/vmm/halt-watch.ts) ends the machine once every vCPU is halted for good, and only then.
import { PassThrough } from 'node:stream';
import { setTimeout as delay } from 'node:timers/promises';
import t from 'tap';
import { MpState } from '../../lib/kvm/constants.js';
import { isStuckState } from '../../lib/vmm/halt-watch.js';
import type { VcpuState } from '../../lib/vmm/vcpu-state.js';
import { guestImage, noKvm } from '../helpers/kvm.js';
import type { MachineConfig } from '../../lib/index.js';
import { boot } from '../helpers/machine.js';
import { sharedPool } from '../helpers/pool.js';

const pool = noKvm ? undefined : sharedPool();

async function runToExit(config: MachineConfig) {
  const booted = await boot(config);
  booted.machine.start();
  const exit = await booted.machine.wait();
  await new Promise((resolve) => setImmediate(resolve));
  return { machine: booted.machine, exit, output: booted.output() };
}

t.test('every machine has the irqchip unless told; one whose guest halts with interrupts off ends with status 0', { skip: noKvm }, async (t) => {
  const { machine, exit, output } = await runToExit({ image: guestImage('hello'), memoryBytes: 1 << 20, pool });
  t.equal(machine.irqchip, true, 'the in-kernel irqchip by default, one vCPU or many');
  t.equal(output, 'Hello from node-kvm!\n');
  t.same({ reason: exit.reason, code: exit.code }, { reason: 'hlt', code: 0 });
});

t.test('two vCPUs: the BSP halted with interrupts off and an AP still waiting for its SIPI end the machine', { skip: noKvm }, async (t) => {
  const { machine, exit, output } = await runToExit({ image: guestImage('hello'), memoryBytes: 1 << 20, vcpus: 2, pool });
  t.equal(machine.vcpuCount, 2);
  t.equal(output, 'Hello from node-kvm!\n');
  t.same({ reason: exit.reason, code: exit.code }, { reason: 'hlt', code: 0 });
});

t.test('without the irqchip, HLT still exits to the VMM and ends the machine', { skip: noKvm }, async (t) => {
  const { machine, exit } = await runToExit({ image: guestImage('hello'), memoryBytes: 1 << 20, irqchip: false, pool });
  t.equal(machine.irqchip, false);
  t.same({ reason: exit.reason, code: exit.code }, { reason: 'hlt', code: 0 });
});

t.test('a guest halted with interrupts on waits for its interrupt, through pauses, and is not ended', { skip: noKvm }, async (t) => {
  const input = new PassThrough();
  const booted = await boot({ image: guestImage('echo-irq'), memoryBytes: 1 << 20, serial: { input }, pool });
  const events: string[] = [];
  booted.machine.on('paused', () => events.push('paused')).on('resumed', () => events.push('resumed'));
  booted.machine.start();
  await booted.waitForOutput('irq> ');
  // Something that must not happen takes a window to show: several rounds of the watch (at most
  // 100 ms apart) find the guest halted, each time with interrupts on.
  await delay(400);
  t.equal(booted.machine.state, 'running', 'still running, halted in the guest');
  await booted.machine.pause();
  booted.machine.resume();
  t.same(events, ['paused', 'resumed'], 'the owner sees only its own pause');
  input.write('hi q');
  const exit = await booted.machine.wait();
  await new Promise((resolve) => setImmediate(resolve));
  t.equal(booted.output(), 'irq> hi q', 'woken by each byte\'s interrupt');
  t.same({ reason: exit.reason, code: exit.code }, { reason: 'debug-exit', code: 6 });
});

t.test('which saved vCPU states count as halted for good', async (t) => {
  const state = (mpState: number, rflags: bigint, nmi: { pending: number; injected: number } = { pending: 0, injected: 0 }) =>
    ({ mpState, regs: { rflags }, events: { nmi } }) as unknown as VcpuState;
  t.equal(isStuckState(state(MpState.Halted, 0x2n)), true, 'halted, interrupts off');
  t.equal(isStuckState(state(MpState.Halted, 0x202n)), false, 'halted, interrupts on: an interrupt wakes it');
  t.equal(isStuckState(state(MpState.Halted, 0x2n, { pending: 1, injected: 0 })), false, 'an NMI pending wakes it');
  t.equal(isStuckState(state(MpState.Halted, 0x2n, { pending: 0, injected: 1 })), false, 'an NMI being injected');
  t.equal(isStuckState(state(MpState.Uninitialized, 0x2n)), true, 'an AP waiting for INIT');
  t.equal(isStuckState(state(MpState.InitReceived, 0x2n)), true, 'an AP waiting for its SIPI');
  t.equal(isStuckState(state(MpState.SipiReceived, 0x2n)), false, 'an AP given its SIPI starts');
  t.equal(isStuckState(state(MpState.Runnable, 0x2n)), false, 'running');
});
