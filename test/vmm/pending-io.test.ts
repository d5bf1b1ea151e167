// A guest's output carries on exactly across pauses and snapshots taken while it writes: the
// `count` guest writes 0, 1, 2, ... to COM1, one exit per byte, so a pause nearly always lands on
// a port write. (KVM finishes an exit's I/O only at the next KVM_RUN; the vCPU thread completes it
// before it parks, so that a saved state never has the guest write a byte twice or lose one.)
import t from 'tap';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { Machine } from '../../lib/index.js';
import { noKvm, repoRoot } from '../helpers/kvm.js';
import { boot } from '../helpers/machine.js';
import { sharedPool } from '../helpers/pool.js';

const image = path.join(repoRoot, 'guests', 'build', 'count.bin');
const pool = noKvm ? undefined : sharedPool(2);
const ROUNDS = 12;

/** Where the sequence 0, 1, 2, ... (mod 256) first breaks, or -1. */
function breakIn(bytes: Buffer): number {
  for (let i = 0; i < bytes.length; i++) if (bytes[i] !== (i & 0xff)) return i;
  return -1;
}

t.test('snapshots taken while the guest writes carry on the sequence with no byte twice or lost', { skip: noKvm }, async (t) => {
  const dir = mkdtempSync(path.join(tmpdir(), 'node-kvm-pending-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  let output = Buffer.alloc(0);
  const { PassThrough } = await import('node:stream');
  const collect = () => {
    const sink = new PassThrough();
    sink.on('data', (chunk: Buffer) => (output = Buffer.concat([output, chunk])));
    return sink;
  };
  const first = await boot({ image, memoryBytes: 1 << 20, pool, serial: { output: collect() } });
  let machine: Machine = first.machine;
  machine.start();
  const file = path.join(dir, 'count.snap');
  for (let round = 0; round < ROUNDS; round++) {
    // Some output, then a snapshot (which pauses it) and a restore into a new machine.
    const before = output.length;
    while (output.length < before + 100) await new Promise((resolve) => setImmediate(resolve));
    // Paused first, so that it writes nothing after the snapshot (a running machine's snapshot
    // lets it run on).
    await machine.pause();
    await machine.snapshot(file);
    await machine.stop();
    await new Promise((resolve) => setImmediate(resolve));
    machine = await Machine.restore(file, { pool, log: () => {}, serial: { output: collect() } });
    machine.start();
  }
  const before = output.length;
  while (output.length < before + 100) await new Promise((resolve) => setImmediate(resolve));
  await machine.stop();
  t.ok(output.length > ROUNDS * 100);
  const at = breakIn(output);
  t.equal(at, -1, `the sequence holds over ${output.length} bytes and ${ROUNDS} restores (${at < 0 ? '' : output.subarray(Math.max(0, at - 4), at + 4).toString('hex')})`);
});

t.test('pausing and resuming in place keeps the sequence too', { skip: noKvm }, async (t) => {
  const booted = await boot({ image, memoryBytes: 1 << 20, pool });
  t.teardown(() => void booted.machine.stop());
  booted.machine.start();
  for (let round = 0; round < 20; round++) {
    await booted.waitForOutput(new RegExp(`[^]{${(round + 1) * 100}}`));
    await booted.machine.pause();
    booted.machine.resume();
  }
  t.equal(breakIn(Buffer.from(booted.output(), 'latin1')), -1);
});
