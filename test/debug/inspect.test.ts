// Registers and memory of a machine running guests/inspect.S (SPIN: it stays running, RBX and R12
// known, R12 the address of "node-kvm inspect"), from the library, the control API and the
// commands: on a running machine (stopped quietly for the read: no event, still running) and a
// paused one; bad vCPUs, unmapped addresses and lengths over the cap refused.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import t from 'tap';
import { Machine, readRegisters, readGuestMemory, formatRegisters, hexDump, MAX_INSPECT_BYTES } from '../../lib/index.js';
import { callApi } from '../../lib/cli/api-client.js';
import { apiMachine, startApiServer } from '../../lib/cli/api-server.js';
import { nodeKvmInProcess } from '../helpers/cli.js';
import { noKvm, repoRoot } from '../helpers/kvm.js';
import { sharedPool } from '../helpers/pool.js';

const skip = noKvm;
const pool = noKvm ? undefined : sharedPool(1);
const dir = mkdtempSync(path.join(tmpdir(), 'node-kvm-inspect-'));
t.teardown(() => rmSync(dir, { recursive: true, force: true }));
const MARKER = Buffer.from('node-kvm inspect');

t.test('regs and x on a running and a paused machine; bad input refused', { skip }, async (t) => {
  const machine = await Machine.create({ image: path.join(repoRoot, 'guests', 'build', 'inspect-spin.elf'), memoryBytes: 16 << 20, pool, serial: { output: null }, log: () => {} });
  t.teardown(() => machine.stop());
  const events: string[] = [];
  machine.on('paused', () => events.push('paused'));
  machine.on('resumed', () => events.push('resumed'));
  machine.start();
  // Its last port write: RBX and R12 are set, and it spins from here on.
  while (machine.postCode.writes < 3) await new Promise((resolve) => setTimeout(resolve, 2));

  const state = await readRegisters(machine, 0);
  t.equal(state.regs.rbx, 0x1122334455667788n);
  t.equal(machine.state, 'running', 'still running');
  t.same(events, [], 'no paused or resumed event for the read');
  const text = formatRegisters(state);
  t.match(text, /^RAX=[0-9a-f]{16} RBX=1122334455667788 /m);
  t.match(text, /^CS =0018 0000000000000000 ffffffff 00a09b00 DPL=0 CS64 \[-RA\]$/m);
  t.match(text, /^RIP=00000000001000[0-9a-f]{2} RFL=[0-9a-f]{8} \[.*IOPL=0\] CPL=0$/m);
  t.match(text, /^CR0=80000011 CR2=0{16} CR3=[0-9a-f]{16} CR4=[0-9a-f]{8}$/m);
  t.match(text, /^GDT= +[0-9a-f]{16} [0-9a-f]{8}$/m);
  t.match(text, /EFER=0000000000000500/);
  const marker = state.regs.r12;
  t.same(await readGuestMemory(machine, marker, 16), MARKER, 'virtual, through the page tables');
  t.same(await readGuestMemory(machine, Number(marker), 16, { physical: true }), MARKER, 'physical');
  t.equal(hexDump(marker, MARKER), `${marker.toString(16).padStart(8, '0')}  6e 6f 64 65 2d 6b 76 6d  20 69 6e 73 70 65 63 74  |node-kvm inspect|\n`);

  await t.rejects(readRegisters(machine, 1), { code: 'ERR_OUT_OF_RANGE', message: 'no vCPU 1: the machine has 1 (0..0)' });
  await t.rejects(readGuestMemory(machine, 0x7fff00000000n, 16), { code: 'ERR_OUT_OF_RANGE', message: 'virtual address 0x7fff00000000 is not mapped (vCPU 0, 4-level paging)' });
  await t.rejects(readGuestMemory(machine, 0x8000000000000000n, 1), { message: /0x8000000000000000 is not mapped/ }, 'not canonical');
  await t.rejects(readGuestMemory(machine, 16 << 20, 1, { physical: true }), { code: 'ERR_OUT_OF_RANGE', message: /outside guest RAM/ });
  await t.rejects(readGuestMemory(machine, 0, MAX_INSPECT_BYTES + 1), { code: 'ERR_OUT_OF_RANGE', message: `length ${MAX_INSPECT_BYTES + 1} is out of range 1..${MAX_INSPECT_BYTES}` });
  await t.rejects(readGuestMemory(machine, 0, 0), { code: 'ERR_OUT_OF_RANGE' });
  await t.rejects(readGuestMemory(machine, 0, 16, { vcpu: -1 }), { code: 'ERR_OUT_OF_RANGE' });

  // The control API and the commands over it.
  const socket = path.join(dir, 'api.sock');
  const api = await startApiServer(socket, apiMachine(machine));
  t.teardown(() => api.close());
  const regs = await callApi(socket, 'regs', {});
  t.equal(regs.regs.rbx, '0x1122334455667788');
  t.equal((regs.sregs.cs as Record<string, string>).selector, '0x18');
  t.match(regs.text, /^RAX=[0-9a-f]{16} RBX=1122334455667788 /m);
  const dump = await callApi(socket, 'x', { address: `0x${marker.toString(16)}`, length: 16 });
  t.same(dump, { address: `0x${marker.toString(16)}`, length: 16, data: MARKER.toString('hex') });
  t.same((await callApi(socket, 'x', { address: Number(marker), length: 8, physical: true })).data, MARKER.subarray(0, 8).toString('hex'));
  await t.rejects(callApi(socket, 'regs', { vcpu: 4 }), { code: 'ERR_OUT_OF_RANGE', message: /no vCPU 4/ });
  await t.rejects(callApi(socket, 'x', { address: '0x7fff00000000', length: 16 }), { code: 'ERR_OUT_OF_RANGE', message: /not mapped/ });
  await t.rejects(callApi(socket, 'x', { address: 0, length: 64 << 20 }), { code: 'ERR_OUT_OF_RANGE', message: /out of range 1\.\.1048576/ });
  await t.rejects(callApi(socket, 'x', { address: 'zz' }), { code: 'ERR_INVALID_ARG_TYPE' });
  await t.rejects(callApi(socket, 'x', { address: 0, bogus: 1 } as never), { message: "x: unknown parameter 'bogus'" });

  const regsCommand = await nodeKvmInProcess(['regs', '--api-socket', socket]);
  t.equal(regsCommand.status, 0);
  t.match(regsCommand.stdout, /^RAX=[0-9a-f]{16} RBX=1122334455667788 /m);
  const xCommand = await nodeKvmInProcess(['x', '--api-socket', socket, `0x${marker.toString(16)}`, '16']);
  t.equal(xCommand.stdout, hexDump(marker, MARKER));
  const badX = await nodeKvmInProcess(['x', '--api-socket', socket, '0x7fff00000000']);
  t.equal(badX.status, 1);
  t.match(badX.stderr, /^node-kvm: virtual address 0x7fff00000000 is not mapped/);
  t.same(events, [], 'still no event');
  t.equal(machine.state, 'running');

  // Exit statistics through the API: not counted until asked.
  t.equal((await callApi(socket, 'stats', { start: false })).enabled, false);
  const stats = await callApi(socket, 'stats', {});
  t.equal(stats.enabled, true);
  t.equal(stats.vcpus.length, 1);
  const statsCommand = await nodeKvmInProcess(['stats', '--api-socket', socket]);
  t.match(statsCommand.stdout, /^exits since counting started [\d.]+ s ago: \d+/);
  t.match(statsCommand.stdout, /\nvCPU 0: \d+ exits/);

  // Paused by its owner: read as it stands, and it stays paused.
  await machine.pause();
  const paused = await readRegisters(machine);
  t.equal(paused.regs.rip, state.regs.rip, 'spinning in place');
  t.same(await readGuestMemory(machine, marker, 16), MARKER);
  t.equal((await callApi(socket, 'regs', {})).regs.rip, `0x${state.regs.rip.toString(16)}`, 'through the API too');
  t.same((await callApi(socket, 'x', { address: `0x${marker.toString(16)}`, length: 16 })).data, MARKER.toString('hex'));
  t.equal(machine.state, 'paused');
  t.same(events, ['paused'], 'only the owner\'s pause');
  machine.resume();
});
