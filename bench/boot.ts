// Boot latency: (a) in a warm process, Machine.create() to the guest's first serial byte, with
// and without a pool of pre-started vCPU threads, beside an empty Worker's start (the floor of
// the figure without a pool); (b) the node-kvm CLI from process start to the first serial byte,
// against `node -e 0` and a process that starts an empty thread writing one byte (the command's
// floor) in the same run; (c) QEMU (microvm, PVH guest) where installed.
// Run: npm run bench:boot [-- --iterations N] [--json]
import { spawn, spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { Writable } from 'node:stream';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { Worker } from 'node:worker_threads';
import { Machine, VcpuWorkerPool } from '../lib/index.js';

const { values } = parseArgs({ options: { iterations: { type: 'string', default: '20' }, json: { type: 'boolean' } } });
const iterations = Number(values.iterations);
const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const hello = readFileSync(path.join(root, 'guests', 'build', 'hello.bin'));
const pvh = path.join(root, 'guests', 'build', 'pvh.elf');
// The package's bin: the one-file build of the command (scripts/bundle.mjs).
const cli = path.join(root, 'dist', 'lib', 'cli', 'node-kvm.cjs');

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

/** Machine.create() until the first byte the guest writes to COM1, then stop. */
async function createToFirstByte(pool?: VcpuWorkerPool): Promise<number> {
  let firstByte = 0;
  let resolveFirst!: () => void;
  const first = new Promise<void>((resolve) => (resolveFirst = resolve));
  const output = new Writable({
    write(_chunk, _encoding, callback) {
      if (!firstByte) {
        firstByte = performance.now();
        resolveFirst();
      }
      callback();
    },
  });
  const started = performance.now();
  const machine = await Machine.create({ image: hello, memoryBytes: 1 << 20, serial: { output }, pool });
  machine.start();
  await first;
  await machine.wait();
  return firstByte - started;
}

/** An empty Worker, from new Worker() until its first message: what any new vCPU thread costs here. */
function emptyThread(): Promise<number> {
  const started = performance.now();
  const worker = new Worker('require("node:worker_threads").parentPort.postMessage(0)', { eval: true });
  return new Promise((resolve, reject) => {
    worker.once('error', reject);
    worker.once('message', () => {
      const time = performance.now() - started;
      void worker.terminate().then(() => resolve(time));
    });
  });
}

/** A process that starts an empty thread writing one byte to stdout: the command's floor. */
const EMPTY_THREAD_PROCESS = 'new (require("node:worker_threads").Worker)(\'require("node:fs").writeSync(1, "x")\', { eval: true })';

/** A child process until its first stdout byte (or its exit, for `node -e 0`). */
function processTime(args: string[], untilFirstByte: boolean): Promise<number> {
  return new Promise((resolve, reject) => {
    const started = performance.now();
    const child = spawn(process.execPath, args, { stdio: ['ignore', 'pipe', 'inherit'] });
    let done = false;
    child.stdout.once('data', () => {
      if (untilFirstByte && !done) {
        done = true;
        resolve(performance.now() - started);
      }
    });
    child.on('exit', (code) => {
      if (!done) {
        done = true;
        if (untilFirstByte) reject(new Error(`exited (${code}) before printing`));
        else resolve(performance.now() - started);
      }
    });
  });
}

// -arch-capabilities: some hosts' KVM (kvm_pvm) refuses the IA32_ARCH_CAPABILITIES value QEMU sets, and QEMU aborts.
const QEMU_ARGS = [
  '-M', 'microvm', '-enable-kvm', '-cpu', 'host,-arch-capabilities', '-m', '64M', '-nodefaults', '-no-user-config', '-nographic',
  '-serial', 'stdio', '-device', 'isa-debug-exit,iobase=0xf4,iosize=4', '-kernel', pvh,
];
const hasQemu = spawnSync('sh', ['-c', 'command -v qemu-system-x86_64']).status === 0;

/** A whole run of the PVH guest, process start to exit; it must print its memory map and exit 0x13. */
function pvhRun(command: string, args: string[]): number {
  const started = performance.now();
  const result = spawnSync(command, args, { encoding: 'latin1', timeout: 30_000 });
  const time = performance.now() - started;
  // The guest ends with debug-exit 0x13: status (0x13 << 1) | 1.
  if (!result.stdout?.includes('mmap') || result.status !== 39) {
    throw new Error(`${command} did not run the PVH guest (status ${result.status}): ${(result.stderr || result.error?.message) ?? ''}`);
  }
  return time;
}

// (a) warm process. The first run of each loads code; it is not counted.
await createToFirstByte();
await emptyThread();
const cold: number[] = [];
const empty: number[] = [];
for (let i = 0; i < iterations; i++) {
  cold.push(await createToFirstByte());
  empty.push(await emptyThread());
}
const pool = await VcpuWorkerPool.create(1);
await createToFirstByte(pool);
const pooled: number[] = [];
for (let i = 0; i < iterations; i++) pooled.push(await createToFirstByte(pool));
await pool.close();

// (b) process start to first byte, interleaved with node -e 0.
const cliRuns: number[] = [];
const nodeRuns: number[] = [];
const emptyThreadRuns: number[] = [];
const processIterations = Math.max(5, Math.floor(iterations / 2));
for (let i = 0; i < processIterations; i++) {
  cliRuns.push(await processTime([cli, 'run', path.join(root, 'guests', 'build', 'hello.bin')], true));
  nodeRuns.push(await processTime(['-e', '0'], false));
  emptyThreadRuns.push(await processTime(['-e', EMPTY_THREAD_PROCESS], true));
}

// (c) the PVH guest from process start to exit, node-kvm's command and QEMU's microvm interleaved.
const pvhRuns: number[] = [];
const qemuRuns: number[] = [];
if (hasQemu) {
  for (let i = 0; i < processIterations; i++) {
    pvhRuns.push(pvhRun(process.execPath, [cli, 'run', pvh, '--memory', '64M']));
    qemuRuns.push(pvhRun('qemu-system-x86_64', QEMU_ARGS));
  }
}
const qemu = hasQemu ? { nodeKvmMs: median(pvhRuns), qemuMs: median(qemuRuns), nodeKvmOverQemu: median(pvhRuns) / median(qemuRuns) } : null;
const results = {
  createToFirstByteMs: { withoutPool: median(cold), withPool: median(pooled), targetWithoutPool: 25, targetWithPool: 5 },
  emptyThreadMs: median(empty),
  cliToFirstByteMs: median(cliRuns),
  nodeAloneMs: median(nodeRuns),
  cliOverNode: median(cliRuns) / median(nodeRuns),
  emptyThreadProcessMs: median(emptyThreadRuns),
  emptyThreadProcessOverNode: median(emptyThreadRuns) / median(nodeRuns),
  pvhGuestToExit: qemu,
};
if (values.json) {
  console.log(JSON.stringify(results, null, 2));
} else {
  const f = (ms: number) => `${ms.toFixed(2)} ms`;
  console.log(`boot latency, median of ${iterations} (process rows: ${processIterations})`);
  console.log(`  Machine.create() -> first serial byte, new threads   ${f(results.createToFirstByteMs.withoutPool)}  (target < 25 ms)`);
  console.log(`  new Worker() -> first message, an empty thread       ${f(results.emptyThreadMs)}  (the floor: new threads are ${f(results.createToFirstByteMs.withoutPool - results.emptyThreadMs)} above it)`);
  console.log(`  Machine.create() -> first serial byte, warm pool     ${f(results.createToFirstByteMs.withPool)}  (target < 5 ms)`);
  console.log(`  node-kvm run hello: process start -> first byte      ${f(results.cliToFirstByteMs)}`);
  console.log(`  node -e 0: process start -> exit                     ${f(results.nodeAloneMs)}`);
  console.log(`  ratio CLI / node alone                               ${results.cliOverNode.toFixed(2)}  (target <= 1.5)`);
  console.log(`  node with an empty thread writing a byte             ${f(results.emptyThreadProcessMs)}  = ${results.emptyThreadProcessOverNode.toFixed(2)} of node alone (the command's floor)`);
  if (qemu === null) {
    console.log('  qemu-system-x86_64 -M microvm (PVH guest)            not installed here');
  } else {
    console.log(`  node-kvm run pvh.elf: process start -> exit          ${f(qemu.nodeKvmMs)}`);
    console.log(`  qemu-system-x86_64 -M microvm, the same PVH guest    ${f(qemu.qemuMs)}`);
    console.log(`  ratio node-kvm / QEMU                                ${qemu.nodeKvmOverQemu.toFixed(2)}`);
  }
}
