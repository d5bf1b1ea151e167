// How the stub serves breakpoints and watchpoints for what the host supports, with the support
// injected (this host has neither software breakpoints nor watchpoints: host-debug-support.test.ts):
// the debug registers and stop reasons as pure functions; Z0 as an int3 in guest memory (hidden
// from reads, put back on removal and detach) or in one of the four slots; Z2-Z4 in a slot or
// refused; qSupported saying which. This host cannot show an int3 stop for real: it ignores
// KVM_GUESTDBG_USE_SW_BP even in guest user code (the guest takes the #BP itself), so the swbreak
// stop is checked through stopReason().
import path from 'node:path';
import t, { type Test } from 'tap';
import { GdbServer, debugRegisters, stopReason, type DebugSlot, type HostDebugSupport } from '../../lib/index.js';
import { framePacket } from '../../lib/debug/packets.js';
import { Client } from '../helpers/gdb-client.js';
import { noKvm, repoRoot } from '../helpers/kvm.js';
import { boot } from '../helpers/machine.js';
import { sharedPool } from '../helpers/pool.js';

const pool = noKvm ? undefined : sharedPool(1);
const gdbElf = path.join(repoRoot, 'guests', 'build', 'gdb.elf');
const BOTH: HostDebugSupport = { softwareBreakpoints: true, watchpoints: true };
const NEITHER: HostDebugSupport = { softwareBreakpoints: false, watchpoints: false };
/** guests/gdb.S's after_loop and message (identity-mapped). */
const AFTER_LOOP = 0x100015;
const MESSAGE = 0x101000;

t.test('DR7 for an execution breakpoint, a 4-byte write watchpoint and an 8-byte access watchpoint', async (t) => {
  const slots: (DebugSlot | null)[] = [
    { address: 0x1000n, kind: 'software', length: 1 },
    { address: 0x2000n, kind: 'write', length: 4 },
    null,
    { address: 0x3008n, kind: 'access', length: 8 },
  ];
  const debugreg = debugRegisters(slots);
  t.same(debugreg.slice(0, 4), [0x1000n, 0x2000n, 0n, 0x3008n]);
  // G0 | G1, R/W1 01, LEN1 11 | G3, R/W3 11, LEN3 10.
  t.equal(debugreg[7], 0x2n | 0x8n | (0x1n << 20n) | (0x3n << 22n) | 0x80n | (0x3n << 28n) | (0x2n << 30n));
  t.same(debugRegisters([null, null, null, null]), [0n, 0n, 0n, 0n, 0n, 0n, 0n, 0n]);
});

t.test('stop reasons: an int3 of ours, the guest\'s own int3, a step, a slot that matched', async (t) => {
  const slots: (DebugSlot | null)[] = [{ address: 0x1000n, kind: 'software', length: 1 }, { address: 0x2000n, kind: 'write', length: 4 }, null, null];
  const ours = (address: bigint) => address === 0x5000n;
  t.same(stopReason({ vcpu: 1, exception: 3, dr6: 0n, pc: 0x5000n }, slots, ours), { kind: 'breakpoint', vcpu: 1, breakpoint: 'software', address: 0x5000n });
  t.same(stopReason({ vcpu: 0, exception: 3, dr6: 0n, pc: 0x5001n }, slots, ours), { kind: 'trap', vcpu: 0 });
  t.same(stopReason({ vcpu: 0, exception: 1, dr6: 0xffff4ff0n, pc: 0x1234n }, slots, ours), { kind: 'step', vcpu: 0 });
  t.same(stopReason({ vcpu: 0, exception: 1, dr6: 0xffff0ff1n, pc: 0x1000n }, slots, ours), { kind: 'breakpoint', vcpu: 0, breakpoint: 'hardware', address: 0x1000n }, 'a Z0 in a slot stops as a hardware breakpoint');
  t.same(stopReason({ vcpu: 0, exception: 1, dr6: 0xffff0ff2n, pc: 0x1234n }, slots, ours), { kind: 'watchpoint', vcpu: 0, watchpoint: 'write', address: 0x2000n });
  t.same(stopReason({ vcpu: 0, exception: 1, dr6: 0xffff0ff4n, pc: 0x1234n }, slots, ours), { kind: 'interrupt', vcpu: 0 }, 'B2 with no slot 2');
});

/** A stub with `support` on a created gdb.elf machine, and a client attached to it. */
async function attach(t: Test, support: HostDebugSupport) {
  const booted = await boot({ image: gdbElf, pool });
  const server = await GdbServer.listen(booted.machine, 'tcp:127.0.0.1:0', { support });
  t.teardown(() => server.close());
  const client = await Client.connect(server);
  t.equal(await client.request('?'), 'T05thread:1;');
  return { ...booted, client, byteAt: (physical: number) => booted.machine.memory.bytes(physical, 1)[0] };
}

