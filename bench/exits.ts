// The cost of the binding against the raw KVM API, measured side by side in one run: the C
// reference (bench/c/kvm-bench.c) and the same loops in TypeScript over node-kvm, interleaved
// round by round so that both see the same host load. Prints the median of each.
//
//   npm run bench:exits -- [--count N] [--rounds R] [--cycles N] [--dirty-iters N] [--json]
import { execFileSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { setImmediate as nextLoopTurn } from 'node:timers/promises';
import { parseArgs } from 'node:util';
import { hostInfo, median } from './report.js';
import { VMM_EXITS, measureVmmExits } from './vmm-exits.js';
import {
  Cap, DirtyLogManual, ExitReason, GuestMemory, Kvm, KvmRunOffset, type Vcpu, type Vm,
} from '../lib/index.js';

// The guest contract of guests/exits.S, the same constants as kvm-bench.c.
const GUEST_RAM_BYTES = 1 << 20;
const GUEST_LOAD_ADDR = 0x7c00;
const TSS_ADDR = 0xfffbd000;
const BENCH_PORT = 0x80;
const DIRTY_SLOT_MIB = 1024;
const DIRTY_SLOT_BYTES = DIRTY_SLOT_MIB * 2 ** 20;
const PAGE_BYTES = 4096;

interface Options {
  count: number;
  rounds: number;
  cycles: number;
  /** Undefined: calibrated. */
  dirtyIters: number | undefined;
  json: boolean;
}

// KVM_GET_DIRTY_LOG's cost differs by orders of magnitude between hosts (about 1 us here, a 32 KiB
// copy): the default run is sized by time, not by count.
const DIRTY_TARGET_SECONDS = 0.4;

function parseOptions(): Options {
  const { values } = parseArgs({
    options: {
      count: { type: 'string', default: '1000000' },
      rounds: { type: 'string', default: '3' },
      cycles: { type: 'string', default: '2000' },
      'dirty-iters': { type: 'string' },
      json: { type: 'boolean', default: false },
      help: { type: 'boolean', short: 'h', default: false },
    },
    strict: true,
  });
  if (values.help) {
    console.log(`usage: npm run bench:exits -- [options]
  --count N        port-I/O exits per run (default 1000000)
  --rounds R       interleaved C/TypeScript rounds; the median is reported (default 3)
  --cycles N       VM create+destroy cycles per run (default 2000)
  --dirty-iters N  KVM_GET_DIRTY_LOG calls per run on a fully dirty 1 GiB slot
                   (default: as many as take about ${DIRTY_TARGET_SECONDS} s in TypeScript)
  --json           print the results as JSON`);
    process.exit(0);
  }
  const positive = (name: string, text: string, max = Number.MAX_SAFE_INTEGER): number => {
    const n = Number(text);
    if (!/^\d+$/.test(text) || !Number.isSafeInteger(n) || n < 1 || n > max) {
      throw new RangeError(`--${name} must be an integer 1..${max}, got '${text}'`);
    }
    return n;
  };
  return {
    // ECX holds the count in the guest.
    count: positive('count', values.count, 0xffffffff),
    rounds: positive('rounds', values.rounds, 1000),
    cycles: positive('cycles', values.cycles),
    dirtyIters: values['dirty-iters'] === undefined ? undefined : positive('dirty-iters', values['dirty-iters']),
    json: values.json,
  };
}

/** The repository root, from this file's place in dist/bench/ (as bench/boot.ts finds it). */
function repoRoot(): string {
  return path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
}

// ---- the C reference -------------------------------------------------------------------------

function runC(binary: string, args: string[]): Record<string, number> {
  const stdout = execFileSync(binary, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'] });
  return JSON.parse(stdout.trim()) as Record<string, number>;
}

// ---- (a) port-I/O exits ----------------------------------------------------------------------

interface ExitsResult { exits: number; seconds: number }

/** A VM set up exactly as kvm-bench.c's cmd_exits does: 1 MiB at 0, guest at 0:7c00, ECX = count. */
function exitsMachine(kvm: Kvm, image: Uint8Array, count: number): { vm: Vm; memory: GuestMemory; vcpu: Vcpu } {
  const vm = kvm.createVm();
  vm.setTssAddr(TSS_ADDR);
  const memory = GuestMemory.create(GUEST_RAM_BYTES);
  vm.setUserMemoryRegion({ slot: 0, guestPhysAddr: 0, memory });
  memory.write(GUEST_LOAD_ADDR, image);
  const vcpu = vm.createVcpu(0);
  const sregs = vcpu.getSregs();
  for (const segment of [sregs.cs, sregs.ds, sregs.es, sregs.ss, sregs.fs, sregs.gs]) {
    segment.base = 0n;
    segment.selector = 0;
  }
  vcpu.setSregs(sregs);
  const regs = vcpu.getRegs();
  for (const key of Object.keys(regs) as (keyof typeof regs)[]) regs[key] = 0n;
  // RFLAGS bit 1 is reserved and must be 1.
  vcpu.setRegs({ ...regs, rip: BigInt(GUEST_LOAD_ADDR), rflags: 0x2n, rcx: BigInt(count) });
  return { vm, memory, vcpu };
}

/**
 * The loop under test: per exit, what the C loop does (exit reason, then the port read from the
 * kvm_run page) and nothing else: no decoding, no allocation.
 */
function countPortExits(vcpu: Vcpu): number {
  const view = vcpu.kvmRun.view;
  const portOffset = KvmRunOffset['io.port'];
  let exits = 0;
  for (;;) {
    const reason = vcpu.run();
    if (reason === ExitReason.Io && view.getUint16(portOffset, true) === BENCH_PORT) {
      exits++;
      continue;
    }
    if (reason === ExitReason.Hlt) return exits;
    // The C loop retries EINTR; run() reports it as Intr.
    if (reason === ExitReason.Intr) continue;
    throw new Error(`unexpected exit after ${exits} port exits: ${JSON.stringify(vcpu.exit(), (_, v) => (typeof v === 'bigint' ? `0x${v.toString(16)}` : v))}`);
  }
}

function tsExits(kvm: Kvm, image: Uint8Array, count: number): ExitsResult {
  const { vm, memory, vcpu } = exitsMachine(kvm, image, count);
  try {
    const start = process.hrtime.bigint();
    const exits = countPortExits(vcpu);
    const seconds = Number(process.hrtime.bigint() - start) / 1e9;
    if (exits !== count) throw new Error(`exit count mismatch: guest made ${exits} port-0x80 exits, expected ${count}`);
    return { exits, seconds };
  } finally {
    vcpu.close();
    vm.close();
    memory.close();
  }
}

function cExits(binary: string, guestPath: string, count: number): ExitsResult {
  const r = runC(binary, ['exits', guestPath, String(count)]);
  if (r.exits !== count) throw new Error(`kvm-bench exits: got ${r.exits} exits, expected ${count}`);
  return { exits: r.exits!, seconds: r.seconds! };
}

// ---- (b) VM create + destroy -----------------------------------------------------------------

function tsVmCycles(kvm: Kvm, cycles: number): number {
  const start = process.hrtime.bigint();
  for (let i = 0; i < cycles; i++) kvm.createVm().close();
  return Number(process.hrtime.bigint() - start) / 1e9;
}

function cVmCycles(binary: string, cycles: number): number {
  return runC(binary, ['vm-cycles', String(cycles)]).seconds!;
}

// ---- (c) KVM_GET_DIRTY_LOG on a fully dirty slot ---------------------------------------------

function tsDirtyLog(kvm: Kvm, iters: number): number {
  const vm = kvm.createVm();
  // As in kvm-bench.c: with manual protect, KVM_GET_DIRTY_LOG neither clears nor re-protects, and
  // INITIALLY_SET marks every page of slots created afterwards, so each call returns all ones.
  vm.enableCap(Cap.ManualDirtyLogProtect2, [DirtyLogManual.ProtectEnable | DirtyLogManual.InitiallySet]);
  const memory = GuestMemory.create(DIRTY_SLOT_BYTES);
  try {
    vm.setUserMemoryRegion({ slot: 0, guestPhysAddr: 0, memory, flags: { logDirtyPages: true } });
    const pages = DIRTY_SLOT_BYTES / PAGE_BYTES;
    const bitmap = new Uint8Array(Math.ceil(pages / 64) * 8);
    const start = process.hrtime.bigint();
    for (let i = 0; i < iters; i++) {
      if (i + 1 === iters) bitmap.fill(0); // proves the last call fills it
      vm.getDirtyLog(0, bitmap);
    }
    const seconds = Number(process.hrtime.bigint() - start) / 1e9;
    const firstClear = bitmap.findIndex((byte) => byte !== 0xff);
    if (firstClear !== -1) throw new Error(`dirty bitmap not all ones: byte ${firstClear} is 0x${bitmap[firstClear]!.toString(16)}`);
    return seconds;
  } finally {
    vm.close();
    memory.close();
  }
}

function cDirtyLog(binary: string, iters: number): number {
  return runC(binary, ['dirty-log', String(DIRTY_SLOT_MIB), String(iters)]).seconds!;
}

// ---- reporting -------------------------------------------------------------------------------


interface Metric {
  name: string;
  unit: string;
  c: number;
  ts: number;
  /** TypeScript throughput / C throughput: 1 is parity, above 1 is TypeScript faster. */
  ratio: number;
  cRuns: number[];
  tsRuns: number[];
  /** The ratio within each round: C and TypeScript ran back to back, under the same host load. */
  roundRatios: number[];
}

function format(n: number): string {
  if (n >= 1000) return Math.round(n).toLocaleString('en-US');
  if (n >= 100) return n.toFixed(1);
  return n.toPrecision(4);
}

interface Sizes {
  count: number;
  rounds: number;
  cycles: number;
  dirtyIters: number;
}

function printTable(metrics: Metric[], sizes: Sizes, host: Record<string, string | number>): void {
  const rows = [
    ['metric', 'C', 'TypeScript', 'ratio TS/C'],
    ...metrics.map((m) => [`${m.name} (${m.unit})`, format(m.c), format(m.ts), m.ratio.toFixed(3)]),
  ];
  const widths = rows[0]!.map((_, col) => Math.max(...rows.map((r) => r[col]!.length)));
  const line = (r: string[]) => r.map((cell, col) => (col === 0 ? cell.padEnd(widths[col]!) : cell.padStart(widths[col]!))).join('  ');
  console.log(`host: ${host.cpu}, ${host.cpus} CPUs, Linux ${host.kernel}, KVM module ${host.kvmModule}, Node ${host.node}`);
  console.log(`runs: ${sizes.rounds} interleaved rounds (C then TypeScript), median shown; ratio is throughput TS/C (1 = parity)`);
  console.log('');
  console.log(line(rows[0]!));
  console.log(widths.map((w) => '-'.repeat(w)).join('  '));
  for (const r of rows.slice(1)) console.log(line(r));
  console.log('');
  console.log('raw runs:');
  for (const m of metrics) {
    console.log(`  ${m.name} (${m.unit})`);
    console.log(`    C          ${m.cRuns.map(format).join('  ')}`);
    console.log(`    TypeScript ${m.tsRuns.map(format).join('  ')}`);
    console.log(`    ratio      ${m.roundRatios.map((r) => r.toFixed(3)).join('  ')}`);
  }
  console.log('');
  console.log(`sizes per run: ${sizes.count.toLocaleString('en-US')} port exits, ${sizes.cycles} VM cycles, ` +
    `${sizes.dirtyIters} KVM_GET_DIRTY_LOG calls on ${DIRTY_SLOT_MIB} MiB`);
}

async function main(): Promise<void> {
  let options: Options;
  try {
    options = parseOptions();
  } catch (error) {
    console.error(`${(error as Error).message} (--help for usage)`);
    process.exit(2);
  }
  const root = repoRoot();
  const guestPath = path.join(root, 'guests', 'build', 'exits.bin');
  if (!existsSync(guestPath)) throw new Error(`guest not built: ${guestPath} (run npm run build:guests)`);
  const image = readFileSync(guestPath);
  const { buildCBench } = (await import(pathToFileURL(path.join(root, 'bench', 'c', 'build.mjs')).href)) as {
    buildCBench(options?: { force?: boolean }): string;
  };
  const binary = buildCBench();
  const kvm = Kvm.open();
  const progress = (text: string) => {
    if (!options.json) process.stderr.write(text);
  };
  // Each TypeScript run ends with an event-loop turn, as in any Node program, so that what it
  // dropped is finalized before the next measurement.
  const settle = () => nextLoopTurn();

  // Lets V8 optimise the TypeScript loops before anything is timed; C needs no warm-up.
  tsExits(kvm, image, Math.min(options.count, 20000));
  tsVmCycles(kvm, Math.min(options.cycles, 50));
  const probeIters = 50;
  const probeSeconds = tsDirtyLog(kvm, probeIters);
  const dirtyIters = options.dirtyIters ??
    Math.min(200000, Math.max(20, Math.round((DIRTY_TARGET_SECONDS * probeIters) / probeSeconds)));
  await settle();

  const runs = {
    exitsC: [] as ExitsResult[], exitsTs: [] as ExitsResult[],
    cyclesC: [] as number[], cyclesTs: [] as number[],
    dirtyC: [] as number[], dirtyTs: [] as number[],
    vmmC: [] as ExitsResult[], vmmTs: [] as ExitsResult[],
  };
  for (let round = 1; round <= options.rounds; round++) {
    progress(`round ${round}/${options.rounds}: exits`);
    runs.exitsC.push(cExits(binary, guestPath, options.count));
    runs.exitsTs.push(tsExits(kvm, image, options.count));
    await settle();
    progress(', exits through the VMM');
    // The VMM runs the guest's own count (ECX is left at 0): compare with C at the same count.
    runs.vmmC.push(options.count === VMM_EXITS ? runs.exitsC.at(-1)! : cExits(binary, guestPath, VMM_EXITS));
    runs.vmmTs.push(await measureVmmExits(root));
    await settle();
    progress(', vm cycles');
    runs.cyclesC.push(cVmCycles(binary, options.cycles));
    runs.cyclesTs.push(tsVmCycles(kvm, options.cycles));
    await settle();
    progress(', dirty log\n');
    runs.dirtyC.push(cDirtyLog(binary, dirtyIters));
    runs.dirtyTs.push(tsDirtyLog(kvm, dirtyIters));
    await settle();
  }
  kvm.close();

  const metric = (name: string, unit: string, cRuns: number[], tsRuns: number[], higherIsBetter: boolean): Metric => {
    const c = median(cRuns);
    const ts = median(tsRuns);
    const ratio = (cValue: number, tsValue: number) => (higherIsBetter ? tsValue / cValue : cValue / tsValue);
    return { name, unit, c, ts, ratio: ratio(c, ts), cRuns, tsRuns, roundRatios: cRuns.map((cValue, i) => ratio(cValue, tsRuns[i]!)) };
  };
  const exitsPerSec = (r: ExitsResult) => r.exits / r.seconds;
  const nsPerExit = (r: ExitsResult) => (r.seconds * 1e9) / r.exits;
  const cyclesPerSec = (seconds: number) => options.cycles / seconds;
  const msPerCall = (seconds: number) => (seconds * 1e3) / dirtyIters;
  const metrics = [
    metric('port-I/O exits', 'exits/s', runs.exitsC.map(exitsPerSec), runs.exitsTs.map(exitsPerSec), true),
    metric('port-I/O exit cost', 'ns/exit', runs.exitsC.map(nsPerExit), runs.exitsTs.map(nsPerExit), false),
    metric('port-I/O exits, whole VMM', 'exits/s', runs.vmmC.map(exitsPerSec), runs.vmmTs.map(exitsPerSec), true),
    metric('VM create+destroy', 'cycles/s', runs.cyclesC.map(cyclesPerSec), runs.cyclesTs.map(cyclesPerSec), true),
    metric(`KVM_GET_DIRTY_LOG ${DIRTY_SLOT_MIB} MiB`, 'ms/call', runs.dirtyC.map(msPerCall), runs.dirtyTs.map(msPerCall), false),
  ];
  const sizes: Sizes = { count: options.count, rounds: options.rounds, cycles: options.cycles, dirtyIters };
  const host = hostInfo();

  if (options.json) {
    console.log(JSON.stringify({ host, sizes: { ...sizes, dirtySlotMiB: DIRTY_SLOT_MIB }, metrics }, null, 2));
  } else {
    printTable(metrics, sizes, host);
  }
}

main().catch((error: unknown) => {
  console.error(error instanceof Error ? error.stack ?? error.message : error);
  process.exit(1);
});
