// Live migration against the references it cannot beat, measured in the same run: memcpy, raw
// loopback TCP and unix sockets between two Node processes, and QEMU migrating the same kind of
// guest where it is installed. Each scenario migrates a guest over loopback TCP to a destination
// in another process (bench/migrate-peer.ts), which checks that the guest runs there. Also:
// a warm snapshot restore, Machine.restore() to a running guest.
//
//   npm run bench:migrate -- [--rounds R] [--iterations N] [--downtime-budget MS] [--json]
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { createHash, randomBytes, randomFillSync } from 'node:crypto';
import { existsSync, mkdtempSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { Writable } from 'node:stream';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';
import { hostInfo, median } from './report.js';
import { GUEST_PARAMS_ADDR, GuestMemory, Machine, VcpuWorkerPool } from '../lib/index.js';
import type { MigrationStats } from '../lib/migration/types.js';
import { phaseMarks, phaseTimingEnabled, type PhaseMark } from '../lib/vmm/phase-timing.js';
import { breakdownTable, mergePhases } from './phase-breakdown.js';

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;
const PAGE_BYTES = 4096;
/** Where scenario 3 puts its data: above the guest's code, well inside 256 MiB. */
const FILL_ADDR = 32 * MiB;
const FILL_BYTES = 64 * MiB;
const DIRTIER_RANGE_BYTES = 16 * MiB;
/** The restore guest's range: small, so that it prints soon after it runs again. */
const RESTORE_RANGE_BYTES = 64 * 1024;
const SOCKET_BYTES = 1 * GiB;
const SOCKET_WRITE_BYTES = 2 * MiB;
const MEMCPY_BYTES = 256 * MiB;
const TOKEN = randomBytes(16).toString('hex');
/** Below this much data, a migration's throughput is not compared with the socket's. */
const MIN_RATED_MIB = 4;

interface Options {
  rounds: number;
  iterations: number;
  downtimeBudgetMs: number | undefined;
  json: boolean;
}

function parseOptions(): Options {
  const { values } = parseArgs({
    options: {
      rounds: { type: 'string', default: '7' },
      iterations: { type: 'string', default: '20' },
      'downtime-budget': { type: 'string' },
      json: { type: 'boolean', default: false },
      help: { type: 'boolean', short: 'h', default: false },
    },
    strict: true,
  });
  if (values.help) {
    console.log(`usage: npm run bench:migrate -- [options]
  --rounds R             migrations per scenario (and socket runs); the median is reported (default 7)
  --iterations N         snapshot restores timed (default 20)
  --downtime-budget MS   downtimeBudgetMs for every migration (default: the library's, 50 ms)
  --json                 print the results as JSON`);
    process.exit(0);
  }
  const positive = (name: string, text: string, max: number): number => {
    const n = Number(text);
    if (!/^\d+$/.test(text) || n < 1 || n > max) throw new RangeError(`--${name} must be an integer 1..${max}, got '${text}'`);
    return n;
  };
  const budget = values['downtime-budget'];
  if (budget !== undefined && !(Number(budget) > 0)) throw new RangeError(`--downtime-budget must be a positive number of ms, got '${budget}'`);
  return {
    rounds: positive('rounds', values.rounds, 100),
    iterations: positive('iterations', values.iterations, 1000),
    downtimeBudgetMs: budget === undefined ? undefined : Number(budget),
    json: values.json,
  };
}

/** The repository root, from this file's place in dist/bench/ (as bench/boot.ts finds it). */
const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const peerScript = path.join(path.dirname(fileURLToPath(import.meta.url)), 'migrate-peer.js');
const guest = (name: string) => path.join(root, 'guests', 'build', name);

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));
const progress = (text: string) => process.stderr.write(`${text}\n`);


// ---- the peer process ------------------------------------------------------------------------

interface Peer {
  child: ChildProcess;
  listening: Promise<string>;
  report: Promise<Record<string, unknown>>;
}

