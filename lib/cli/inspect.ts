// `regs`, `x` and `stats` (a running machine, through its control API) and `trace` (an exit trace
// file, or starting and stopping one on a running machine).
import path from 'node:path';
import { callApi, parseApiCommandArgs, requireApiSocket } from './api-client.js';
import { argValueError } from '../kvm/errors.js';
import { parseSize } from './run-options.js';
import type { ExitStats } from '../vmm/machine.js';

export const INSPECT_USAGE = {
  regs: `usage: node-kvm regs --api-socket PATH [--vcpu N] [--json]

Prints a vCPU's registers (as QEMU's \`info registers\`): general registers, RIP, RFLAGS decoded,
segments with base, limit and attributes, GDT, IDT, CR0, CR2, CR3, CR4, CR8, EFER. A running
machine is stopped for the moment of the read, quietly (no paused/resumed), and runs on.`,
  x: `usage: node-kvm x --api-socket PATH ADDR [LEN] [--phys] [--vcpu N] [--json]

Dumps LEN bytes (default 64, at most 1 MiB; a size: 256, 0x100, 4K, 1.5K) of guest memory at
ADDR (decimal, or hex with 0x) in hex and ASCII. ADDR is virtual, translated through the page tables of vCPU 0 (or --vcpu N), or
guest-physical with --phys. An address that is not mapped is refused.`,
  stats: `usage: node-kvm stats --api-socket PATH [--duration SECONDS] [--json]
       node-kvm stats --api-socket PATH --reset

Prints exit statistics per vCPU (as \`perf kvm stat\`): exits by reason, port I/O by port, MMIO by
page, with counts and the time the VMM spent handling them. A machine that does not count yet
starts now (it costs a clock read per exit from then on); the figures then cover --duration
seconds (default 1). A machine started with --exit-stats, or asked before, reports everything
since it started counting, or since --reset set every count back to zero (counting goes on).`,
  trace: `usage: node-kvm trace FILE [--summary] [--vcpu N] [--limit N]
       node-kvm trace --api-socket PATH --start FILE | --stop

Reads an exit trace written by node-kvm run --trace-exits FILE (or --start): one line per exit
(time in us since the trace started, vCPU, kind, RIP, port or address, size, data), or with
--summary the count of exits per kind and port or page.

With --api-socket, starts writing every exit of a running machine to FILE (replaced if it exists),
or stops the trace it writes (the file is complete when the command returns). A machine that
does not trace pays nothing for it.`,
} as const;

/** The most `x` dumps at once (what the API's x method reads at most). */
const MAX_DUMP_BYTES = 1024 * 1024;

export async function inspectCommand(command: 'regs' | 'x' | 'stats' | 'trace', args: string[]): Promise<number> {
  const parsed = parseApiCommandArgs(args, {
    vcpu: { type: 'string' },
    json: { type: 'boolean' },
    phys: { type: 'boolean' },
    duration: { type: 'string' },
    summary: { type: 'boolean' },
    limit: { type: 'string' },
    reset: { type: 'boolean' },
    start: { type: 'string' },
    stop: { type: 'boolean' },
  }, INSPECT_USAGE[command]);
  if (!parsed) return 0;
  const { values, positionals } = parsed;
  const vcpu = values.vcpu === undefined ? undefined : integer(values.vcpu, '--vcpu');
  if (command !== 'trace' && (values.start !== undefined || values.stop)) throw argValueError(`--start and --stop apply to node-kvm trace only`);
  if (command !== 'stats' && values.reset) throw argValueError('--reset applies to node-kvm stats only');
  if (command === 'trace' && values['api-socket'] !== undefined) return traceControl(values['api-socket'], positionals, values.start, values.stop === true);
  if (command === 'trace' && (values.start !== undefined || values.stop)) throw argValueError('trace --start and --stop need --api-socket PATH (see node-kvm trace --help)');
  if (command === 'trace') return traceCommand(positionals, { summary: values.summary === true, vcpu, limit: values.limit === undefined ? undefined : integer(values.limit, '--limit') });
  const apiSocket = path.resolve(requireApiSocket(values['api-socket'], command));
  if (command === 'regs') {
    if (positionals.length > 0) throw argValueError(`regs takes no arguments, got '${positionals[0]}'`);
    const result = await callApi(apiSocket, 'regs', vcpu === undefined ? {} : { vcpu });
    process.stdout.write(values.json ? `${JSON.stringify(result, null, 2)}\n` : result.text);
    return 0;
  }
  if (command === 'x') {
    if (positionals.length < 1 || positionals.length > 2) throw argValueError('x takes ADDR [LEN] (see node-kvm x --help)');
    const address = positionals[0]!;
    if (!/^(0x[0-9a-fA-F]{1,16}|\d{1,20})$/.test(address)) throw argValueError(`x: ADDR '${address}' must be a number (decimal, or hex with 0x)`);
    const length = positionals[1] === undefined ? 64 : parseSize(positionals[1], 'x: LEN', { max: MAX_DUMP_BYTES });
    const result = await callApi(apiSocket, 'x', { address, length, physical: values.phys === true, ...(vcpu === undefined ? {} : { vcpu }) });
    if (values.json) {
      console.log(JSON.stringify(result));
      return 0;
    }
    const { hexDump } = await import('../debug/inspect.js');
    process.stdout.write(hexDump(BigInt(result.address), Buffer.from(result.data, 'hex')));
    return 0;
  }
  if (values.reset) {
    if (positionals.length > 0 || values.duration !== undefined) throw argValueError('stats --reset takes no arguments and no --duration');
    const stats = await callApi(apiSocket, 'stats-reset', {});
    console.log(values.json ? JSON.stringify(stats) : stats.enabled ? 'exit statistics reset' : 'the machine does not count exits');
    return 0;
  }
  const durationSeconds = values.duration === undefined ? 1 : Number(values.duration);
  if (!Number.isFinite(durationSeconds) || durationSeconds < 0 || durationSeconds > 3600) throw argValueError(`--duration must be a number of seconds 0..3600, got '${values.duration}'`);
  let stats = await callApi(apiSocket, 'stats', { start: false });
  if (!stats.enabled) {
    // Counting starts now: what a short while shows.
    await callApi(apiSocket, 'stats', { start: true });
    await new Promise((resolve) => setTimeout(resolve, durationSeconds * 1000));
    stats = await callApi(apiSocket, 'stats', { start: false });
  }
  process.stdout.write(values.json ? `${JSON.stringify(stats, null, 2)}\n` : formatExitStats(stats));
  return 0;
}

