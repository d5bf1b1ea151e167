// Reads an exit trace (lib/vmm/exit-trace.ts has the format): its records in time order, one line
// per exit, and a summary by reason and port or page.
import { readFileSync } from 'node:fs';
import { argValueError } from '../kvm/errors.js';
import { ExitReason } from '../kvm/constants.js';
import { TRACE_FLAG_RIP, TRACE_HEADER_BYTES, TRACE_MAGIC, TRACE_RECORD_BYTES, TRACE_VERSION, TraceKind } from '../vmm/exit-trace.js';

/** What an exit was, as a trace record says: a port read or write, an MMIO read or write, HLT, an interrupt exit, or another reason. */
export type TraceExitKind = 'io-in' | 'io-out' | 'mmio-read' | 'mmio-write' | 'hlt' | 'intr' | 'other';
const KIND_NAMES: TraceExitKind[] = ['other', 'io-in', 'io-out', 'mmio-read', 'mmio-write', 'hlt', 'intr'];
const REASON_NAMES = new Map<number, string>(Object.entries(ExitReason).map(([name, number]) => [number, name]));

/** One exit of a trace: when, on which vCPU, why, at which RIP, and the port or address and data. */
export interface TraceRecord {
  /** Nanoseconds since the trace started. */
  timeNs: number;
  vcpu: number;
  kind: TraceExitKind;
  /** The KVM exit reason (KVM_EXIT_*). */
  exitReason: number;
  rip: bigint;
  /** The port (I/O) or guest-physical address (MMIO); 0 for other exits. */
  address: bigint;
  /** Bytes per access (I/O, MMIO). */
  size: number;
  /** Repetitions of a string I/O instruction (1 for a plain one). */
  count: number;
  /** The first access's data: `size` bytes. */
  data: Buffer;
}

/** An exit trace file read back: its header (format version, vCPUs, start time) and every record in order. */
export interface ExitTrace {
  version: number;
  vcpus: number;
  /** When tracing started, ms since the epoch. */
  startMs: number;
  ripRecorded: boolean;
  /** Every exit, in time order. */
  records: TraceRecord[];
  /** Bytes at the end that do not make a whole record (a machine that did not end cleanly). */
  trailingBytes: number;
}

/** Parses a trace file's bytes. */
export function parseExitTrace(bytes: Uint8Array): ExitTrace {
  const buffer = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (buffer.length < TRACE_HEADER_BYTES || buffer.toString('latin1', 0, 8) !== TRACE_MAGIC) throw argValueError('not an exit trace (no NKVMTRCE header)');
  const version = buffer.readUInt16LE(8);
  const recordBytes = buffer.readUInt16LE(10);
  if (version !== TRACE_VERSION || recordBytes !== TRACE_RECORD_BYTES) throw argValueError(`exit trace version ${version} (record ${recordBytes} bytes) is not supported: this reader knows version ${TRACE_VERSION}`);
  const body = buffer.length - TRACE_HEADER_BYTES;
  const records: TraceRecord[] = [];
  for (let at = TRACE_HEADER_BYTES; at + TRACE_RECORD_BYTES <= buffer.length; at += TRACE_RECORD_BYTES) {
    const size = buffer[at + 35]!;
    records.push({
      timeNs: buffer.readDoubleLE(at),
      rip: buffer.readBigUInt64LE(at + 8),
      address: buffer.readBigUInt64LE(at + 16),
      data: Buffer.from(buffer.subarray(at + 24, at + 24 + size)),
      vcpu: buffer.readUInt16LE(at + 32),
      kind: KIND_NAMES[buffer[at + 34]!] ?? 'other',
      size,
      count: buffer.readUInt16LE(at + 36),
      exitReason: buffer.readUInt16LE(at + 38),
    });
  }
  // Each vCPU writes runs of its own records: stable, so one vCPU's order stays as written.
  records.sort((a, b) => a.timeNs - b.timeNs);
  return {
    version,
    vcpus: buffer.readUInt16LE(12),
    startMs: buffer.readDoubleLE(16),
    ripRecorded: (buffer.readUInt16LE(14) & TRACE_FLAG_RIP) !== 0,
    records,
    trailingBytes: body % TRACE_RECORD_BYTES,
  };
}

/** Reads the exit trace file at `path` (written by MachineConfig.traceExits or `node-kvm run --trace-exits`). */
export function readExitTrace(path: string): ExitTrace {
  return parseExitTrace(readFileSync(path));
}

function value(data: Buffer): string {
  if (data.length === 0) return '';
  let n = 0n;
  for (let i = data.length - 1; i >= 0; i--) n = (n << 8n) | BigInt(data[i]!);
  return `0x${n.toString(16).padStart(data.length * 2, '0')}`;
}

/** One line: time, vCPU, kind, RIP, then the access (port or address, size, data). */
export function formatTraceRecord(record: TraceRecord): string {
  const time = (record.timeNs / 1e3).toFixed(3).padStart(12);
  const head = `${time} us  vcpu${record.vcpu}  ${record.kind.padEnd(10)} rip=0x${record.rip.toString(16).padStart(16, '0')}`;
  switch (record.kind) {
    case 'io-in':
    case 'io-out':
      return `${head}  port=0x${record.address.toString(16).padStart(4, '0')} size=${record.size} data=${value(record.data)}${record.count > 1 ? ` count=${record.count}` : ''}`;
    case 'mmio-read':
    case 'mmio-write':
      return `${head}  addr=0x${record.address.toString(16)} size=${record.size} data=${value(record.data)}`;
    case 'other':
      return `${head}  ${REASON_NAMES.get(record.exitReason) ?? `exit ${record.exitReason}`}`;
    default:
      return head;
  }
}

/** One line of summarizeExitTrace(): exits of one kind at one port, page or reason, how many and their share. */
export interface TraceSummaryRow {
  /** 'io-out 0x3f8', 'mmio-write 0xd0000000' (a 4 KiB page), 'hlt', 'other Shutdown'... */
  key: string;
  count: number;
}

/** Counts by kind and port (I/O) or 4 KiB page (MMIO), most frequent first. */
export function summarizeExitTrace(trace: ExitTrace): TraceSummaryRow[] {
  const counts = new Map<string, number>();
  for (const record of trace.records) {
    let key: string = record.kind;
    if (record.kind === 'io-in' || record.kind === 'io-out') key += ` port 0x${record.address.toString(16).padStart(4, '0')}`;
    else if (record.kind === 'mmio-read' || record.kind === 'mmio-write') key += ` page 0x${(record.address & ~0xfffn).toString(16)}`;
    else if (record.kind === 'other') key += ` ${REASON_NAMES.get(record.exitReason) ?? record.exitReason}`;
    counts.set(key, (counts.get(key) ?? 0) + 1);
  }
  return [...counts].map(([key, count]) => ({ key, count })).sort((a, b) => b.count - a.count || a.key.localeCompare(b.key));
}