function startPeer(args: string[]): Peer {
  const child = spawn(process.execPath, [peerScript, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  let onListening!: (address: string) => void;
  let onReport!: (report: Record<string, unknown>) => void;
  let onFailure!: (error: Error) => void;
  const report = new Promise<Record<string, unknown>>((resolve, reject) => {
    onReport = resolve;
    onFailure = reject;
  });
  // A peer that fails before it listens fails `listening` too.
  const listening = Promise.race([new Promise<string>((resolve) => (onListening = resolve)), report.then(() => new Promise<never>(() => {}))]);
  // Whoever awaits these still sees a failure; this keeps one nobody awaits (after an earlier
  // error) from ending the process before that error is reported.
  report.catch(() => {});
  listening.catch(() => {});
  child.stdout!.on('data', (chunk: Buffer) => {
    stdout += chunk.toString('utf8');
    let newline: number;
    while ((newline = stdout.indexOf('\n')) >= 0) {
      const message = JSON.parse(stdout.slice(0, newline)) as Record<string, unknown>;
      stdout = stdout.slice(newline + 1);
      if (typeof message.listening === 'string') onListening(message.listening);
      else if (message.report) onReport(message.report as Record<string, unknown>);
      else if (message.error) onFailure(new Error(`peer: ${String(message.error)}`));
    }
  });
  child.stderr!.on('data', (chunk: Buffer) => (stderr += chunk.toString('utf8')));
  child.on('close', (status, signal) => onFailure(new Error(`peer ended (${status ?? signal}) without a report: ${stderr.trim()}`)));
  return { child, listening, report };
}

// ---- references ------------------------------------------------------------------------------

/** Buffer.copy of 256 MiB between two buffers already faulted in; best of `runs`, bytes/s. */
function memcpyBandwidth(runs: number): number {
  const from = Buffer.alloc(MEMCPY_BYTES, 0x5a);
  const to = Buffer.alloc(MEMCPY_BYTES, 0);
  let bestMs = Infinity;
  for (let i = 0; i < runs; i++) {
    const started = performance.now();
    from.copy(to);
    bestMs = Math.min(bestMs, performance.now() - started);
  }
  return (MEMCPY_BYTES * 1000) / bestMs;
}

/**
 * 64 MiB written with pwrite in 2 MiB pieces into the memfd of new guest RAM, as a destination
 * receives pages: its first touch of each page allocates and zeroes it, so this caps what any
 * destination can take, however fast the wire. Best of `runs`, bytes/s.
 */
function freshRamWriteBandwidth(runs: number): number {
  const chunk = Buffer.alloc(2 * MiB, 0x5a);
  let bestMs = Infinity;
  for (let i = 0; i < runs; i++) {
    const memory = GuestMemory.create(FILL_BYTES, { backing: 'memfd' });
    try {
      const started = performance.now();
      for (let at = 0; at < FILL_BYTES; at += chunk.length) writeSync(memory.fd!, chunk, 0, chunk.length, at);
      bestMs = Math.min(bestMs, performance.now() - started);
    } finally {
      memory.close();
    }
  }
  return (FILL_BYTES * 1000) / bestMs;
}

/**
 * The same filled-RAM stream in C (bench/c/kvm-bench.c, `stream`): the source copies and
 * checksums each batch and writes it, the destination reads, checksums and pwrites into new guest
 * RAM, one thread each, nothing else. What a migration of this design can reach on this host, with
 * both ends sharing its CPUs; bytes/s.
 */
async function cStreamFloor(): Promise<number> {
  const { buildCBench } = (await import(pathToFileURL(path.join(root, 'bench', 'c', 'build.mjs')).href)) as {
    buildCBench(options?: { force?: boolean }): string;
  };
  const result = spawnSync(buildCBench(), ['stream', String(FILL_BYTES / MiB)], { encoding: 'utf8', timeout: 60_000 });
  if (result.status !== 0) throw new Error(`kvm-bench stream failed: ${result.stderr || result.error?.message}`);
  const { bytesPerSec } = JSON.parse(result.stdout) as { bytesPerSec: number };
  return bytesPerSec;
}

/** 1 GiB in 2 MiB writes to a peer process that reads and discards it, until its one-byte answer; bytes/s. */
async function socketBandwidth(address: string): Promise<number> {
  const peer = startPeer(['sink', '--address', address, '--bytes', String(SOCKET_BYTES)]);
  try {
    const bound = await peer.listening;
    const socket = bound.startsWith('unix:')
      ? net.connect({ path: bound.slice('unix:'.length) })
      : net.connect({ host: bound.slice(4, bound.lastIndexOf(':')), port: Number(bound.slice(bound.lastIndexOf(':') + 1)) });
    await new Promise<void>((resolve, reject) => socket.once('connect', resolve).once('error', reject));
    const answered = new Promise<void>((resolve, reject) => socket.once('data', () => resolve()).once('error', reject));
    const chunk = Buffer.alloc(SOCKET_WRITE_BYTES, 0xa5);
    const started = performance.now();
    for (let sent = 0; sent < SOCKET_BYTES; sent += SOCKET_WRITE_BYTES) {
      if (!socket.write(chunk)) await new Promise((resolve) => socket.once('drain', resolve));
    }
    await answered;
    const ms = performance.now() - started;
    socket.destroy();
    await peer.report;
    return (SOCKET_BYTES * 1000) / ms;
  } finally {
    peer.child.kill('SIGKILL');
  }
}

// ---- migration scenarios ---------------------------------------------------------------------

interface Scenario {
  key: string;
  title: string;
  memoryBytes: number;
  workload: 'idle' | 'filled' | 'dirtier';
}

const SCENARIOS: Scenario[] = [
  { key: 'idle256', title: '256 MiB idle', memoryBytes: 256 * MiB, workload: 'idle' },
  { key: 'idle1g', title: '1 GiB idle', memoryBytes: 1 * GiB, workload: 'idle' },
  { key: 'filled', title: '256 MiB, 64 MiB filled', memoryBytes: 256 * MiB, workload: 'filled' },
  { key: 'dirtier', title: '256 MiB, dirtier 16 MiB', memoryBytes: 256 * MiB, workload: 'dirtier' },
];

/** A serial sink that resolves `until(wanted)` once the guest has printed it. */
function serialSink(): { output: Writable; text(): string; until(wanted: string | RegExp, timeoutMs?: number): Promise<void>; firstByteAt(): number } {
  let text = '';
  let firstByteAt = 0;
  const waiters: (() => void)[] = [];
  const output = new Writable({
    write(chunk: Buffer, _encoding, callback) {
      if (!firstByteAt) firstByteAt = performance.now();
      text += chunk.toString('latin1');
      for (const wake of waiters.splice(0)) wake();
      callback();
    },
  });
  return {
    output,
    text: () => text,
    firstByteAt: () => firstByteAt,
    async until(wanted, timeoutMs = 20_000) {
      const deadline = performance.now() + timeoutMs;
      const printed = () => (typeof wanted === 'string' ? text.includes(wanted) : wanted.test(text));
      while (!printed()) {
        if (performance.now() > deadline) throw new Error(`the guest did not print ${String(wanted)}; it printed ${JSON.stringify(text.slice(-200))}`);
        await new Promise<void>((resolve) => {
          waiters.push(resolve);
          setTimeout(resolve, 50);
        });
      }
    },
  };
}

function dirtierParams(passes: number, rangeBytes: number): Uint8Array {
  const params = new Uint8Array(8);
  const view = new DataView(params.buffer);
  view.setUint32(0, passes, true);
  view.setUint32(4, rangeBytes, true);
  return params;
}

interface MigrationRun {
  stats: MigrationStats;
  /** expectedDowntimeMs of the last pre-copy round, before the pause. */
  lastExpectedDowntimeMs: number;
  /** With NODE_KVM_PHASE_TIMING=1: the downtime's steps, both processes' (phase-breakdown.ts). */
  phases: { name: string; ms: number }[];
}

interface Fill {
  bytes: Buffer;
  sha256: string;
}

/** Boots the scenario's guest, migrates it to a new peer process, checks it runs there. */
async function migrateOnce(scenario: Scenario, fill: Fill, budgetMs: number | undefined): Promise<MigrationRun> {
  const peerArgs = ['incoming', '--address', 'tcp:127.0.0.1:0', '--token', TOKEN];
  if (scenario.workload === 'dirtier') peerArgs.push('--expect-lines', '2');
  if (scenario.workload === 'filled') peerArgs.push('--hash-range', `${FILL_ADDR}:${FILL_BYTES}`);
  // The destination knows the machine it expects (as with QEMU's -incoming): it builds it ahead.
  peerArgs.push('--memory-bytes', String(scenario.memoryBytes), '--irqchip', scenario.workload !== 'dirtier' ? 'on' : 'off');
  const peer = startPeer(peerArgs);
  try {
    const serial = serialSink();
    const logs: string[] = [];
    const machine = await Machine.create({
      image: guest(scenario.workload === 'dirtier' ? 'dirtier-user.elf' : 'echo-irq.bin'),
      memoryBytes: scenario.memoryBytes,
      vcpus: 1,
      // echo-irq.bin sleeps in HLT with interrupts on, in the kernel: a guest that is idle, not ended
      // (a HLT with interrupts off ends the machine).
      irqchip: scenario.workload !== 'dirtier',
      serial: { output: serial.output },
      log: (message) => logs.push(message),
    });
    try {
      if (scenario.workload === 'filled') machine.writeMemory(FILL_ADDR, fill.bytes);
      if (scenario.workload === 'dirtier') machine.writeMemory(GUEST_PARAMS_ADDR, dirtierParams(0, DIRTIER_RANGE_BYTES));
      machine.start();
      await serial.until(scenario.workload === 'dirtier' ? 'pass 2 ok\n' : 'irq> ');
      const address = await peer.listening;
      let lastExpectedDowntimeMs = 0;
      const stats = await machine.migrate(address, {
        token: TOKEN,
        downtimeBudgetMs: budgetMs,
        onProgress: (p) => {
          if (p.phase === 'precopy') lastExpectedDowntimeMs = p.expectedDowntimeMs;
        },
      });
      const exit = await machine.wait();
      if (exit.reason !== 'migrated') throw new Error(`the source ended with ${exit.reason}, not migrated`);
      const report = await peer.report;
      if (report.state !== 'running') throw new Error(`the guest is ${String(report.state)} at the destination, not running (${JSON.stringify(report.logs)})`);
      if (report.bad) throw new Error(`the guest found its memory damaged at the destination: ${JSON.stringify(report.output)}`);
      if (scenario.workload === 'dirtier' && !/(^|\n)pass \d+ ok\n/.test(String(report.output))) {
        throw new Error(`the dirtier printed ${JSON.stringify(report.output)} at the destination`);
      }
      if (scenario.workload === 'filled' && report.hash !== fill.sha256) throw new Error('the filled range arrived different');
      return { stats, lastExpectedDowntimeMs, phases: mergePhases(phaseMarks(), (report.phases ?? []) as PhaseMark[]) };
    } finally {
      if (machine.state !== 'stopping') await machine.stop().catch(() => {});
    }
  } finally {
    peer.child.kill('SIGKILL');
  }
}

// ---- QEMU ------------------------------------------------------------------------------------

interface QemuRun {
  totalMs: number;
  downtimeMs: number;
  setupMs: number;
  transferredBytes: number;
}

function qemuInstalled(): boolean {
  return spawnSync('sh', ['-c', 'command -v qemu-system-x86_64'], { encoding: 'utf8' }).status === 0;
}

/** A QMP connection: one command at a time, events skipped. */
class Qmp {
  readonly #socket: net.Socket;
  #buffered = '';
  #waiters: { resolve: (line: string) => void; reject: (error: Error) => void }[] = [];
  #lines: string[] = [];
  #closed = false;

  private constructor(socket: net.Socket) {
    this.#socket = socket;
    socket.on('data', (chunk: Buffer) => {
      this.#buffered += chunk.toString('utf8');
      let newline: number;
      while ((newline = this.#buffered.indexOf('\n')) >= 0) {
        const line = this.#buffered.slice(0, newline).trim();
        this.#buffered = this.#buffered.slice(newline + 1);
        if (!line) continue;
        const waiter = this.#waiters.shift();
        if (waiter) waiter.resolve(line);
        else this.#lines.push(line);
      }
    });
    socket.on('error', () => {});
    socket.on('close', () => {
      this.#closed = true;
      for (const waiter of this.#waiters.splice(0)) waiter.reject(new Error('QEMU closed its QMP socket'));
    });
  }

  /** QEMU creates the socket while it starts: retry until it answers. */
  static async connect(socketPath: string, timeoutMs = 10_000): Promise<Qmp> {
    const deadline = performance.now() + timeoutMs;
    for (;;) {
      let socket: net.Socket | undefined;
      try {
        socket = await new Promise<net.Socket>((resolve, reject) => {
          const s = net.connect({ path: socketPath });
          s.once('connect', () => resolve(s)).once('error', reject);
        });
        const qmp = new Qmp(socket);
        await qmp.#message(); // the greeting
        await qmp.command('qmp_capabilities');
        return qmp;
      } catch (error) {
        socket?.destroy();
        if (performance.now() > deadline) throw error;
        await sleep(20);
      }
    }
  }

  #line(): Promise<string> {
    const line = this.#lines.shift();
    if (line !== undefined) return Promise.resolve(line);
    if (this.#closed) return Promise.reject(new Error('QEMU closed its QMP socket'));
    return new Promise((resolve, reject) => this.#waiters.push({ resolve, reject }));
  }

  async #message(): Promise<Record<string, unknown>> {
    return JSON.parse(await this.#line()) as Record<string, unknown>;
  }

  async command(execute: string, args?: Record<string, unknown>): Promise<Record<string, unknown>> {
    this.#socket.write(`${JSON.stringify(args ? { execute, arguments: args } : { execute })}\n`);
    for (;;) {
      const message = await this.#message();
      if ('event' in message) continue;
      if ('error' in message) throw new Error(`QMP ${execute}: ${JSON.stringify(message.error)}`);
      return (message.return ?? {}) as Record<string, unknown>;
    }
  }

  close(): void {
    this.#socket.destroy();
  }
}

async function freeTcpPort(): Promise<number> {
  const server = net.createServer();
  await new Promise<void>((resolve) => server.listen({ host: '127.0.0.1', port: 0 }, resolve));
  const port = (server.address() as net.AddressInfo).port;
  await new Promise((resolve) => server.close(resolve));
  return port;
}

/**
 * QEMU migrating the PVH guest (it prints, then halts: idle) between two processes over loopback
 * TCP, with its bandwidth cap lifted (the default caps it at 128 MiB/s). `fillFile` is loaded at
 * FILL_ADDR on both sides by the generic loader, so the source's RAM holds it as ours does.
 */
let qemuRunCount = 0;

async function qemuMigrateOnce(memoryBytes: number, dir: string, fillFile: string | undefined): Promise<QemuRun> {
  const port = await freeTcpPort();
  const run = ++qemuRunCount;
  const common = [
    '-M', 'microvm', '-enable-kvm', '-cpu', 'host,-arch-capabilities', '-m', `${memoryBytes / MiB}M`, '-smp', '1',
    '-nodefaults', '-no-user-config', '-nographic', '-serial', 'null', '-kernel', guest('pvh.elf'),
    ...(fillFile ? ['-device', `loader,file=${fillFile},addr=${FILL_ADDR},force-raw=on`] : []),
  ];
  const sourceQmp = path.join(dir, `qemu-source-${run}.qmp`);
  const destinationQmp = path.join(dir, `qemu-destination-${run}.qmp`);
  let stderr = '';
  const start = (args: string[]) => {
    const child = spawn('qemu-system-x86_64', [...common, ...args], { stdio: ['ignore', 'ignore', 'pipe'] });
    child.stderr!.on('data', (chunk: Buffer) => (stderr += chunk.toString('utf8')));
    child.on('error', (error) => (stderr += error.message));
    return child;
  };
  const destination = start(['-qmp', `unix:${destinationQmp},server=on,wait=off`, '-incoming', `tcp:127.0.0.1:${port}`]);
  const source = start(['-qmp', `unix:${sourceQmp},server=on,wait=off`]);
  const qmps: Qmp[] = [];
  try {
    const src = await Qmp.connect(sourceQmp);
    qmps.push(src);
    const dst = await Qmp.connect(destinationQmp);
    qmps.push(dst);
    await sleep(100); // the guest prints and halts
    await src.command('migrate-set-parameters', { 'max-bandwidth': 1_000_000_000_000 });
    await src.command('migrate', { uri: `tcp:127.0.0.1:${port}` });
    const deadline = performance.now() + 60_000;
    for (;;) {
      const info = await src.command('query-migrate');
      if (info.status === 'completed') {
        // The source reports completion when it has sent everything; the destination runs the
        // guest once it has loaded the last of it, a moment later.
        for (;;) {
          const status = await dst.command('query-status');
          if (status.status === 'running') break;
          if (status.status !== 'inmigrate' || performance.now() > deadline) throw new Error(`QEMU's destination is ${String(status.status)} after the migration`);
          await sleep(2);
        }
        return {
          totalMs: Number(info['total-time']),
          downtimeMs: Number(info.downtime),
          setupMs: Number(info['setup-time']),
          transferredBytes: Number((info.ram as Record<string, unknown>).transferred),
        };
      }
      if (info.status === 'failed' || performance.now() > deadline) throw new Error(`QEMU migration ${String(info.status)}: ${JSON.stringify(info)}`);
      await sleep(2);
    }
  } catch (error) {
    throw new Error(`${(error as Error).message}${stderr ? `; QEMU said: ${stderr.trim()}` : ''}`);
  } finally {
    for (const qmp of qmps) qmp.close();
    source.kill('SIGKILL');
    destination.kill('SIGKILL');
  }
}

// ---- snapshot restore ------------------------------------------------------------------------

interface RestoreRun {
  toStartedMs: number;
  toFirstByteMs: number;
}

/**
 * A 256 MiB dirtier (64 KiB range) snapshotted while it runs, then restored N times in this
 * process with vCPU threads from a pool: Machine.restore() until start() returns, and until the
 * guest's first serial byte (the end of the pass it was in: proof that it runs).
 */
async function restoreRuns(dir: string, iterations: number): Promise<RestoreRun[]> {
  const snapshotPath = path.join(dir, 'restore.snap');
  const pool = await VcpuWorkerPool.create(1);
  try {
    const serial = serialSink();
    const machine = await Machine.create({ image: guest('dirtier-user.elf'), memoryBytes: 256 * MiB, serial: { output: serial.output }, pool, log: () => {} });
    machine.writeMemory(GUEST_PARAMS_ADDR, dirtierParams(0, RESTORE_RANGE_BYTES));
    machine.start();
    await serial.until('pass 3 ok\n');
    await machine.snapshot(snapshotPath);
    await machine.stop();

    const runs: RestoreRun[] = [];
    // The first restore loads the snapshot code; it is not counted.
    for (let i = -1; i < iterations; i++) {
      const restored = serialSink();
      const started = performance.now();
      const copy = await Machine.restore(snapshotPath, { pool, serial: { output: restored.output }, log: () => {} });
      copy.start();
      const startedAt = performance.now();
      // The snapshot may have caught the guest in the middle of a line: it finishes that one first.
      await restored.until(/(^|\n)pass \d+ ok\n/);
      if (restored.text().includes('BAD')) throw new Error(`the restored guest printed ${JSON.stringify(restored.text())}`);
      if (i >= 0) runs.push({ toStartedMs: startedAt - started, toFirstByteMs: restored.firstByteAt() - started });
      await copy.stop();
      // Lets the kernel finish tearing that VM down, so that it does not overlap the next restore.
      await sleep(20);
    }
    return runs;
  } finally {
    await pool.close();
  }
}

// ---- reporting -------------------------------------------------------------------------------

interface ScenarioResult {
  scenario: Scenario;
  runs: MigrationRun[];
  medians: Record<string, number>;
  qemu: QemuRun[] | null;
}

function scenarioMedians(runs: MigrationRun[], tcpBytesPerSec: number, cStreamBytesPerSec: number): Record<string, number> {
  const m = (pick: (run: MigrationRun) => number) => median(runs.map(pick));
  return {
    totalMs: m((r) => r.stats.totalTimeMs),
    setupMs: m((r) => r.stats.setupTimeMs),
    downtimeMs: m((r) => r.stats.downtimeMs),
    lastExpectedDowntimeMs: m((r) => r.lastExpectedDowntimeMs),
    transferredMiB: m((r) => r.stats.bytesTransferred / MiB),
    pagesTransferred: m((r) => r.stats.pagesTransferred),
    zeroPagesSkipped: m((r) => r.stats.zeroPagesSkipped),
    pagesResent: m((r) => r.stats.pagesResent),
    iterations: m((r) => r.stats.iterations),
    dirtyPagesPerSec: m((r) => r.stats.dirtyPagesRate),
    throughputMiBPerSec: m((r) => r.stats.throughputBytesPerSec / MiB),
    throughputOverTcp: m((r) => r.stats.throughputBytesPerSec / tcpBytesPerSec),
    throughputOverCStream: m((r) => r.stats.throughputBytesPerSec / cStreamBytesPerSec),
  };
}

function format(n: number): string {
  if (!Number.isFinite(n)) return String(n);
  if (Math.abs(n) >= 1000) return Math.round(n).toLocaleString('en-US');
  if (Number.isInteger(n)) return String(n);
  if (Math.abs(n) >= 100) return n.toFixed(1);
  return n.toPrecision(3);
}

function table(rows: string[][]): void {
  const widths = rows[0]!.map((_, col) => Math.max(...rows.map((r) => (r[col] ?? '').length)));
  const line = (r: string[]) => r.map((cell, col) => (col === 0 ? cell.padEnd(widths[col]!) : cell.padStart(widths[col]!))).join('  ').trimEnd();
  console.log(line(rows[0]!));
  console.log(widths.map((w) => '-'.repeat(w)).join('  '));
  for (const r of rows.slice(1)) console.log(line(r));
}

/** "yes" at or below the low end of a range, "in range" up to its high end, else "no". */
const verdict = (value: number, low: number, high = low) => (value <= low ? 'yes' : value <= high ? 'in range' : 'no');

async function main(): Promise<void> {
  let options: Options;
  try {
    options = parseOptions();
  } catch (error) {
    console.error(`${(error as Error).message} (--help for usage)`);
    process.exit(2);
  }
  for (const name of ['echo-irq.bin', 'dirtier-user.elf', 'pvh.elf']) {
    if (!existsSync(guest(name))) throw new Error(`guest not built: ${guest(name)} (run npm run build:guests)`);
  }
  if (!existsSync(peerScript)) throw new Error(`${peerScript} is missing (run npm run build:ts)`);
  const dir = mkdtempSync(path.join(os.tmpdir(), 'node-kvm-bench-migrate-'));
  const benchStarted = performance.now();
  try {
    progress('references: memcpy, loopback tcp and unix sockets, the stream in C');
    const memcpyBytesPerSec = memcpyBandwidth(5);
    const freshRamBytesPerSec = freshRamWriteBandwidth(3);
    const tcpRuns: number[] = [];
    const unixRuns: number[] = [];
    const socketRounds = Math.min(options.rounds, 3);
    for (let i = 0; i < socketRounds; i++) {
      tcpRuns.push(await socketBandwidth('tcp:127.0.0.1:0'));
      unixRuns.push(await socketBandwidth(`unix:${path.join(dir, `sink-${i}.sock`)}`));
    }
    const tcpBytesPerSec = median(tcpRuns);
    const unixBytesPerSec = median(unixRuns);
    const cStreamRuns: number[] = [];
    for (let i = 0; i < socketRounds; i++) cStreamRuns.push(await cStreamFloor());
    const cStreamBytesPerSec = median(cStreamRuns);

    const fillBytes = Buffer.allocUnsafe(FILL_BYTES);
    randomFillSync(fillBytes);
    const fill: Fill = { bytes: fillBytes, sha256: createHash('sha256').update(fillBytes).digest('hex') };

    // One migration not counted: it loads the migration code in this process.
    progress('warm-up migration');
    await migrateOnce(SCENARIOS[2]!, fill, options.downtimeBudgetMs);
    const runs = new Map<string, MigrationRun[]>(SCENARIOS.map((s) => [s.key, []]));
    // Round by round, so that every scenario sees the same spread of host load.
    for (let round = 1; round <= options.rounds; round++) {
      for (const scenario of SCENARIOS) {
        progress(`round ${round}/${options.rounds}: ${scenario.title}`);
        runs.get(scenario.key)!.push(await migrateOnce(scenario, fill, options.downtimeBudgetMs));
      }
    }

    let qemuRuns: Map<string, QemuRun[]> | null = null;
    let qemuError: string | null = null;
    if (qemuInstalled()) {
      qemuRuns = new Map();
      const fillFile = path.join(dir, 'fill.bin');
      writeFileSync(fillFile, fillBytes);
      try {
        for (const scenario of SCENARIOS.filter((s) => s.workload !== 'dirtier')) {
          const list: QemuRun[] = [];
          for (let round = 1; round <= options.rounds; round++) {
            progress(`QEMU round ${round}/${options.rounds}: ${scenario.title}`);
            list.push(await qemuMigrateOnce(scenario.memoryBytes, dir, scenario.workload === 'filled' ? fillFile : undefined));
          }
          qemuRuns.set(scenario.key, list);
        }
      } catch (error) {
        qemuError = (error as Error).message;
        qemuRuns = null;
      }
    }

    progress(`snapshot restore x ${options.iterations}`);
    const restores = await restoreRuns(dir, options.iterations);

    const results: ScenarioResult[] = SCENARIOS.map((scenario) => ({
      scenario,
      runs: runs.get(scenario.key)!,
      medians: scenarioMedians(runs.get(scenario.key)!, tcpBytesPerSec, cStreamBytesPerSec),
      qemu: qemuRuns?.get(scenario.key) ?? null,
    }));
    const restore = {
      toStartedMs: median(restores.map((r) => r.toStartedMs)),
      toFirstByteMs: median(restores.map((r) => r.toFirstByteMs)),
      targetMs: 10,
    };
    const host = hostInfo();
    const wallSeconds = (performance.now() - benchStarted) / 1000;

    if (options.json) {
      console.log(JSON.stringify({
        host,
        options,
        references: { memcpyBytesPerSec, freshRamBytesPerSec, tcpBytesPerSec, unixBytesPerSec, cStreamBytesPerSec, tcpRuns, unixRuns, cStreamRuns },
        scenarios: results.map((r) => ({
          key: r.scenario.key, title: r.scenario.title, medians: r.medians,
          runs: r.runs.map((run) => ({ ...run.stats, lastExpectedDowntimeMs: run.lastExpectedDowntimeMs })),
          qemu: r.qemu,
        })),
        qemuError,
        restore: { ...restore, runs: restores },
        wallSeconds,
      }, null, 2));
      return;
    }

    const mibs = (bytesPerSec: number) => `${format(bytesPerSec / MiB)} MiB/s`;
    console.log(`host: ${host.cpu}, ${host.cpus} CPUs, Linux ${host.kernel}, KVM module ${host.kvmModule}, Node ${host.node}`);
    console.log(`runs: ${options.rounds} migrations per scenario over loopback TCP to a new destination process, median shown; ` +
      `downtime budget ${options.downtimeBudgetMs ?? 50} ms`);
    console.log('');
    console.log('references (same run):');
    console.log(`  memcpy, Buffer.copy of 256 MiB, best of 5                  ${mibs(memcpyBytesPerSec)}`);
    console.log(`  pwrite of 64 MiB into new guest RAM (memfd), best of 3    ${mibs(freshRamBytesPerSec)}  (what a destination can take: ${format(freshRamBytesPerSec / tcpBytesPerSec)}x TCP)`);
    console.log(`  loopback TCP, Node to Node process, 1 GiB in 2 MiB writes ${mibs(tcpBytesPerSec)}  (median of ${socketRounds}: ${tcpRuns.map((b) => format(b / MiB)).join(', ')})`);
    console.log(`  unix socket, Node to Node process, 1 GiB in 2 MiB writes  ${mibs(unixBytesPerSec)}  (median of ${socketRounds}: ${unixRuns.map((b) => format(b / MiB)).join(', ')})`);
    console.log(`  the 64 MiB stream in C (copy, CRC-32C, TCP; CRC-32C, pwrite) ${mibs(cStreamBytesPerSec)}  (${format(cStreamBytesPerSec / tcpBytesPerSec)}x TCP; median of ${socketRounds}: ${cStreamRuns.map((b) => format(b / MiB)).join(', ')})`);
    console.log('');

    const rows: [string, string][] = [
      ['total (ms)', 'totalMs'],
      ['setup (ms)', 'setupMs'],
      ['downtime (ms)', 'downtimeMs'],
      ['expected downtime, last round (ms)', 'lastExpectedDowntimeMs'],
      ['transferred (MiB)', 'transferredMiB'],
      ['pages sent', 'pagesTransferred'],
      ['zero pages skipped', 'zeroPagesSkipped'],
      ['pages resent', 'pagesResent'],
      ['iterations', 'iterations'],
      ['dirty rate, last round (pages/s)', 'dirtyPagesPerSec'],
      ['throughput (MiB/s)', 'throughputMiBPerSec'],
      ['throughput / raw TCP', 'throughputOverTcp'],
      ['throughput / the stream in C', 'throughputOverCStream'],
    ];
    table([
      ['migration, median', ...results.map((r) => r.scenario.title)],
      ...rows.map(([label, key]) => [label, ...results.map((r) => {
        if (key !== 'throughputOverTcp' && key !== 'throughputOverCStream') return format(r.medians[key]!);
        // Idle guests send a few pages: their rate says nothing about the transport.
        return r.medians.transferredMiB! >= MIN_RATED_MIB ? r.medians[key]!.toFixed(3) : '-';
      })]),
    ]);
    console.log('');
    if (qemuRuns) {
      const q = (r: ScenarioResult, pick: (run: QemuRun) => number) => (r.qemu ? median(r.qemu.map(pick)) : NaN);
      table([
        ['QEMU microvm, PVH guest, median', ...results.map((r) => r.scenario.title)],
        ['QEMU total (ms)', ...results.map((r) => (r.qemu ? format(q(r, (x) => x.totalMs)) : '-'))],
        ['QEMU downtime (ms)', ...results.map((r) => (r.qemu ? format(q(r, (x) => x.downtimeMs)) : '-'))],
        ['QEMU transferred (MiB)', ...results.map((r) => (r.qemu ? format(q(r, (x) => x.transferredBytes / MiB)) : '-'))],
        ['total, node-kvm / QEMU', ...results.map((r) => (r.qemu ? (r.medians.totalMs! / q(r, (x) => x.totalMs)).toFixed(3) : '-'))],
        ['downtime, node-kvm / QEMU', ...results.map((r) => (r.qemu ? (r.medians.downtimeMs! / Math.max(q(r, (x) => x.downtimeMs), 1)).toFixed(3) : '-'))],
      ]);
    } else {
      console.log(qemuError ? `QEMU: failed: ${qemuError}` : 'QEMU: not installed');
    }
    console.log('');
    console.log(`snapshot restore, 256 MiB, warm process, pooled vCPU thread, median of ${options.iterations}:`);
    console.log(`  Machine.restore() -> start() returned      ${restore.toStartedMs.toFixed(2)} ms  (target < 10 ms)`);
    console.log(`  Machine.restore() -> first guest byte      ${restore.toFirstByteMs.toFixed(2)} ms`);
    console.log('');

    const byKey = (key: string) => results.find((r) => r.scenario.key === key)!.medians;
    console.log('targets:');
    const target = (label: string, value: string, goal: string, met: string) => console.log(`  ${label.padEnd(48)} ${value.padStart(10)}  ${goal.padEnd(36)} ${met}`);
    target('total, 256 MiB idle', `${format(byKey('idle256').totalMs!)} ms`, '<= QEMU idle, 16-27 ms', verdict(byKey('idle256').totalMs!, 16, 27));
    target('total, 1 GiB idle', `${format(byKey('idle1g').totalMs!)} ms`, '<= QEMU idle, 16-27 ms', verdict(byKey('idle1g').totalMs!, 16, 27));
    target('total, 64 MiB filled', `${format(byKey('filled').totalMs!)} ms`, '<= QEMU 64 MiB filled, 271-342 ms', verdict(byKey('filled').totalMs!, 271, 342));
    // The 3 ms target is QEMU's downtime for the idle and filled guests; a guest that keeps
    // writing stops when what is left fits the downtime budget, which it is held to instead.
    const budgetMs = options.downtimeBudgetMs ?? 50;
    for (const r of results) {
      if (r.scenario.workload === 'dirtier') {
        target(`downtime, ${r.scenario.title}`, `${format(r.medians.downtimeMs!)} ms`, `<= the budget, ${budgetMs} ms`, r.medians.downtimeMs! <= budgetMs ? 'yes' : 'no');
      } else {
        target(`downtime, ${r.scenario.title}`, `${format(r.medians.downtimeMs!)} ms`, '< 3 ms', r.medians.downtimeMs! < 3 ? 'yes' : 'no');
      }
    }
    for (const key of ['filled', 'dirtier']) {
      const r = results.find((x) => x.scenario.key === key)!;
      target(`throughput / raw TCP, ${r.scenario.title}`, r.medians.throughputOverTcp!.toFixed(3), '>= 0.7', r.medians.throughputOverTcp! >= 0.7 ? 'yes' : 'no');
    }
    target('restore -> running', `${restore.toStartedMs.toFixed(2)} ms`, '< 10 ms', restore.toStartedMs < 10 ? 'yes' : 'no');
    console.log('');
    console.log('raw runs (total ms / downtime ms):');
    for (const r of results) {
      console.log(`  ${r.scenario.title.padEnd(26)} ${r.runs.map((run) => `${format(run.stats.totalTimeMs)}/${format(run.stats.downtimeMs)}`).join('  ')}`);
    }
    console.log(`  ${'restore -> started'.padEnd(26)} ${restores.map((x) => x.toStartedMs.toFixed(2)).join(' ')}`);
    console.log(`  ${'restore -> first byte'.padEnd(26)} ${restores.map((x) => x.toFirstByteMs.toFixed(2)).join(' ')}`);
    console.log('');
    if (phaseTimingEnabled()) {
      table(breakdownTable(results.map((r) => ({ title: r.scenario.title, runs: r.runs.map((run) => run.phases) }))));
      console.log('');
    }
    console.log(`benchmark wall time ${wallSeconds.toFixed(1)} s`);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

await main();
