// Exit statistics and the exit trace against guests that make a known number of exits of each
// kind (guests/inspect.S: 2 port reads, an MMIO write and read, 3 port writes, HLT; hello.S: 21
// COM1 writes): exact counts, the trace read back record by record, and the trace command.
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import t from 'tap';
import { Machine, readExitTrace, summarizeExitTrace, formatTraceRecord, parseExitTrace } from '../../lib/index.js';
import { TRACE_HEADER_BYTES, TRACE_RECORD_BYTES } from '../../lib/vmm/exit-trace.js';
import { nodeKvmInProcess } from '../helpers/cli.js';
import { noKvm, repoRoot } from '../helpers/kvm.js';
import { sharedPool } from '../helpers/pool.js';

const skip = noKvm;
const pool = noKvm ? undefined : sharedPool(1);
const image = (name: string) => path.join(repoRoot, 'guests', 'build', name);
const dir = mkdtempSync(path.join(tmpdir(), 'node-kvm-exits-'));
t.teardown(() => rmSync(dir, { recursive: true, force: true }));

t.test('exact counts per reason, port and page, and the same exits traced', { skip }, async (t) => {
  const tracePath = path.join(dir, 'inspect.trace');
  const logs: string[] = [];
  const machine = await Machine.create({
    image: image('inspect.elf'), memoryBytes: 16 << 20, irqchip: false, pool, serial: { output: null },
    exitStats: true, traceExits: tracePath, log: (message) => logs.push(message),
  });
  machine.start();
  t.same(await machine.wait(), { reason: 'hlt', code: 0, vcpu: 0 });

  const stats = machine.exitStats();
  t.equal(stats.enabled, true);
  const vcpu = stats.vcpus[0]!;
  const reasons = Object.fromEntries(vcpu.reasons.map((r) => [r.reason, r.count]));
  t.equal(reasons.io, 5, '5 port I/O exits');
  t.equal(reasons.mmio, 2, '2 MMIO exits');
  t.equal(reasons.hlt, 1, '1 HLT');
  t.same(vcpu.io.map(({ port, direction, count }) => ({ port, direction, count })), [
    { port: 0x80, direction: 'out', count: 3 },
    { port: 0x3fd, direction: 'in', count: 2 },
  ]);
  t.same(vcpu.mmio.map(({ address, direction, count }) => ({ address, direction, count })).sort((a, b) => a.direction.localeCompare(b.direction)), [
    { address: 0xc0000000, direction: 'read', count: 1 },
    { address: 0xc0000000, direction: 'write', count: 1 },
  ]);
  t.ok(vcpu.io.every((row) => row.timeNs > 0), 'time spent handling each is measured');
  t.equal(stats.total.count, vcpu.count);

  const trace = readExitTrace(tracePath);
  t.equal(trace.vcpus, 1);
  t.equal(trace.trailingBytes, 0);
  t.equal(readFileSync(tracePath).length, TRACE_HEADER_BYTES + trace.records.length * TRACE_RECORD_BYTES);
  // The kick that hands the vCPU its trace comes first (an 'intr'); then the guest's exits.
  const guest = trace.records.filter((record) => record.kind !== 'intr');
  t.same(guest.map((r) => [r.kind, Number(r.address), r.size, r.data.toString('hex')]), [
    ['io-in', 0x3fd, 1, '60'], // COM1's line status: transmitter empty
    ['io-in', 0x3fd, 1, '60'],
    ['mmio-write', 0xc0000000, 4, '78563412'],
    ['mmio-read', 0xc0000000, 4, 'ffffffff'], // no device: all ones
    ['io-out', 0x80, 1, '03'],
    ['io-out', 0x80, 1, '02'],
    ['io-out', 0x80, 1, '01'],
    ['hlt', 0, 0, ''],
  ]);
  t.ok(guest.every((r) => r.rip >= 0x100000n && r.rip < 0x100100n), 'every RIP lies in the guest\'s code');
  t.ok(guest.every((r, i) => i === 0 || (r.rip >= guest[i - 1]!.rip && r.timeNs >= guest[i - 1]!.timeNs)), 'RIP and time move forward');
  t.match(formatTraceRecord(guest[4]!), /vcpu0  io-out +rip=0x00000000001000[0-9a-f]{2}  port=0x0080 size=1 data=0x03$/);
  t.same(summarizeExitTrace(trace).filter((row) => !row.key.startsWith('intr')), [
    { key: 'io-out port 0x0080', count: 3 },
    { key: 'io-in port 0x03fd', count: 2 },
    { key: 'hlt', count: 1 },
    { key: 'mmio-read page 0xc0000000', count: 1 },
    { key: 'mmio-write page 0xc0000000', count: 1 },
  ]);

  const summary = await nodeKvmInProcess(['trace', tracePath, '--summary']);
  t.equal(summary.status, 0);
  t.match(summary.stdout, /^\d+ exits, 1 vCPUs/);
  t.match(summary.stdout, /\n +3  io-out port 0x0080\n/);
  const lines = await nodeKvmInProcess(['trace', tracePath]);
  t.equal(lines.stdout.trim().split('\n').length, trace.records.length, 'one line per exit');
});

