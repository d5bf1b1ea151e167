// virtio-blk throughput from inside a guest, against the references measured in the same run:
// `dd` on the same image file on the host (the page cache both go through), and the port-exit
// rate of the same VMM (the `exits` guest), since a request costs the guest about one exit.
// The `disk` guest (bench mode, see guests/disk.c) runs sequential requests of 4 KiB and 1 MiB,
// reads and writes, one at a time (as dd does; plus 4 KiB reads eight in flight), and prints "bench start" / "bench done N"; the time between the two lines,
// as they arrive, is the figure.
//
//   npm run bench:blk -- [--rounds R] [--json]
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Writable } from 'node:stream';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { hostInfo, median } from './report.js';
import { measureVmmExits } from './vmm-exits.js';
import { GUEST_PARAMS_ADDR, Machine } from '../lib/index.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const DISK_BYTES = 256 * MiB;
const GUEST_RAM = 128 * MiB;

interface Case {
  name: string;
  op: 'read' | 'write';
  requestBytes: number;
  totalBytes: number;
  /** Requests in flight (dd has one). */
  depth: number;
}

const CASES: Case[] = [
  { name: 'read 4 KiB', op: 'read', requestBytes: 4 * KiB, totalBytes: 16 * MiB, depth: 1 },
  { name: 'write 4 KiB', op: 'write', requestBytes: 4 * KiB, totalBytes: 16 * MiB, depth: 1 },
  { name: 'read 1 MiB', op: 'read', requestBytes: MiB, totalBytes: 128 * MiB, depth: 1 },
  { name: 'write 1 MiB', op: 'write', requestBytes: MiB, totalBytes: 128 * MiB, depth: 1 },
  { name: 'read 4 KiB x8', op: 'read', requestBytes: 4 * KiB, totalBytes: 16 * MiB, depth: 8 },
];

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const { values } = parseArgs({ options: { rounds: { type: 'string', default: '3' }, json: { type: 'boolean', default: false } } });
const rounds = Number(values.rounds);
if (!Number.isInteger(rounds) || rounds < 1) throw new Error('--rounds must be a positive integer');

/** Runs one case in the `disk` guest; seconds between "bench start" and "bench done". */
async function guestRun(image: string, c: Case): Promise<{ seconds: number; requests: number }> {
  let text = '';
  let started = 0;
  let done = 0;
  const output = new Writable({
    write(chunk: Buffer, _encoding, callback) {
      const now = performance.now();
      text += chunk.toString('latin1');
      if (!started && text.includes('bench start')) started = now;
      if (!done && /bench done \d+/.test(text)) done = now;
      callback();
    },
  });
  const machine = await Machine.create({
    image: path.join(root, 'guests', 'build', 'disk.elf'), memoryBytes: GUEST_RAM, disks: [{ path: image }], serial: { output },
  });
  const params = new DataView(new ArrayBuffer(24));
  params.setUint32(0, 3, true); // bench
  params.setUint32(8, c.requestBytes, true);
  params.setUint32(12, c.totalBytes, true);
  params.setUint32(16, c.op === 'write' ? 1 : 0, true);
  params.setUint32(20, c.depth, true); // requests in flight
  machine.writeMemory(GUEST_PARAMS_ADDR, new Uint8Array(params.buffer));
  machine.start();
  const exit = await machine.wait();
  const requests = Number(/bench done (\d+)/.exec(text)?.[1] ?? NaN);
  if (exit.reason !== 'debug-exit' || exit.code !== 0x10 || !started || !done) {
    throw new Error(`the disk guest failed (${exit.reason} ${exit.code ?? ''}): ${text.trim().split('\n').slice(-3).join(' | ')}`);
  }
  return { seconds: (done - started) / 1000, requests };
}

/** dd on the host, same file, same request size: its own reported seconds. */
function ddRun(image: string, c: Case): number {
  const bs = c.requestBytes >= MiB ? `${c.requestBytes / MiB}M` : `${c.requestBytes / KiB}K`;
  const count = String(c.totalBytes / c.requestBytes);
  const args = c.op === 'read' ? [`if=${image}`, 'of=/dev/null', `bs=${bs}`, `count=${count}`] : ['if=/dev/zero', `of=${image}`, `bs=${bs}`, `count=${count}`, 'conv=notrunc'];
  const result = spawnSync('dd', args, { encoding: 'utf8' });
  const seconds = Number(/copied, ([\d.e-]+) s/.exec(result.stderr)?.[1]);
  if (result.status !== 0 || !Number.isFinite(seconds)) throw new Error(`dd failed: ${result.stderr}`);
  return seconds;
}

const dir = mkdtempSync(path.join(os.tmpdir(), 'node-kvm-bench-blk-'));
const image = path.join(dir, 'disk.img');
try {
  // A written (not sparse) image, in the page cache for both the guest and dd.
  writeFileSync(image, Buffer.alloc(DISK_BYTES, 0x5a));
  const rows = [];
  for (const c of CASES) {
    const guest: number[] = [];
    const dd: number[] = [];
    let requests = 0;
    for (let round = 0; round < rounds; round++) {
      const run = await guestRun(image, c);
      guest.push(run.seconds);
      requests = run.requests;
      dd.push(ddRun(image, c));
    }
    const guestSeconds = median(guest);
    const ddSeconds = median(dd);
    rows.push({
      case: c.name, requests, guestMiBps: c.totalBytes / MiB / guestSeconds, ddMiBps: c.totalBytes / MiB / ddSeconds,
      ratio: ddSeconds / guestSeconds, requestsPerSec: requests / guestSeconds, usPerRequest: (guestSeconds * 1e6) / requests,
    });
  }
  const exits = await measureVmmExits(root);
  const report = { host: hostInfo(), rounds, vmmExitsPerSec: exits.exitsPerSec, rows };
  if (values.json) {
    console.log(JSON.stringify(report));
  } else {
    console.log('virtio-blk from the disk guest vs dd on the host (same file, page cache), medians of', rounds);
    console.log(JSON.stringify(report.host));
    for (const row of rows) {
      console.log(
        `${row.case.padEnd(14)} guest ${row.guestMiBps.toFixed(1).padStart(8)} MiB/s  dd ${row.ddMiBps.toFixed(1).padStart(8)} MiB/s  ratio ${row.ratio.toFixed(3)}` +
          `  ${row.requestsPerSec.toFixed(0).padStart(7)} req/s (${row.usPerRequest.toFixed(1)} us/req)`,
      );
    }
    const small = rows[0]!;
    console.log(`port exits (exits guest, same VMM): ${exits.exitsPerSec.toFixed(0)} /s; 4 KiB reads per port exit: ${(small.requestsPerSec / exits.exitsPerSec).toFixed(3)}`);
  }
} finally {
  rmSync(dir, { recursive: true, force: true });
}
