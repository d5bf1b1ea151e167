// The other process of bench/migrate.ts. Talks to it in JSON lines on stdout: first
// {"listening": ADDRESS}, then {"report": {...}} (or {"error": MESSAGE}) before it exits.
//
//   migrate-peer.js incoming --address A [--token T] [--vcpus N] [--expect-lines N] [--hash-range START:BYTES]
//     Waits for one migration with Machine.incoming() (vCPU threads taken from a pool started
//     before listening, as a destination VMM has its threads before the stream comes), checks
//     that the guest runs here, stops it, and reports.
//   migrate-peer.js sink --address A --bytes N
//     Reads N bytes from one connection, discarding them, then writes one byte back: the far end
//     of the raw socket bandwidth reference.
import { createHash } from 'node:crypto';
import net from 'node:net';
import { parseArgs } from 'node:util';
import { Machine, VcpuWorkerPool } from '../lib/index.js';
import { phaseMarks } from '../lib/vmm/phase-timing.js';

const { positionals, values } = parseArgs({
  allowPositionals: true,
  options: {
    address: { type: 'string' },
    token: { type: 'string' },
    vcpus: { type: 'string', default: '1' },
    'memory-bytes': { type: 'string' },
    irqchip: { type: 'string' },
    'expect-lines': { type: 'string', default: '0' },
    'hash-range': { type: 'string' },
    bytes: { type: 'string' },
  },
});

const say = (message: Record<string, unknown>) => process.stdout.write(`${JSON.stringify(message)}\n`);
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

function listenOptions(address: string): net.ListenOptions {
  if (address.startsWith('unix:')) return { path: address.slice('unix:'.length) };
  const match = /^tcp:([^:]+):(\d+)$/.exec(address);
  if (!match) throw new RangeError(`--address must be tcp:HOST:PORT or unix:PATH, got '${address}'`);
  return { host: match[1], port: Number(match[2]) };
}

/** The destination: one migration in, the guest checked running, stopped, reported. */
async function incoming(address: string): Promise<void> {
  const vcpus = Number(values.vcpus);
  const expectLines = Number(values['expect-lines']);
  const pool = await VcpuWorkerPool.create(vcpus);
  let output = '';
  const sink = {
    write(chunk: Uint8Array | string) {
      output += typeof chunk === 'string' ? chunk : Buffer.from(chunk).toString('latin1');
      return true;
    },
  } as unknown as NodeJS.WritableStream;
  const logs: string[] = [];
  const machine = await Machine.incoming(address, {
    token: values.token,
    ...(values['memory-bytes'] ? { memoryBytes: Number(values['memory-bytes']), vcpus } : {}),
    ...(values.irqchip ? { irqchip: values.irqchip === 'on' } : {}),
    pool,
    timeoutMs: 60_000,
    serial: { output: sink },
    log: (message) => logs.push(message),
    onListening: (bound) => say({ listening: bound }),
  });
  const runningAt = performance.now();
  const phases = phaseMarks();

  // The guest must go on here: the dirtier prints lines of its own, the idle guest just stays
  // in its HLT (in the kernel, with interrupts on), so it must still be running a moment later.
  const deadline = runningAt + 20_000;
  while (output.split('\n').length - 1 < expectLines && performance.now() < deadline && machine.state === 'running') await sleep(5);
  if (expectLines === 0) await sleep(20);
  const state = machine.state;
  let hash: string | undefined;
  if (values['hash-range']) {
    const [start, bytes] = values['hash-range'].split(':').map(Number) as [number, number];
    hash = createHash('sha256').update(machine.memory.bytes().subarray(start, start + bytes)).digest('hex');
  }
  const exit = await machine.stop();
  await pool.close();
  // The output's start: the guest may have been moved in the middle of a line.
  say({ report: { state, exit: exit.reason, lines: output.split('\n').length - 1, bad: /BAD/.test(output), output: output.slice(0, 200), hash, logs, phases } });
}

/** The raw socket reference: count the bytes, then answer with one. */
async function sink(address: string, bytes: number): Promise<void> {
  await new Promise<void>((resolve, reject) => {
    const server = net.createServer((socket) => {
      server.close();
      let received = 0;
      socket.on('data', (chunk: Buffer) => {
        received += chunk.length;
        if (received >= bytes) {
          socket.end(Buffer.of(1));
          say({ report: { received } });
          resolve();
        }
      });
      socket.on('error', reject);
    });
    server.on('error', reject);
    server.listen(listenOptions(address), () => {
      const bound = server.address();
      say({ listening: typeof bound === 'string' ? `unix:${bound}` : `tcp:${bound!.address}:${bound!.port}` });
    });
  });
}

try {
  const address = values.address;
  if (!address) throw new TypeError('--address is required');
  if (positionals[0] === 'incoming') await incoming(address);
  else if (positionals[0] === 'sink') {
    const bytes = Number(values.bytes);
    if (!Number.isSafeInteger(bytes) || bytes < 1) throw new RangeError(`--bytes must be a positive integer, got '${values.bytes ?? ''}'`);
    await sink(address, bytes);
  }
  else throw new RangeError(`the first argument must be 'incoming' or 'sink', got '${positionals[0] ?? ''}'`);
} catch (error) {
  say({ error: (error as Error).message });
  process.exitCode = 1;
}