/** trace --api-socket PATH --start FILE | --stop */
async function traceControl(socket: string, positionals: string[], start: string | undefined, stop: boolean): Promise<number> {
  if (positionals.length > 0) throw argValueError(`trace --api-socket takes --start FILE or --stop, not '${positionals[0]}'`);
  if ((start === undefined) === !stop) throw argValueError('trace --api-socket needs one of --start FILE and --stop');
  const apiSocket = path.resolve(socket);
  if (start !== undefined) {
    if (start === '') throw argValueError('trace --start needs a FILE');
    // Absolute: the machine's working directory is not ours.
    const { path: file } = await callApi(apiSocket, 'trace-start', { path: path.resolve(start) });
    console.log(`tracing exits to ${file}`);
    return 0;
  }
  const { path: file } = await callApi(apiSocket, 'trace-stop', {});
  console.log(file === null ? 'the machine was not tracing its exits' : `exit trace stopped: ${file}`);
  return 0;
}

function integer(text: string, what: string): number {
  const n = Number(text);
  if (!/^(0x[0-9a-fA-F]+|\d+)$/.test(text) || !Number.isSafeInteger(n)) throw argValueError(`${what} must be a non-negative integer, got '${text}'`);
  return n;
}

const micros = (ns: number) => (ns / 1e3).toFixed(1);

/** Exit statistics as tables, the most frequent first (as `perf kvm stat report`). */
export function formatExitStats(stats: ExitStats): string {
  if (!stats.enabled) return 'the machine does not count exits\n';
  const seconds = stats.since === null ? 0 : (Date.now() - stats.since) / 1000;
  const lines = [`exits since counting started ${seconds.toFixed(1)} s ago: ${stats.total.count}, ${micros(stats.total.timeNs)} us handling them in the VMM`];
  const table = (title: string, rows: { name: string; count: number; timeNs: number }[], total: number) => {
    if (rows.length === 0) return;
    lines.push('', `${title.padEnd(28)} ${'count'.padStart(10)} ${'%'.padStart(6)} ${'VMM us'.padStart(12)} ${'avg us'.padStart(8)}`);
    for (const row of rows) {
      lines.push(`${row.name.padEnd(28)} ${String(row.count).padStart(10)} ${(total ? (100 * row.count) / total : 0).toFixed(1).padStart(6)} ${micros(row.timeNs).padStart(12)} ${micros(row.count ? row.timeNs / row.count : 0).padStart(8)}`);
    }
  };
  for (const vcpu of stats.vcpus) {
    lines.push('', `vCPU ${vcpu.vcpu}: ${vcpu.count} exits`);
    table('  reason', vcpu.reasons.map((r) => ({ name: `  ${r.reason}`, ...r })), vcpu.count);
    table('  port I/O', vcpu.io.map((r) => ({ name: `  0x${r.port.toString(16).padStart(4, '0')} ${r.direction}`, ...r })), vcpu.count);
    table('  MMIO (4 KiB page)', vcpu.mmio.map((r) => ({ name: `  ${r.address === null ? 'other pages' : `0x${r.address.toString(16)}`} ${r.direction}`, ...r })), vcpu.count);
  }
  return `${lines.join('\n')}\n`;
}

async function traceCommand(positionals: string[], options: { summary: boolean; vcpu: number | undefined; limit: number | undefined }): Promise<number> {
  if (positionals.length !== 1) throw argValueError('trace takes one FILE (see node-kvm trace --help)');
  const { readExitTrace, formatTraceRecord, summarizeExitTrace } = await import('../debug/exit-trace-reader.js');
  const trace = readExitTrace(positionals[0]!);
  const records = options.vcpu === undefined ? trace.records : trace.records.filter((record) => record.vcpu === options.vcpu);
  if (options.summary) {
    const rows = summarizeExitTrace({ ...trace, records });
    const lines = [`${records.length} exits, ${trace.vcpus} vCPUs, started ${new Date(trace.startMs).toISOString()}`];
    for (const row of rows) lines.push(`${String(row.count).padStart(10)}  ${row.key}`);
    process.stdout.write(`${lines.join('\n')}\n`);
  } else {
    const shown = options.limit === undefined ? records : records.slice(0, options.limit);
    // Written in pieces: a trace of millions of exits is not one string.
    for (let at = 0; at < shown.length; at += 4096) {
      const chunk = shown.slice(at, at + 4096).map(formatTraceRecord).join('\n');
      if (!process.stdout.write(`${chunk}\n`)) await new Promise((resolve) => process.stdout.once('drain', resolve));
    }
  }
  if (trace.trailingBytes > 0) process.stderr.write(`node-kvm: the trace ends with ${trace.trailingBytes} bytes of a partial record (ignored)\n`);
  return 0;
}
