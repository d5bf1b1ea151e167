// Debugging figures, measured side by side in one run:
//   - single-step rate (steps/s): from the library (a DebugTarget step loop), driven by gdb
//     (`stepi N` in batch mode against node-kvm's stub) and, where qemu-system-x86_64 is
//     installed, gdb against QEMU's gdbstub (-enable-kvm) on the same guest (guests/spin.S: `cli`
//     and a jump to itself, real mode at 0x7c00; for QEMU the same bytes as a boot sector);
//   - what exit statistics and an exit trace cost per exit: the exits guest (1,000,000 port
//     writes) through the whole VMM with neither, with counting, with tracing.
// gdb's figure is timed inside gdb (its Python clock around `stepi N`), so neither gdb's start
// nor QEMU's BIOS is counted.
//
//   npm run bench:debug -- [--steps N] [--rounds R] [--exit-rounds R] [--json]
import { execFile, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { closeSync, mkdtempSync, openSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { DebugTarget, GdbServer, Machine } from '../lib/index.js';
import { hostInfo, median } from './report.js';
import { VMM_EXITS, measureVmmExits } from './vmm-exits.js';
import { countExit, createExitStatsBuffer } from '../lib/vmm/exit-stats.js';
import { TraceWriter } from '../lib/vmm/exit-trace.js';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const SPIN = path.join(root, 'guests', 'build', 'spin.bin');
const GDB = 'gdb';

interface Options {
  steps: number;
  rounds: number;
  exitRounds: number;
  json: boolean;
}

function parseOptions(): Options {
  const { values } = parseArgs({
    options: {
      steps: { type: 'string', default: '2000' },
      rounds: { type: 'string', default: '3' },
      'exit-rounds': { type: 'string', default: '3' },
      json: { type: 'boolean', default: false },
      help: { type: 'boolean', short: 'h', default: false },
    },
    strict: true,
  });
  if (values.help) {
    console.log(`usage: npm run bench:debug -- [options]
  --steps N        single steps per measurement (default 2000)
  --rounds R       rounds of the step measurements; the median is reported (default 3)
  --exit-rounds R  rounds of the exit-accounting measurements, 0 to skip them (default 3)
  --json           print the results as JSON`);
    process.exit(0);
  }
  const count = (name: string, text: string, min: number) => {
    const n = Number(text);
    if (!/^\d+$/.test(text) || n < min || n > 1e7) throw new RangeError(`--${name} must be an integer ${min}..10000000, got '${text}'`);
    return n;
  };
  return { steps: count('steps', values.steps, 1), rounds: count('rounds', values.rounds, 1), exitRounds: count('exit-rounds', values['exit-rounds'], 0), json: values.json };
}

const installed = (command: string) => spawnSync('sh', ['-c', `command -v ${command}`]).status === 0;

/** Steps vCPU 0 `steps` times through a DebugTarget; steps/s. */
async function libraryStepRate(steps: number): Promise<number> {
  const machine = await Machine.create({ image: SPIN, memoryBytes: 1 << 20, serial: { output: null } });
  try {
    const target = new DebugTarget(machine);
    const step = () => new Promise<void>((resolve, reject) => {
      target.onStop((reason) => (reason.kind === 'step' ? resolve() : reject(new Error(`stopped for ${reason.kind}`))));
      target.resume({ step: new Set([0]) }).catch(reject);
    });
    for (let i = 0; i < 50; i++) await step(); // warm-up
    const started = performance.now();
    for (let i = 0; i < steps; i++) await step();
    return steps / ((performance.now() - started) / 1000);
  } finally {
    await machine.stop();
  }
}

/** gdb in batch mode: attach to `remote`, run `before`, then `stepi N` timed by gdb's own clock; steps/s. */
function gdbStepRate(remote: string, steps: number, before: string[] = []): Promise<number> {
  const commands = [
    'set pagination off', 'set confirm off', `target remote ${remote}`, ...before,
    'stepi 20', // warm-up
    'python import time; _t = time.perf_counter()',
    `stepi ${steps}`,
    'python print("elapsed=%.6f" % (time.perf_counter() - _t))',
    'kill',
  ];
  return new Promise((resolve, reject) => {
    execFile(GDB, ['-batch', '-nx', ...commands.flatMap((c) => ['-ex', c])], { timeout: 300_000 }, (_error, stdout, stderr) => {
      const elapsed = /elapsed=([\d.]+)/.exec(stdout);
      if (!elapsed) reject(new Error(`gdb gave no time:\n${stdout}${stderr}`));
      else resolve(steps / Number(elapsed[1]));
    });
  });
}

async function nodeKvmGdbStepRate(steps: number): Promise<number> {
  const machine = await Machine.create({ image: SPIN, memoryBytes: 1 << 20, serial: { output: null } });
  try {
    const stub = await GdbServer.listen(machine, 'tcp:127.0.0.1:0');
    return await gdbStepRate(stub.address.replace(/^tcp:/, ''), steps);
  } finally {
    await machine.stop();
  }
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once('error', reject);
    server.listen({ host: '127.0.0.1', port: 0 }, () => {
      const { port } = server.address() as net.AddressInfo;
      server.close(() => resolve(port));
    });
  });
}

