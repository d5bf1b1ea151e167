// Post-copy against pre-copy for a guest that writes memory as fast as it can (the dirtier, 16 MiB
// range) at two RAM sizes, a quarter of each filled with data: the guest's downtime, the whole
// migration's time, post-copy's duration and its fault latency (from a fault to its page placed,
// at the destination). Source and destination in this one process, over a unix socket, sharing
// the host's CPUs: compare the modes side by side, not with another run.
//
//   npm run bench:postcopy -- [--rounds R] [--json]
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { hostInfo, median } from './report.js';
import { setPostcopyDirectPlacement } from '../lib/migration/postcopy-destination.js';
import { GUEST_PARAMS_ADDR, Machine, VcpuWorkerPool } from '../lib/index.js';
import type { MigrateOptions, MigrationStats } from '../lib/migration/types.js';

const MiB = 1024 * 1024;
const RANGE_BYTES = 16 * MiB;
/** Above the dirtier's range (2 MiB + 16 MiB). */
const FILL_ADDR = 32 * MiB;
/** Between the range and the fill. */
const SCRATCH_ADDR = 24 * MiB;
const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const dirtier = path.join(root, 'guests', 'build', 'dirtier-user.elf');
const progress = (text: string) => process.stderr.write(`${text}\n`);

const { values } = parseArgs({ options: { rounds: { type: 'string', default: '3' }, json: { type: 'boolean', default: false }, help: { type: 'boolean', short: 'h' } } });
if (values.help) {
  console.log('usage: npm run bench:postcopy -- [--rounds R (default 3)] [--json]');
  process.exit(0);
}
const rounds = Number(values.rounds);
if (!Number.isInteger(rounds) || rounds < 1 || rounds > 50) throw new RangeError(`--rounds must be an integer 1..50, got '${values.rounds}'`);

interface Mode {
  key: string;
  title: string;
  options: MigrateOptions;
  /** Post-copy's destination stages each page before placing it (as before it placed them from its read buffers). */
  staged?: boolean;
}

const MODES: Mode[] = [
  { key: 'precopy', title: 'pre-copy', options: {} },
  // A budget no round meets (and 1 MiB the VMM writes each round, should the guest's vCPU get no
  // CPU on a loaded host): at the cap, post-copy instead of a stop-and-copy.
  { key: 'after-rounds', title: "post-copy 'after-rounds' (5 rounds)", options: { postcopy: 'after-rounds', maxIterations: 5, downtimeBudgetMs: 0.0001 } },
  { key: 'postcopy', title: 'post-copy at once', options: { postcopy: true } },
  { key: 'postcopy-staged', title: 'post-copy at once, staged copy', options: { postcopy: true }, staged: true },
];
const SIZES = [256 * MiB, 1024 * MiB];

/** Serial output collected, with a wait for a line. */
function serialSink() {
  let text = '';
  const waiters = new Set<() => void>();
  const output = {
    write(chunk: Uint8Array | string) {
      text += typeof chunk === 'string' ? chunk : Buffer.from(chunk).toString('latin1');
      for (const wake of waiters) wake();
      return true;
    },
  } as unknown as NodeJS.WritableStream;
  const until = (wanted: string, timeoutMs = 30_000) => new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`the guest did not print ${JSON.stringify(wanted)}; it printed ${JSON.stringify(text.slice(-200))}`)), timeoutMs);
    const check = () => {
      if (!text.includes(wanted)) return;
      waiters.delete(check);
      clearTimeout(timer);
      resolve();
    };
    waiters.add(check);
    check();
  });
  return { output, until, text: () => text };
}

const lastPass = (text: string) => Number([...text.matchAll(/pass (\d+) ok\n/g)].at(-1)?.[1] ?? 0);

