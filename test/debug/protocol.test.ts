// The GDB stub spoken to directly, without gdb: what a hostile or broken debugger sends (noise,
// bad checksums, oversized packets, a connection cut mid-packet) costs it an error reply at most,
// and the machine runs on; Ctrl-C, vCont steps, the stub's own step off a breakpoint, binary
// writes, real mode shown as i386, detach and kill.
import { once } from 'node:events';
import path from 'node:path';
import t from 'tap';
import { GdbServer, hostDebugSupport } from '../../lib/index.js';
import { framePacket } from '../../lib/debug/packets.js';
import { Client } from '../helpers/gdb-client.js';
import { noKvm, repoRoot } from '../helpers/kvm.js';
import { callApi } from '../../lib/cli/api-client.js';
import { apiMachine, startApiServer } from '../../lib/cli/api-server.js';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { boot } from '../helpers/machine.js';
import { sharedPool } from '../helpers/pool.js';

const pool = noKvm ? undefined : sharedPool(1);
const gdbElf = path.join(repoRoot, 'guests', 'build', 'gdb.elf');
const spin = path.join(repoRoot, 'guests', 'build', 'spin.bin');

const hex = (text: string) => Buffer.from(text).toString('hex');

t.test('noise, a bad checksum, an oversized packet and a cut connection: errors, and the guest runs on without breakpoints', { skip: noKvm }, async (t) => {
  // The stub's probe of the host, on this file's thread (it would start threads of its own).
  await hostDebugSupport({ pool });
  const booted = await boot({ image: gdbElf, pool });
  const { machine } = booted;
  const server = await GdbServer.listen(machine, 'tcp:127.0.0.1:0');
  t.teardown(() => server.close());
  t.match(server.address, /^tcp:127\.0\.0\.1:\d+$/);
  const client = await Client.connect(server);
  client.send('noise between packets \x00\xff}}');
  client.send('$g#00');
  t.equal(await client.request('?'), 'T05thread:1;', 'the first good packet is answered');
  t.equal(client.acks(), '-+', 'a NAK for the bad checksum, an ACK for the good packet');
  client.send(`$M101000,1:${'41'.repeat(20000)}#00`);
  t.equal(await client.reply(), 'E22', 'an oversized packet is refused');
  // This host serves no software breakpoints (host-debug-support.test.ts): a Z0 stops as a hwbreak.
  t.equal(await client.request('qSupported:swbreak+;hwbreak+'), 'PacketSize=4000;qXfer:features:read+;hwbreak+;QStartNoAckMode+;vContSupported+');
  t.equal(await client.request('QStartNoAckMode'), 'OK');
  client.acks();
  t.equal(await client.request('qfThreadInfo'), 'm1');
  t.equal(await client.request('qsThreadInfo'), 'l');
  t.equal(await client.request('Hg2'), 'E22', 'no thread 2 on one vCPU');
  t.equal(await client.request('m101000,5'), hex('hello'), 'memory at a virtual address');
  // X: binary, with } # $ * escaped: "J}*#" written into the message.
  t.equal(await client.request(Buffer.concat([Buffer.from('X101000,4:J'), Buffer.from([0x7d, 0x5d, 0x7d, 0x0a, 0x7d, 0x03])])), 'OK');
  t.equal(await client.request('m101000,5'), hex('J}*#o'));
  t.equal(await client.request('m800000000000,4'), 'E14', 'a non-canonical address');
  t.equal(await client.request('m4000000,4'), 'E14', 'past the end of guest RAM');
  t.equal(await client.request('Z2,101000,1'), 'E22', 'watchpoints are refused');
  t.equal(await client.request('Z0,100015,1'), 'OK', 'a breakpoint at after_loop');
  t.equal(await client.request('pzz'), 'E22');
  t.equal(await client.request('P0=zz'), 'E22');
  t.equal(await client.request('vMustReplyEmpty'), '');
  t.equal(machine.state, 'created', 'the guest has not run');
  // Cut off in the middle of a packet, without detaching.
  client.send('$m1010');
  client.socket.destroy();
  const exit = await machine.wait();
  t.same({ reason: exit.reason, code: exit.code }, { reason: 'debug-exit', code: 0x21 }, 'the guest ran to its end: no breakpoint left behind');
  await new Promise((resolve) => setImmediate(resolve));
  t.equal(booted.output(), 'rbx=5 msg=J}*#o\n');
});