t.test('hello.S: 21 COM1 writes, counted once counting is turned on', { skip }, async (t) => {
  const machine = await Machine.create({ image: image('hello.bin'), memoryBytes: 1 << 20, irqchip: false, pool, serial: { output: null } });
  t.same(machine.exitStats().vcpus[0]!.reasons, [], 'nothing counted before');
  t.equal(machine.exitStats().enabled, false);
  machine.startExitStats();
  machine.start();
  await machine.wait();
  const [vcpu] = machine.exitStats().vcpus;
  t.same(vcpu!.io.map(({ port, direction, count }) => ({ port, direction, count })), [{ port: 0x3f8, direction: 'out', count: 21 }]);
});

t.test('node-kvm run --trace-exits, read back by node-kvm trace', { skip }, async (t) => {
  const tracePath = path.join(dir, 'hello.trace');
  const run = await nodeKvmInProcess(['run', image('hello.bin'), '--memory', '1M', '--no-irqchip', '--trace-exits', tracePath]);
  t.equal(run.status, 0);
  const summary = await nodeKvmInProcess(['trace', tracePath, '--summary']);
  t.match(summary.stdout, /\n +21  io-out port 0x03f8\n +1  hlt\n/);
  const lines = (await nodeKvmInProcess(['trace', tracePath, '--limit', '30'])).stdout.split('\n').filter((line) => line.includes('io-out'));
  t.same(Buffer.from(lines.map((line) => Number(/data=(0x[0-9a-f]+)/.exec(line)![1]))).toString(), 'Hello from node-kvm!\n', 'the bytes written, in order');
});

t.test('a trace file that cannot be created fails the build, which leaves nothing behind', { skip }, async (t) => {
  const missing = path.join(dir, 'no-such-dir', 'x.trace');
  await t.rejects(Machine.create({ image: image('hello.bin'), memoryBytes: 1 << 20, pool, traceExits: missing }), { code: 'ENOENT', message: `cannot create the exit trace ${missing}: ENOENT` });
  // The pool's thread came back: the next machine runs.
  const machine = await Machine.create({ image: image('hello.bin'), memoryBytes: 1 << 20, irqchip: false, pool, serial: { output: null } });
  machine.start();
  t.equal((await machine.wait()).reason, 'hlt');
});

t.test('a trace file that is not one, or of another version, is refused', async (t) => {
  t.throws(() => parseExitTrace(Buffer.from('not a trace at all, not at all.....')), { code: 'ERR_INVALID_ARG_VALUE', message: /not an exit trace/ });
  const header = Buffer.alloc(TRACE_HEADER_BYTES);
  header.write('NKVMTRCE', 0, 'latin1');
  header.writeUInt16LE(9, 8);
  header.writeUInt16LE(TRACE_RECORD_BYTES, 10);
  t.throws(() => parseExitTrace(header), { message: /version 9/ });
  header.writeUInt16LE(1, 8);
  const partial = parseExitTrace(Buffer.concat([header, Buffer.alloc(TRACE_RECORD_BYTES + 7)]));
  t.equal(partial.records.length, 1);
  t.equal(partial.trailingBytes, 7);
});