async function migrateOnce(pool: VcpuWorkerPool, memoryBytes: number, mode: Mode, dir: string): Promise<MigrationStats> {
  const address = `unix:${path.join(dir, `m-${process.hrtime.bigint()}.sock`)}`;
  const destinationSerial = serialSink();
  let onListening!: () => void;
  const listening = new Promise<void>((resolve) => (onListening = resolve));
  const arrived = Machine.incoming(address, { pool, serial: { output: destinationSerial.output }, onListening, log: () => {}, memoryBytes, vcpus: 1, irqchip: false });
  arrived.catch(() => {});
  const serial = serialSink();
  const source = await Machine.create({ image: dirtier, memoryBytes, irqchip: false, pool, serial: { output: serial.output }, log: () => {} });
  try {
    source.writeMemory(FILL_ADDR, randomBytes(memoryBytes / 4));
    const params = new Uint8Array(8);
    new DataView(params.buffer).setUint32(4, RANGE_BYTES, true);
    source.writeMemory(GUEST_PARAMS_ADDR, params);
    source.start();
    await serial.until('pass 2 ok\n');
    await listening;
    const scratch = new Uint8Array(MiB).fill(0x5a);
    const stats = await source.migrate(address, {
      ...mode.options,
      onProgress: (p) => mode.key === 'after-rounds' && (p.phase === 'setup' || p.phase === 'precopy') && source.writeMemory(SCRATCH_ADDR, scratch),
    });
    const destination = await arrived;
    await destinationSerial.until(`pass ${lastPass(serial.text()) + 2} ok\n`);
    if (/BAD/.test(destinationSerial.text())) throw new Error(`the dirtier found its memory damaged: ${destinationSerial.text().slice(-200)}`);
    await destination.stop();
    return stats;
  } finally {
    await source.stop();
    await (await arrived.catch(() => null))?.stop();
  }
}

const pool = await VcpuWorkerPool.create(2);
const dir = mkdtempSync(path.join(os.tmpdir(), 'node-kvm-bench-postcopy-'));
const results: Record<string, Record<string, number[]>> = {};
try {
  for (let round = 1; round <= rounds; round++) {
    for (const memoryBytes of SIZES) {
      for (const mode of MODES) {
        const key = `${memoryBytes / MiB} MiB, ${mode.title}`;
        progress(`round ${round}/${rounds}: ${key}`);
        setPostcopyDirectPlacement(!mode.staged);
        const stats = await migrateOnce(pool, memoryBytes, mode, dir);
        setPostcopyDirectPlacement(true);
        const row = (results[key] ??= {});
        const push = (name: string, value: number) => (row[name] ??= []).push(value);
        push('downtimeMs', stats.downtimeMs);
        push('totalMs', stats.totalTimeMs);
        push('iterations', stats.iterations);
        push('postcopyMs', stats.postcopy?.durationMs ?? 0);
        const postcopyPages = (stats.postcopy?.pagesBackground ?? 0) + (stats.postcopy?.pagesOnDemand ?? 0);
        push('postcopyGiBs', stats.postcopy ? (postcopyPages * 4096) / 1024 ** 3 / (stats.postcopy.durationMs / 1000) : 0);
        push('faults', stats.postcopy?.faults ?? 0);
        push('requests', stats.postcopy?.requests ?? 0);
        push('faultP50Ms', stats.postcopy?.faultLatencyMs.p50 ?? 0);
        push('faultP90Ms', stats.postcopy?.faultLatencyMs.p90 ?? 0);
        push('faultP99Ms', stats.postcopy?.faultLatencyMs.p99 ?? 0);
      }
    }
  }
} finally {
  await pool.close();
  rmSync(dir, { recursive: true, force: true });
}
const medians = Object.fromEntries(Object.entries(results).map(([key, row]) => [key, Object.fromEntries(Object.entries(row).map(([name, list]) => [name, median(list)]))]));
if (values.json) {
  console.log(JSON.stringify({ host: hostInfo(), rounds, medians }, null, 2));
} else {
  console.log(`host: ${JSON.stringify(hostInfo())}; medians of ${rounds} rounds; dirtier 16 MiB range, a quarter of RAM filled\n`);
  const f = (n: number) => n.toFixed(n < 10 ? 2 : 1);
  console.log('| guest, mode | downtime | total | rounds | post-copy | post-copy stream | faults (requests) | fault p50 / p90 / p99 |');
  console.log('|---|---|---|---|---|---|---|---|');
  for (const [key, m] of Object.entries(medians)) {
    const post = m.postcopyMs! > 0;
    console.log(`| ${key} | ${f(m.downtimeMs!)} ms | ${f(m.totalMs!)} ms | ${m.iterations} | ${post ? `${f(m.postcopyMs!)} ms` : '-'} | ${post ? `${m.postcopyGiBs!.toFixed(2)} GiB/s` : '-'} | ${post ? `${m.faults} (${m.requests})` : '-'} | ${post ? `${f(m.faultP50Ms!)} / ${f(m.faultP90Ms!)} / ${f(m.faultP99Ms!)} ms` : '-'} |`);
  }
}
process.exit(0);