t.test('software breakpoints where the host serves them: an int3 in memory, hidden from reads, put back', { skip: noKvm }, async (t) => {
  const { machine, client, byteAt, output } = await attach(t, BOTH);
  t.equal(await client.request('qSupported:swbreak+;hwbreak+'), 'PacketSize=4000;qXfer:features:read+;swbreak+;hwbreak+;QStartNoAckMode+;vContSupported+');
  const original = await client.request(`m${AFTER_LOOP.toString(16)},4`);
  t.equal(original.slice(0, 2), '48', 'after_loop starts with lea (REX.W)');
  t.equal(await client.request(`Z0,${AFTER_LOOP.toString(16)},1`), 'OK');
  t.equal(byteAt(AFTER_LOOP), 0xcc, 'an int3 in guest memory');
  t.equal((await client.request(`m${(AFTER_LOOP - 1).toString(16)},5`)).slice(2), original, 'reads show the byte under it');
  // Writing over it changes the hidden byte; the int3 stays.
  t.equal(await client.request(`M${AFTER_LOOP.toString(16)},1:90`), 'OK');
  t.equal(byteAt(AFTER_LOOP), 0xcc);
  t.equal((await client.request(`m${AFTER_LOOP.toString(16)},1`)), '90');
  t.equal(await client.request(`M${AFTER_LOOP.toString(16)},1:${original.slice(0, 2)}`), 'OK');
  // No slot limit: five more, all int3s; hardware breakpoints still have their four slots.
  // Over the guest's message ("hello"): if detach left them, the guest would print int3 bytes.
  for (let i = 0; i < 5; i++) t.equal(await client.request(`Z0,${(MESSAGE + i).toString(16)},1`), 'OK');
  for (let i = 0; i < 4; i++) t.equal(await client.request(`Z1,${(0x100000 + i).toString(16)},1`), 'OK');
  t.equal(await client.request('Z1,100004,1'), 'E28', 'a fifth hardware breakpoint: no slot left');
  t.equal(await client.request('Z0,800000000000,1'), 'E14', 'no page for an int3 there');
  t.equal(await client.request(`z0,${AFTER_LOOP.toString(16)},1`), 'OK');
  t.equal(byteAt(AFTER_LOOP), Number.parseInt(original.slice(0, 2), 16), 'removed: the byte is back');
  t.equal(await client.request(`z0,${AFTER_LOOP.toString(16)},1`), 'E22', 'not there any more');
  t.equal(byteAt(MESSAGE + 1), 0xcc);
  t.equal((await client.request(`m${MESSAGE.toString(16)},5`)), Buffer.from('hello').toString('hex'), 'reads show the message');
  // The guest runs on at once: what it prints says whether the int3s went (memory may be gone by
  // the time we could look).
  t.equal(await client.request('D'), 'OK');
  t.equal((await machine.wait()).reason, 'debug-exit');
  await new Promise((resolve) => setImmediate(resolve));
  t.equal(output(), 'rbx=5 msg=hello\n', 'the guest ran as it would have: detach took every int3 out');
});

t.test('watchpoints where the host triggers them: write and access in slots, read refused', { skip: noKvm }, async (t) => {
  const { machine, client } = await attach(t, BOTH);
  t.equal(await client.request(`Z2,${MESSAGE.toString(16)},1`), 'OK');
  t.equal(await client.request(`Z4,${MESSAGE.toString(16)},8`), 'OK');
  t.equal(await client.request(`Z3,${MESSAGE.toString(16)},1`), 'E22', 'x86 has no read-only watchpoint');
  t.equal(await client.request(`Z2,${(MESSAGE + 1).toString(16)},4`), 'E22', 'not aligned to its length');
  t.equal(await client.request(`Z2,${MESSAGE.toString(16)},3`), 'E22', 'no 3-byte watchpoint');
  t.equal(await client.request('Z1,100000,1'), 'OK');
  t.equal(await client.request(`Z0,${AFTER_LOOP.toString(16)},1`), 'OK', 'an int3: it takes no slot');
  t.equal(await client.request(`Z2,${(MESSAGE + 8).toString(16)},2`), 'OK', 'the fourth slot');
  t.equal(await client.request(`Z2,${(MESSAGE + 16).toString(16)},1`), 'E28', 'no fifth');
  t.equal(await client.request(`z2,${MESSAGE.toString(16)},1`), 'OK');
  t.equal(await client.request(`z2,${MESSAGE.toString(16)},1`), 'E22', 'not there any more');
  t.equal(await client.request(`z4,${MESSAGE.toString(16)},4`), 'E22', 'not of that length');
  client.send(framePacket('k'));
  t.equal((await machine.wait()).reason, 'stopped');
});

t.test('neither: Z0 in the four slots, stopping as a hwbreak; watchpoints refused', { skip: noKvm }, async (t) => {
  const { machine, client, byteAt, output } = await attach(t, NEITHER);
  t.equal(await client.request('qSupported:swbreak+;hwbreak+'), 'PacketSize=4000;qXfer:features:read+;hwbreak+;QStartNoAckMode+;vContSupported+');
  const before = byteAt(AFTER_LOOP);
  t.equal(await client.request(`Z0,${AFTER_LOOP.toString(16)},1`), 'OK');
  t.equal(byteAt(AFTER_LOOP), before, 'guest memory untouched');
  for (let i = 1; i <= 3; i++) t.equal(await client.request(`Z0,${(MESSAGE + i).toString(16)},1`), 'OK');
  t.equal(await client.request(`Z0,${(MESSAGE + 4).toString(16)},1`), 'E28', 'a fifth: no slot left');
  t.equal(await client.request(`Z2,${MESSAGE.toString(16)},1`), 'E22', 'write watchpoints refused');
  t.equal(await client.request(`Z4,${MESSAGE.toString(16)},1`), 'E22', 'access watchpoints refused');
  t.equal(await client.request('vCont;c'), 'T05thread:1;hwbreak:;', 'the Z0 stops as a hardware breakpoint');
  t.equal(await client.request('p10'), '1500100000000000', 'at after_loop');
  t.equal(await client.request('D'), 'OK');
  t.equal((await machine.wait()).reason, 'debug-exit');
  await new Promise((resolve) => setImmediate(resolve));
  t.equal(output(), 'rbx=5 msg=hello\n');
});