/** QEMU (KVM) with the spin guest as its boot sector, stopped at the reset vector for gdb; gdb continues to 0x7c00 first. */
async function qemuGdbStepRate(steps: number, dir: string): Promise<number> {
  const sector = Buffer.alloc(512);
  sector.set(readFileSync(SPIN));
  sector[510] = 0x55;
  sector[511] = 0xaa;
  const disk = path.join(dir, 'spin.img');
  writeFileSync(disk, sector);
  const port = await freePort();
  const qemu: ChildProcess = spawn('qemu-system-x86_64', [
    '-cpu', 'host,-arch-capabilities', '-enable-kvm', '-S', '-gdb', `tcp:127.0.0.1:${port}`,
    '-display', 'none', '-nodefaults', '-no-user-config', '-m', '16', '-drive', `file=${disk},format=raw,if=ide,index=0`,
  ], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  qemu.stderr!.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  try {
    // gdb may come before QEMU listens: wait for the port.
    for (let tries = 0; ; tries++) {
      const connected = await new Promise<boolean>((resolve) => {
        const socket = net.createConnection({ host: '127.0.0.1', port }, () => {
          socket.destroy();
          resolve(true);
        });
        socket.once('error', () => resolve(false));
      });
      if (connected) break;
      if (tries > 100 || qemu.exitCode !== null) throw new Error(`QEMU did not start its gdbstub: ${stderr.trim()}`);
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    return await gdbStepRate(`127.0.0.1:${port}`, steps, ['hbreak *0x7c00', 'continue', 'delete']);
  } finally {
    qemu.kill('SIGKILL');
  }
}

async function exitCost(rounds: number, dir: string) {
  const runs = { off: [] as number[], stats: [] as number[], trace: [] as number[] };
  const tracePath = path.join(dir, 'exits.trace');
  let traceBytes = 0;
  for (let round = 0; round < rounds; round++) {
    progress(`exit accounting, round ${round + 1}/${rounds}`);
    runs.off.push((await measureVmmExits(root)).nsPerExit);
    runs.stats.push((await measureVmmExits(root, { exitStats: true })).nsPerExit);
    runs.trace.push((await measureVmmExits(root, { traceExits: tracePath })).nsPerExit);
    traceBytes = statSync(tracePath).size;
    rmSync(tracePath, { force: true });
  }
  return { runs, traceBytes };
}

/**
 * The VMM-side work per exit alone, without KVM: what the instrumented loop adds (two clock
 * reads, the counters, a trace record into its buffer and its share of the writes to /dev/null),
 * in ns per exit, on a fake port-I/O exit.
 */
function perExitWork(): { statsNs: number; traceNs: number } {
  const run = new DataView(new ArrayBuffer(4096));
  run.setUint8(32, 1); // out
  run.setUint8(33, 1);
  run.setUint16(34, 0x80, true);
  run.setUint32(36, 1, true);
  run.setUint32(40, 4096 - 8, true);
  const bytes = new Uint8Array(run.buffer);
  const stats = new Float64Array(createExitStatsBuffer());
  const fd = openSync('/dev/null', 'w');
  const writer = new TraceWriter(fd, 0, performance.timeOrigin);
  const n = 2_000_000;
  const time = (work: () => void) => {
    for (let i = 0; i < n / 10; i++) work();
    const started = performance.now();
    for (let i = 0; i < n; i++) work();
    return ((performance.now() - started) * 1e6) / n;
  };
  try {
    return {
      statsNs: time(() => {
        const started = performance.now();
        countExit(stats, 2, run, performance.now() - started);
      }),
      traceNs: time(() => writer.record(2, run, bytes, performance.now())),
    };
  } finally {
    closeSync(fd);
  }
}

function progress(message: string): void {
  process.stderr.write(`${message}\n`);
}

const options = parseOptions();
const dir = mkdtempSync(path.join(tmpdir(), 'node-kvm-bench-debug-'));
try {
  const hasGdb = installed(GDB);
  const hasQemu = installed('qemu-system-x86_64');
  const steps = { library: [] as number[], gdb: [] as number[], qemu: [] as number[] };
  let qemuError: string | null = hasQemu ? null : 'qemu-system-x86_64 is not installed';
  for (let round = 0; round < options.rounds; round++) {
    progress(`single steps, round ${round + 1}/${options.rounds}`);
    steps.library.push(await libraryStepRate(options.steps));
    if (hasGdb) steps.gdb.push(await nodeKvmGdbStepRate(options.steps));
    if (hasGdb && hasQemu && qemuError === null) {
      try {
        steps.qemu.push(await qemuGdbStepRate(options.steps, dir));
      } catch (error) {
        qemuError = (error as Error).message;
      }
    }
  }
  const exits = options.exitRounds > 0 ? await exitCost(options.exitRounds, dir) : null;
  const work = perExitWork();
  const results = {
    host: hostInfo(),
    steps: options.steps,
    stepsPerSec: {
      library: median(steps.library),
      gdbNodeKvm: hasGdb ? median(steps.gdb) : null,
      gdbQemu: steps.qemu.length ? median(steps.qemu) : null,
    },
    raw: steps,
    qemuError,
    exitCostNs: exits && {
      exits: VMM_EXITS,
      off: median(exits.runs.off),
      stats: median(exits.runs.stats),
      trace: median(exits.runs.trace),
      raw: exits.runs,
      traceBytes: exits.traceBytes,
    },
    perExitWorkNs: work,
  };
  if (options.json) {
    console.log(JSON.stringify(results, null, 2));
  } else {
    const f = (n: number | null, digits = 0) => (n === null ? 'n/a' : n.toLocaleString('en-US', { maximumFractionDigits: digits }));
    const { stepsPerSec: s } = results;
    console.log(`single-step rate, ${options.steps} steps, median of ${options.rounds} (steps/s):`);
    console.log(`  library (DebugTarget)      ${f(s.library)}`);
    console.log(`  gdb -> node-kvm stub       ${f(s.gdbNodeKvm)}`);
    console.log(`  gdb -> QEMU gdbstub (KVM)  ${f(s.gdbQemu)}${qemuError ? `  (${qemuError})` : ''}`);
    if (s.gdbNodeKvm !== null && s.gdbQemu !== null) console.log(`  ratio node-kvm/QEMU (gdb)  ${(s.gdbNodeKvm / s.gdbQemu).toFixed(3)}`);
    console.log(`  raw: library ${steps.library.map((n) => f(n)).join(', ')}; gdb node-kvm ${steps.gdb.map((n) => f(n)).join(', ')}; gdb QEMU ${steps.qemu.map((n) => f(n)).join(', ') || 'n/a'}`);
    if (results.exitCostNs) {
      const e = results.exitCostNs;
      console.log(`\nport-I/O exit through the whole VMM, ${f(e.exits)} exits, median of ${options.exitRounds} (ns/exit):`);
      console.log(`  nothing on                 ${f(e.off)}`);
      console.log(`  exit statistics on         ${f(e.stats)}  (+${f(e.stats - e.off)} ns/exit)`);
      console.log(`  exit trace on              ${f(e.trace)}  (+${f(e.trace - e.off)} ns/exit, ${f(e.traceBytes / 2 ** 20, 1)} MiB of trace)`);
      console.log(`  the VMM's work alone, without KVM: counting ${f(work.statsNs, 1)} ns/exit, tracing ${f(work.traceNs, 1)} ns/exit`);
      console.log(`  raw: off ${e.raw.off.map((n) => f(n)).join(', ')}; stats ${e.raw.stats.map((n) => f(n)).join(', ')}; trace ${e.raw.trace.map((n) => f(n)).join(', ')}`);
    }
    console.log(`\nhost: ${Object.entries(results.host).map(([k, v]) => `${k} ${v}`).join(', ')}`);
  }
} finally {
  rmSync(dir, { recursive: true, force: true });
}
