// Same-host live update (migrate with local: true) against the copying migration of the same
// guest, side by side in one run: each migration goes over a unix socket to a destination in
// another process (bench/migrate-peer.ts), which checks that the guest runs there (and, for the
// touched guest, that a slice of its data arrived intact). Downtime is measured at the source,
// from the pause to the destination's word that it runs the guest; total from the call to the end.
//
//   npm run bench:migrate-local -- [--rounds R] [--json]
import { createHash } from 'node:crypto';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Writable } from 'node:stream';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { hostInfo, median } from './report.js';
import { peerScript, startPeer } from './peer.js';
import { breakdownTable, mergePhases } from './phase-breakdown.js';
import { phaseMarks, phaseTimingEnabled, type PhaseMark } from '../lib/vmm/phase-timing.js';
import { Machine } from '../lib/index.js';
import type { MigrationStats } from '../lib/migration/types.js';

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;
/** Where the touched guest's data starts: above the guest's code. */
const TOUCH_ADDR = 64 * MiB;
/** The slice the destination hashes (at the end of the touched range): hashing all of it would take seconds. */
const CHECK_BYTES = 16 * MiB;

interface Scenario {
  key: string;
  title: string;
  memoryBytes: number;
  touchedBytes: number;
}

const SCENARIOS: Scenario[] = [
  { key: 'idle256', title: '256 MiB idle', memoryBytes: 256 * MiB, touchedBytes: 0 },
  { key: 'touched2g', title: '2 GiB, 1 GiB touched', memoryBytes: 2 * GiB, touchedBytes: 1 * GiB },
];

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const idleGuest = path.join(root, 'guests', 'build', 'echo-irq.bin');
const progress = (text: string) => process.stderr.write(`${text}\n`);

function parseOptions(): { rounds: number; json: boolean } {
  const { values } = parseArgs({
    options: {
      rounds: { type: 'string', default: '5' },
      json: { type: 'boolean', default: false },
      help: { type: 'boolean', short: 'h', default: false },
    },
    strict: true,
  });
  if (values.help) {
    console.log(`usage: npm run bench:migrate-local -- [options]
  --rounds R   migrations per scenario and mode; the median is reported (default 5)
  --json       print the results as JSON`);
    process.exit(0);
  }
  const rounds = Number(values.rounds);
  if (!/^\d+$/.test(values.rounds) || rounds < 1 || rounds > 100) throw new RangeError(`--rounds must be an integer 1..100, got '${values.rounds}'`);
  return { rounds, json: values.json };
}

/** The guest's data: a pattern of 64-bit words (no zero page), and the hash of the checked slice. */
function touchPattern(bytes: number): { data: Buffer; checkSha256: string } {
  const data = Buffer.allocUnsafe(bytes);
  const words = new BigUint64Array(data.buffer, data.byteOffset, bytes / 8);
  for (let i = 0; i < words.length; i++) words[i] = BigInt(i) * 0x9e3779b97f4a7c15n & 0xffffffffffffffffn | 1n;
  return { data, checkSha256: createHash('sha256').update(data.subarray(bytes - CHECK_BYTES)).digest('hex') };
}

interface Run {
  stats: MigrationStats;
  /** Call to the source's exit, as the caller sees it. */
  wallMs: number;
  /** With NODE_KVM_PHASE_TIMING=1: the downtime's steps, both processes' (phase-breakdown.ts). */
  phases: { name: string; ms: number }[];
}

async function migrateOnce(scenario: Scenario, local: boolean, touch: { data: Buffer; checkSha256: string } | null, dir: string, round: number): Promise<Run> {
  const address = `unix:${path.join(dir, `m-${scenario.key}-${local ? 'local' : 'copy'}-${round}.sock`)}`;
  const peerArgs = ['incoming', '--address', address];
  if (touch) peerArgs.push('--hash-range', `${TOUCH_ADDR + scenario.touchedBytes - CHECK_BYTES}:${CHECK_BYTES}`);
  // Both destinations build their machine ahead (they know the shape, as with QEMU's -incoming):
  // the local one then maps the RAM it is handed over its own.
  peerArgs.push('--memory-bytes', String(scenario.memoryBytes), '--irqchip', 'on');
  const peer = startPeer(peerArgs);
  try {
    let prompt = '';
    let sawPrompt!: () => void;
    const prompted = new Promise<void>((resolve) => (sawPrompt = resolve));
    const serial = new Writable({
      write(chunk: Buffer, _encoding, callback) {
        prompt += chunk.toString('latin1');
        if (prompt.includes('irq> ')) sawPrompt();
        callback();
      },
    });
    const machine = await Machine.create({ image: idleGuest, memoryBytes: scenario.memoryBytes, vcpus: 1, irqchip: true, serial: { output: serial }, log: () => {} });
    try {
      if (touch) machine.writeMemory(TOUCH_ADDR, touch.data);
      machine.start();
      await prompted;
      // A guest that has run a moment (as in bench/migrate.ts).
      await new Promise((resolve) => setTimeout(resolve, 100));
      const bound = await peer.listening;
      const started = performance.now();
      const stats = await machine.migrate(bound, { local });
      const exit = await machine.wait();
      const wallMs = performance.now() - started;
      if (exit.reason !== 'migrated') throw new Error(`the source ended with ${exit.reason}, not migrated`);
      const report = await peer.report;
      if (report.state !== 'running') throw new Error(`the guest is ${String(report.state)} at the destination, not running (${JSON.stringify(report.logs)})`);
      if (touch && report.hash !== touch.checkSha256) throw new Error('the touched data arrived different');
      return { stats, wallMs, phases: mergePhases(phaseMarks(), (report.phases ?? []) as PhaseMark[]) };
    } finally {
      if (machine.state !== 'stopping' && machine.state !== 'stopped') await machine.stop().catch(() => {});
      serial.destroy();
    }
  } finally {
    peer.child.kill('SIGKILL');
  }
}

