// Exit tracing and statistics controlled at run time, on guests/echo-irq.S (each byte typed on
// COM1 is echoed from the UART's interrupt: a fixed run of port exits per byte, and none between
// bytes, the guest sleeping in HLT inside KVM): a trace started on the running machine holds
// exactly the exits of the bytes typed while it ran, counts after a reset are exactly those of
// the bytes typed since; the same through the control API and the node-kvm command. (Reading the
// registers to see the guest idle again kicks its vCPU: those kicks, 'intr' exits, are left out.)
import { mkdtempSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import t, { type Test } from 'tap';
import { readExitTrace, readRegisters, type TraceRecord } from '../../lib/index.js';
import { callApi } from '../../lib/cli/api-client.js';
import { apiMachine, startApiServer } from '../../lib/cli/api-server.js';
import { TRACE_HEADER_BYTES, TRACE_RECORD_BYTES } from '../../lib/vmm/exit-trace.js';
import { nodeKvmInProcess } from '../helpers/cli.js';
import { guestImage, noKvm } from '../helpers/kvm.js';
import { boot, type Booted } from '../helpers/machine.js';
import { sharedPool } from '../helpers/pool.js';

const skip = noKvm;
const pool = noKvm ? undefined : sharedPool(1);
const dir = mkdtempSync(path.join(tmpdir(), 'node-kvm-exit-control-'));
t.teardown(() => rmSync(dir, { recursive: true, force: true }));

/** The port exits of one byte's interrupt: acknowledge (IIR), data ready, read it, echo it, no more data. */
const exitsOfByte = (byte: string) => [
  ['io-in', 0x3fa, ''], ['io-in', 0x3fd, ''], ['io-in', 0x3f8, byte], ['io-out', 0x3f8, byte], ['io-in', 0x3fd, ''],
];

/** The guest's exits in a trace: without the VMM's kicks (the halt watch's), port, and data for COM1's data port. */
const guestExits = (records: TraceRecord[]) => records.filter((record) => record.kind !== 'intr').map((record) => [
  record.kind, Number(record.address), Number(record.address) === 0x3f8 ? String.fromCharCode(record.data[0]!) : '',
]);

async function echoMachine(t: Test): Promise<Booted> {
  const booted = await boot({ image: guestImage('echo-irq'), memoryBytes: 1 << 20, irqchip: true, pool });
  booted.machine.start();
  t.teardown(() => booted.machine.stop());
  await booted.waitForOutput('irq> ');
  return booted;
}

/** echo-irq's idle loop (`hlt; jmp` back to it), where it waits for the next interrupt. */
const IDLE_LOOP = noKvm ? 0 : 0x7c00 + Buffer.from(guestImage('echo-irq')).indexOf(Buffer.from([0xf4, 0xeb, 0xfd]));

/**
 * Types `text` a byte at a time, each once the guest is done with the one before: echoed, and
 * back in its idle loop (the exits after the echo made too).
 */
async function type(booted: Booted, text: string): Promise<void> {
  for (const byte of text) {
    const echoed = booted.output() + byte;
    booted.machine.sendSerialInput(Buffer.from(byte));
    await booted.waitForOutput(echoed);
    for (;;) {
      const { regs } = await readRegisters(booted.machine);
      // At the HLT, or past it (a kick takes a vCPU halted in KVM out with the HLT done).
      if (regs.rip === BigInt(IDLE_LOOP) || regs.rip === BigInt(IDLE_LOOP + 1)) break;
      await new Promise((resolve) => setImmediate(resolve));
    }
  }
}

t.test('a trace started and stopped at run time holds exactly the exits made in between', { skip }, async (t) => {
  const booted = await echoMachine(t);
  const { machine } = booted;
  const first = path.join(dir, 'first.trace');
  t.equal(machine.exitTracePath, null);
  await type(booted, 'x');
  await machine.startExitTrace(first);
  t.equal(machine.exitTracePath, first);
  await t.rejects(machine.startExitTrace(path.join(dir, 'other.trace')), { code: 'ERR_MACHINE_STATE', message: `the machine writes an exit trace to ${first} already` });
  await type(booted, 'ab');
  t.equal(await machine.stopExitTrace(), first);
  t.equal(machine.exitTracePath, null);
  const size = statSync(first).size;
  const trace = readExitTrace(first);
  t.equal(trace.trailingBytes, 0);
  t.equal(size, TRACE_HEADER_BYTES + trace.records.length * TRACE_RECORD_BYTES, 'whole records, all written by the stop');
  t.same(guestExits(trace.records), [...exitsOfByte('a'), ...exitsOfByte('b')], 'the exits of a and b, not of x before nor of the prompt');
  await type(booted, 'c');
  t.equal(statSync(first).size, size, 'nothing after the stop');
  t.equal(await machine.stopExitTrace(), null, 'no trace to stop');

  // Again, to another file: the last one's records come out at the machine's end.
  const second = path.join(dir, 'second.trace');
  await machine.startExitTrace(second);
  await type(booted, 'd');
  machine.sendSerialInput(Buffer.from('q'));
  t.same(await machine.wait(), { reason: 'debug-exit', code: 6, vcpu: 0 });
  t.same(guestExits(readExitTrace(second).records), [...exitsOfByte('d'), ['io-in', 0x3fa, ''], ['io-in', 0x3fd, ''], ['io-in', 0x3f8, 'q'], ['io-out', 0x3f8, 'q'], ['io-out', 0xf4, '']]);
  await t.rejects(machine.startExitTrace(path.join(dir, 'late.trace')), { code: 'ERR_MACHINE_STATE', message: 'machine is stopped: it has no exits left to trace' });
});

t.test('counts after a reset are exactly those of the exits since', { skip }, async (t) => {
  const booted = await echoMachine(t);
  const { machine } = booted;
  await machine.resetExitStats();
  t.equal(machine.exitStats().enabled, false, 'a machine that does not count stays so');
  await machine.startExitStats();
  await type(booted, 'abcd');
  const before = machine.exitStats();
  t.equal(before.vcpus[0]!.io.find((row) => row.port === 0x3f8 && row.direction === 'out')?.count, 4);
  await machine.resetExitStats();
  const reset = machine.exitStats();
  t.ok(reset.since! >= before.since!, 'since: the reset');
  t.same(reset.vcpus[0]!.io, [], 'no port exits counted since');
  await type(booted, 'xyz');
  const io = Object.fromEntries(machine.exitStats().vcpus[0]!.io.map((row) => [`${row.port.toString(16)} ${row.direction}`, row.count]));
  t.same(io, { '3fd in': 6, '3fa in': 3, '3f8 in': 3, '3f8 out': 3 });
  t.equal(machine.exitStats().vcpus[0]!.reasons.find((row) => row.reason === 'io')?.count, 15);
});

t.test('the control API and the command: trace --start/--stop, stats --reset', { skip }, async (t) => {
  const booted = await echoMachine(t);
  const socketPath = path.join(dir, 'api.sock');
  const api = await startApiServer(socketPath, apiMachine(booted.machine));
  t.teardown(() => api.close());
  const file = path.join(dir, 'api.trace');
  await t.rejects(callApi(socketPath, 'trace-start', { path: 'relative.trace' }), { code: 'ERR_INVALID_ARG_VALUE', message: 'trace-start: params.path must be an absolute file path' });
  t.same(await callApi(socketPath, 'trace-stop', {}), { path: null });

  const started = await nodeKvmInProcess(['trace', '--api-socket', socketPath, '--start', file]);
  t.equal(started.status, 0, started.stderr);
  t.equal(started.stdout, `tracing exits to ${file}\n`);
  await t.rejects(callApi(socketPath, 'trace-start', { path: file }), { code: 'ERR_MACHINE_STATE' });
  await type(booted, 'k');
  const stopped = await nodeKvmInProcess(['trace', '--api-socket', socketPath, '--stop']);
  t.equal(stopped.stdout, `exit trace stopped: ${file}\n`);
  t.same(guestExits(readExitTrace(file).records), exitsOfByte('k'));
  t.equal((await nodeKvmInProcess(['trace', '--api-socket', socketPath, '--stop'])).stdout, 'the machine was not tracing its exits\n');
  const bad = await nodeKvmInProcess(['trace', '--api-socket', socketPath]);
  t.equal(bad.status, 1);
  t.match(bad.stderr, 'trace --api-socket needs one of --start FILE and --stop');

  t.equal((await nodeKvmInProcess(['stats', '--api-socket', socketPath, '--reset'])).stdout, 'the machine does not count exits\n');
  await callApi(socketPath, 'stats', { start: true });
  await type(booted, 'mn');
  const reset = await nodeKvmInProcess(['stats', '--api-socket', socketPath, '--reset']);
  t.equal(reset.stdout, 'exit statistics reset\n');
  await type(booted, 'o');
  const stats = await callApi(socketPath, 'stats', { start: false });
  const io = stats.vcpus[0]!.io.map(({ port, direction, count }) => `${port.toString(16)} ${direction} ${count}`).sort();
  t.same(io, ['3f8 in 1', '3f8 out 1', '3fa in 1', '3fd in 2'], 'only o since the reset');
  const viaApi = await callApi(socketPath, 'stats-reset', {});
  t.equal(viaApi.enabled, true);
  t.same(viaApi.vcpus[0]!.io, []);
});