t.test('the stub steps a vCPU off the breakpoint it stopped on; detach lets the guest finish', { skip: noKvm }, async (t) => {
  const booted = await boot({ image: gdbElf, pool });
  const { machine } = booted;
  machine.start({ paused: true });
  const server = await GdbServer.listen(machine, 'tcp:127.0.0.1:0');
  t.teardown(() => server.close());
  const client = await Client.connect(server);
  t.equal(await client.request('?'), 'T05thread:1;');
  t.equal(await client.request('Z1,10000e,1'), 'OK', 'count_loop');
  const rbx = async () => {
    const value = await client.request('p1');
    return Number(Buffer.from(value, 'hex').readBigUInt64LE());
  };
  const counts: number[] = [];
  for (let i = 0; i < 3; i++) {
    t.equal(await client.request('vCont;c'), 'T05thread:1;hwbreak:;');
    counts.push(await rbx());
  }
  t.same(counts, [0, 1, 2], 'each continue went once round the loop: the host ignores RF, the stub steps off first');
  t.equal(await client.request('vCont;s:1;c'), 'T05thread:1;');
  t.equal(await client.request('p10'), '1100100000000000', 'rip: inc %rbx (3 bytes) stepped');
  t.equal(await client.request('s'), 'T05thread:1;');
  t.equal(await client.request('p10'), '1300100000000000', 'dec %ecx stepped');
  t.equal(await client.request('p38'), '801f0000', 'mxcsr (register 56) as the guest has it, from XSAVE');
  t.equal(await client.request('P38=c01f0000'), 'OK');
  t.equal(await client.request('p38'), 'c01f0000', 'and written back');
  t.equal(await client.request('P38=801f0000'), 'OK');
  t.equal(await client.request('D'), 'OK');
  const exit = await machine.wait();
  t.equal(exit.reason, 'debug-exit');
  await new Promise((resolve) => setImmediate(resolve));
  t.equal(booted.output(), 'rbx=5 msg=hello\n');
});

t.test('a running real-mode guest: attaching stops it, i386 registers, Ctrl-C, kill', { skip: noKvm }, async (t) => {
  const { machine } = await boot({ image: spin, pool });
  machine.start();
  const server = await GdbServer.listen(machine, 'tcp::0');
  t.teardown(() => server.close());
  t.match(server.address, /^tcp:127\.0\.0\.1:\d+$/, 'loopback by default');
  const client = await Client.connect(server);
  t.equal(await client.request('?'), 'T05thread:1;');
  t.equal(machine.state, 'paused', 'attaching stopped the guest');
  const xml = await client.request('qXfer:features:read:target.xml:0,ffff');
  t.match(xml, /^l<\?xml.*<architecture>i386<\/architecture>/);
  const registers = await client.request('g');
  t.equal(registers.length, 712, '356 bytes: the i386 layout');
  t.match(registers.slice(64, 72), /^0[01]7c0000$/, 'eip at cli or in the loop after it');
  const resumed = once(machine, 'resumed');
  client.send(framePacket('vCont;c'));
  await resumed;
  t.equal(machine.state, 'running', 'continued');
  client.send('\x03');
  t.equal(await client.reply(), 'T02thread:1;', 'Ctrl-C stops it');
  t.equal(machine.state, 'paused');
  client.send(framePacket('k'));
  const exit = await machine.wait();
  t.equal(exit.reason, 'stopped', 'kill ends the machine');
});

t.test('the control API starts a stub on a running machine, one at a time', { skip: noKvm }, async (t) => {
  const { machine } = await boot({ image: spin, pool });
  machine.start();
  t.teardown(() => machine.stop());
  const dir = mkdtempSync(path.join(tmpdir(), 'node-kvm-gdb-api-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const socketPath = path.join(dir, 'api.sock');
  const api = await startApiServer(socketPath, apiMachine(machine));
  t.teardown(() => api.close());
  const { address } = await callApi(socketPath, 'gdb', { address: 'tcp:127.0.0.1:0' });
  t.match(address, /^tcp:127\.0\.0\.1:\d+$/);
  await t.rejects(callApi(socketPath, 'gdb', { address: 'tcp:127.0.0.1:0' }), { code: 'ERR_MACHINE_STATE', message: /already listens/ });
  await t.rejects(callApi(socketPath, 'gdb', {} as { address: string }), { code: 'ERR_INVALID_ARG_TYPE' });
  const client = await Client.connect(address);
  t.equal(await client.request('?'), 'T05thread:1;');
  t.equal(machine.state, 'paused');
  t.equal(await client.request('D'), 'OK');
  t.equal(machine.state, 'running', 'detached: the guest runs on');
});