async function main(): Promise<void> {
  let options: { rounds: number; json: boolean };
  try {
    options = parseOptions();
  } catch (error) {
    console.error(`${(error as Error).message} (--help for usage)`);
    process.exit(2);
  }
  if (!existsSync(idleGuest)) throw new Error(`guest not built: ${idleGuest} (run npm run build:guests)`);
  if (!existsSync(peerScript)) throw new Error(`${peerScript} is missing (run npm run build:ts)`);
  const dir = mkdtempSync(path.join(os.tmpdir(), 'node-kvm-bench-local-'));
  try {
    const touch = touchPattern(SCENARIOS[1]!.touchedBytes);
    progress('warm-up: one migration of each mode, not counted');
    await migrateOnce(SCENARIOS[0]!, true, null, dir, 0);
    await migrateOnce(SCENARIOS[0]!, false, null, dir, 0);
    const runs = new Map<string, Run[]>();
    for (const scenario of SCENARIOS) for (const mode of ['local', 'copy']) runs.set(`${scenario.key}/${mode}`, []);
    // Round by round, each scenario and mode in turn: every one sees the same spread of host load.
    for (let round = 1; round <= options.rounds; round++) {
      for (const scenario of SCENARIOS) {
        for (const local of [true, false]) {
          progress(`round ${round}/${options.rounds}: ${scenario.title}, ${local ? 'local' : 'copy'}`);
          runs.get(`${scenario.key}/${local ? 'local' : 'copy'}`)!.push(await migrateOnce(scenario, local, scenario.touchedBytes ? touch : null, dir, round));
        }
      }
    }
    const results = SCENARIOS.map((scenario) => {
      const of = (mode: string) => {
        const list = runs.get(`${scenario.key}/${mode}`)!;
        return {
          downtimeMs: median(list.map((run) => run.stats.downtimeMs)),
          totalMs: median(list.map((run) => run.stats.totalTimeMs)),
          setupMs: median(list.map((run) => run.stats.setupTimeMs)),
          bytesTransferred: median(list.map((run) => run.stats.bytesTransferred)),
          raw: { downtimeMs: list.map((run) => round2(run.stats.downtimeMs)), totalMs: list.map((run) => round2(run.stats.totalTimeMs)) },
        };
      };
      return { scenario: scenario.title, memoryBytes: scenario.memoryBytes, touchedBytes: scenario.touchedBytes, local: of('local'), copy: of('copy') };
    });
    if (options.json) {
      console.log(JSON.stringify({ host: hostInfo(), rounds: options.rounds, results }, null, 2));
      return;
    }
    const host = hostInfo();
    console.log(`host: ${host.cpu}, ${host.cpus} CPUs, ${host.kvmModule}, Linux ${host.kernel}, Node ${host.node}; ${options.rounds} rounds, medians`);
    console.log('');
    console.log('| scenario | local downtime | local total | copy downtime | copy total | local sent | copy sent |');
    console.log('|---|---|---|---|---|---|---|');
    for (const result of results) {
      console.log(`| ${result.scenario} | ${result.local.downtimeMs.toFixed(2)} ms | ${result.local.totalMs.toFixed(1)} ms | ` +
        `${result.copy.downtimeMs.toFixed(2)} ms | ${result.copy.totalMs.toFixed(1)} ms | ${kib(result.local.bytesTransferred)} | ${kib(result.copy.bytesTransferred)} |`);
    }
    console.log('');
    console.log('raw figures (ms, in run order):');
    for (const result of results) {
      console.log(`  ${result.scenario}, local: downtime ${result.local.raw.downtimeMs.join(' ')}; total ${result.local.raw.totalMs.join(' ')}`);
      console.log(`  ${result.scenario}, copy:  downtime ${result.copy.raw.downtimeMs.join(' ')}; total ${result.copy.raw.totalMs.join(' ')}`);
    }
    const big = results[1]!;
    console.log('');
    console.log(`target: local downtime under 2 ms for 2 GiB with 1 GiB touched: ${big.local.downtimeMs.toFixed(2)} ms, ${big.local.downtimeMs < 2 ? 'met' : 'NOT met'}`);
    if (phaseTimingEnabled()) {
      console.log('');
      console.log('where the downtime goes (ms since the pause, median):');
      const rows = breakdownTable(SCENARIOS.flatMap((scenario) => ['local', 'copy'].map((mode) => ({
        title: `${scenario.title}, ${mode}`, runs: runs.get(`${scenario.key}/${mode}`)!.map((run) => run.phases),
      }))));
      for (const row of rows) console.log(`  ${row[0]!.padEnd(44)} ${row.slice(1).map((cell) => cell.padStart(12)).join(' ')}`);
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

const round2 = (value: number) => Math.round(value * 100) / 100;
const kib = (bytes: number) => (bytes >= MiB ? `${(bytes / MiB).toFixed(1)} MiB` : `${(bytes / 1024).toFixed(1)} KiB`);

await main();
