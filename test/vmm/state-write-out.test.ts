// A live migration's pause of a one-vCPU machine writes the VM's and the vCPU's saved state out
// the moment the vCPU has parked (StateWriteOut), the vCPU saved on the main thread once a save
// on its own thread has told what that needs: here, into a file and into a full socket, what it
// wrote, with and without an earlier save, and that a machine of more vCPUs writes nothing.
import { mkdtempSync, openSync, closeSync, readFileSync, rmSync, writeSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import t, { type Test } from 'tap';
import { Machine } from '../../lib/index.js';
import { checkVmStateBlob } from '../../lib/kvm/vm-state-blob.js';
import { checkVcpuStateBlob, vcpuSaveInputs, vcpuStateBlobHeader, vcpuStateBlobSections, VcpuStateTag } from '../../lib/kvm/vcpu-state-blob.js';
import { machineInternals } from '../../lib/vmm/machine.js';
import { RECORD_HEADER_BYTES, RECORD_OVERHEAD_BYTES, encodeRecord } from '../../lib/vmm/records.js';
import type { StateWrittenOut } from '../../lib/vmm/types.js';
import { guestImage, noKvm } from '../helpers/kvm.js';
import { sharedPool } from '../helpers/pool.js';

const pool = noKvm ? undefined : sharedPool(2);
const log = () => {};
const VM_TYPE = 5;
const VCPU_TYPE = 4;

async function runningMachine(t: Test, vcpus = 1): Promise<Machine> {
  const machine = await Machine.create({ image: guestImage('echo-irq'), memoryBytes: 2 << 20, vcpus, irqchip: true, pool, log, serial: { output: null } });
  t.teardown(() => machine.stop());
  machine.start();
  return machine;
}

/** The records in `bytes` from `at` on: [type, payload] each, their CRCs checked by re-encoding. */
function readRecords(t: Test, bytes: Uint8Array, at: number): [number, Uint8Array][] {
  const records: [number, Uint8Array][] = [];
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  while (at < bytes.length) {
    const type = view.getUint16(at, true);
    const length = view.getUint32(at + 4, true);
    const payload = bytes.subarray(at + RECORD_HEADER_BYTES, at + RECORD_HEADER_BYTES + length);
    t.same(Buffer.from(bytes.subarray(at, at + RECORD_OVERHEAD_BYTES + length)), Buffer.from(encodeRecord(type, payload)), `record ${records.length} sealed with its CRC`);
    records.push([type, payload]);
    at += RECORD_OVERHEAD_BYTES + length;
  }
  return records;
}

t.test('a one-vCPU machine\'s pause writes the VM\'s and the vCPU\'s state out as it stops', { skip: noKvm }, async (t) => {
  const machine = await runningMachine(t);
  const internals = machineInternals(machine);
  const dir = mkdtempSync(path.join(os.tmpdir(), 'node-kvm-write-out-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const file = path.join(dir, 'state');
  const fd = openSync(file, 'w');
  const prefix = Uint8Array.of(1, 2, 3, 4);
  let written: StateWrittenOut | null | undefined;
  let states;
  try {
    states = await internals.pause(true, { fd, prefix, vmRecordType: VM_TYPE, vcpuRecordType: VCPU_TYPE }, (out) => (written = out));
  } finally {
    closeSync(fd);
  }
  t.equal(machine.state, 'paused');
  t.ok(written, 'it says what it wrote');
  t.equal(written!.writtenBytes, written!.totalBytes, 'all of it, at once');
  t.equal(written!.bytes.length, 0, 'nothing left for the caller');
  const bytes = new Uint8Array(readFileSync(file));
  t.equal(bytes.length, written!.totalBytes, 'the file holds as much as it says it wrote');
  t.same([...bytes.subarray(0, 4)], [1, 2, 3, 4], 'the prefix first');
  const records = readRecords(t, bytes, prefix.length);
  t.same(records.map(([type]) => type), [VM_TYPE, VCPU_TYPE], 'then the VM\'s state, then the vCPU\'s');
  t.equal(checkVmStateBlob(records[0]![1]), null, 'the VM\'s state is whole');
  t.same(Buffer.from(records[0]![1]), Buffer.from(written!.vm), 'the one it hands back');
  t.same(Buffer.from(records[1]![1]), Buffer.from(states![0]!), 'the vCPU\'s state is the one the pause returns');
  machine.resume();
  t.equal(machine.state, 'running', 'the machine runs on');
});

t.test('after a save on its thread, the pause saves the parked vCPU on the main thread: the same state', { skip: noKvm }, async (t) => {
  const machine = await runningMachine(t);
  const internals = machineInternals(machine);
  // A migration's warm-up: the vCPU's thread saves it once, the guest running on.
  t.ok(await internals.warmUpSave(), 'warmed up');
  const dir = mkdtempSync(path.join(os.tmpdir(), 'node-kvm-write-out-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const file = path.join(dir, 'state');
  const fd = openSync(file, 'w');
  let written: StateWrittenOut | null | undefined;
  let states;
  try {
    states = await internals.pause(true, { fd, prefix: new Uint8Array(0), vmRecordType: VM_TYPE, vcpuRecordType: VCPU_TYPE }, (out) => (written = out));
  } finally {
    closeSync(fd);
  }
  t.equal(written!.writtenBytes, written!.totalBytes, 'written whole');
  const records = readRecords(t, new Uint8Array(readFileSync(file)), 0);
  t.same(records.map(([type]) => type), [VM_TYPE, VCPU_TYPE]);
  const sent = records[1]![1];
  t.same(Buffer.from(sent), Buffer.from(states![0]!), 'the state the pause returns');
  t.equal(checkVcpuStateBlob(sent), null, 'a whole vCPU state');
  // What the vCPU's own thread saves now, still paused, is the same state (but the TSC, which runs on).
  const byThread = (await internals.saveCpuState()).vcpus[0] as Uint8Array;
  const theirs = vcpuStateBlobSections(byThread);
  const ours = vcpuStateBlobSections(sent);
  t.same([...ours.keys()], [...theirs.keys()], 'the same sections');
  for (const [tag, bytes] of ours) {
    if (tag === VcpuStateTag.Msrs) t.same([...vcpuSaveInputs(sent)!.msrIndices], [...vcpuSaveInputs(byThread)!.msrIndices], 'the same MSRs');
    else t.same(Buffer.from(bytes), Buffer.from(theirs.get(tag)!), `section ${tag} as its thread saves it`);
  }
  t.same(vcpuStateBlobHeader(sent), vcpuStateBlobHeader(byThread), 'the same header (vCPU, flags, TSC rate)');
  machine.resume();
  t.equal(machine.state, 'running', 'the machine runs on');
});

t.test('a socket that takes none of it: all of it is left to the caller', { skip: noKvm }, async (t) => {
  const machine = await runningMachine(t);
  const internals = machineInternals(machine);
  const dir = mkdtempSync(path.join(os.tmpdir(), 'node-kvm-write-out-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  // Paused from the start: a socket paused later goes on reading up to its high-water mark, and
  // would make room in the kernel's buffer while the pause writes.
  const server = net.createServer({ pauseOnConnect: true });
  await new Promise<void>((resolve) => server.listen(path.join(dir, 's.sock'), resolve));
  t.teardown(() => server.close());
  const accepted = new Promise<net.Socket>((resolve) => server.once('connection', resolve));
  const client = net.connect(path.join(dir, 's.sock'));
  await new Promise((resolve) => client.once('connect', resolve));
  const peer = await accepted; // never reads
  t.teardown(() => {
    client.destroy();
    peer.destroy();
  });
  // Until the socket takes not a byte more.
  const fd = (client as unknown as { _handle: { fd: number } })._handle.fd;
  for (let chunk = 64 * 1024; chunk >= 1;) {
    try {
      writeSync(fd, Buffer.alloc(chunk));
    } catch (error) {
      t.equal((error as NodeJS.ErrnoException).code, 'EAGAIN');
      chunk >>= 1;
    }
  }
  let written: StateWrittenOut | null | undefined;
  await internals.pause(true, { fd, prefix: new Uint8Array(0), vmRecordType: VM_TYPE, vcpuRecordType: VCPU_TYPE }, (out) => (written = out));
  t.ok(written, 'it says what it meant to write');
  t.equal(written!.writtenBytes, 0, 'it wrote nothing: all of it is left to the caller');
  t.equal(written!.bytes.length, written!.totalBytes, 'which has it whole');
  const records = readRecords(t, written!.bytes, 0);
  t.same(records.map(([type]) => type), [VM_TYPE, VCPU_TYPE], 'the VM\'s state, then the vCPU\'s');
  t.equal(machine.state, 'paused', 'the pause itself went through');
  machine.resume();
});

t.test('a machine of two vCPUs writes nothing out: its main thread sends the state', { skip: noKvm }, async (t) => {
  const machine = await runningMachine(t, 2);
  const internals = machineInternals(machine);
  let written: StateWrittenOut | null | undefined;
  const states = await internals.pause(true, { fd: 1_000_000, prefix: new Uint8Array(0), vmRecordType: VM_TYPE, vcpuRecordType: VCPU_TYPE }, (out) => (written = out));
  t.equal(written, null, 'nothing written');
  t.equal(states?.length, 2, 'both vCPUs\' states come back as ever');
  machine.resume();
});
