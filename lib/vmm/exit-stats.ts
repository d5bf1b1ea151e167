// Exit statistics, like `perf kvm stat`: per vCPU, how many exits of each kind and how long the
// VMM spent handling them. Each vCPU thread counts into a SharedArrayBuffer of its own with plain
// (non-atomic) writes, one writer per buffer; the main thread reads it whenever asked (a figure
// read mid-update is off by one exit at most). Counting is off until asked for: the vCPU loop then
// switches to a counting variant (vcpu-worker.ts), so a machine nobody watches pays nothing.
import { ExitReason, IoDirection } from '../kvm/constants.js';

const PORTS = 0x10000;
/** MMIO is counted by 4 KiB page; a guest touching more pages than this counts the rest as one. */
export const MMIO_PAGE_SLOTS = 64;
const REASONS = 64;

// Float64Array indexes: counts and milliseconds, each as an f64 (exact to 2^53 exits).
const IO_COUNT = 0; // [port * 2 + direction]
const IO_TIME = IO_COUNT + PORTS * 2;
const REASON_COUNT = IO_TIME + PORTS * 2; // [KVM exit reason]
const REASON_TIME = REASON_COUNT + REASONS;
const MMIO_KEY = REASON_TIME + REASONS; // page * 2 + isWrite, plus 1 (0: a free slot)
const MMIO_COUNT = MMIO_KEY + MMIO_PAGE_SLOTS + 1; // the last slot: every other page
const MMIO_TIME = MMIO_COUNT + MMIO_PAGE_SLOTS + 1;
/** When counting started (the main thread's Date.now()). */
const STARTED = MMIO_TIME + MMIO_PAGE_SLOTS + 1;
const SLOTS = STARTED + 1;

export function createExitStatsBuffer(): SharedArrayBuffer {
  const buffer = new SharedArrayBuffer(SLOTS * 8);
  new Float64Array(buffer)[STARTED] = Date.now();
  return buffer;
}

/** The vCPU thread's side: one call per exit, `ms` the time spent handling it. */
export function countExit(stats: Float64Array, reason: number, run: DataView, ms: number): void {
  if (reason === ExitReason.Io) {
    const slot = run.getUint16(34, true) * 2 + run.getUint8(32);
    stats[IO_COUNT + slot]! += 1;
    stats[IO_TIME + slot]! += ms;
  } else if (reason === ExitReason.Mmio) {
    const key = Math.floor(run.getUint32(32, true) / 4096 + run.getUint32(36, true) * 0x100000) * 2 + run.getUint8(52) + 1;
    let slot = key % MMIO_PAGE_SLOTS;
    for (let probes = 0; ; probes++, slot = (slot + 1) % MMIO_PAGE_SLOTS) {
      if (probes === MMIO_PAGE_SLOTS) {
        slot = MMIO_PAGE_SLOTS;
        break;
      }
      if (stats[MMIO_KEY + slot] === key) break;
      if (stats[MMIO_KEY + slot] === 0) {
        stats[MMIO_KEY + slot] = key;
        break;
      }
    }
    stats[MMIO_COUNT + slot]! += 1;
    stats[MMIO_TIME + slot]! += ms;
  }
  const index = reason < REASONS ? reason : 0;
  stats[REASON_COUNT + index]! += 1;
  stats[REASON_TIME + index]! += ms;
}

/** How many exits, and the time the VMM spent on them. */
export interface ExitCount {
  count: number;
  /** Time the VMM spent handling these exits (from KVM_RUN's return to the next KVM_RUN), in ns. */
  timeNs: number;
}

/** One vCPU's exits: in all, and by reason and by port or MMIO page. */
export interface VcpuExitStats extends ExitCount {
  vcpu: number;
  /** By KVM exit reason ('io', 'mmio', 'hlt', 'intr' (kicks and signals), 'debug', ...), most frequent first. */
  reasons: (ExitCount & { reason: string })[];
  /** Port I/O by port and direction, most frequent first. */
  io: (ExitCount & { port: number; direction: 'in' | 'out' })[];
  /** MMIO by 4 KiB page (`address` its first byte; null: pages past the table's room), most frequent first. */
  mmio: (ExitCount & { address: number | null; direction: 'read' | 'write' | 'any' })[];
}

/** A machine's exit statistics (machine.exitStats()): whether it counts, since when, and per vCPU. */
export interface ExitStats {
  /** Whether the machine counts exits (MachineConfig.exitStats, or startExitStats()). */
  enabled: boolean;
  /** When counting started (ms since the epoch); null when it never did. */
  since: number | null;
  vcpus: VcpuExitStats[];
  /** Every vCPU's exits summed, by reason. */
  total: ExitCount & { reasons: (ExitCount & { reason: string })[] };
}

const REASON_NAMES = new Map<number, string>(Object.entries(ExitReason).map(([name, number]) => [number, name.replace(/[A-Z]/g, (c, i: number) => (i ? '-' : '') + c.toLowerCase())]));

/** Reads the buffers of every vCPU (null: a vCPU that counts nothing). */
export function readExitStats(buffers: (SharedArrayBuffer | null)[]): ExitStats {
  const ns = (ms: number) => Math.round(ms * 1e6);
  const byCount = <T extends ExitCount>(list: T[]) => list.sort((a, b) => b.count - a.count);
  const totals = new Map<string, ExitCount>();
  let since: number | null = null;
  const vcpus = buffers.map((buffer, vcpu): VcpuExitStats => {
    const empty: VcpuExitStats = { vcpu, count: 0, timeNs: 0, reasons: [], io: [], mmio: [] };
    if (!buffer) return empty;
    const stats = new Float64Array(buffer);
    since = since === null ? stats[STARTED]! : Math.min(since, stats[STARTED]!);
    for (let reason = 0; reason < REASONS; reason++) {
      const count = stats[REASON_COUNT + reason]!;
      if (count === 0) continue;
      const name = REASON_NAMES.get(reason) ?? `exit-${reason}`;
      const timeNs = ns(stats[REASON_TIME + reason]!);
      empty.reasons.push({ reason: name, count, timeNs });
      empty.count += count;
      empty.timeNs += timeNs;
      const total = totals.get(name) ?? { count: 0, timeNs: 0 };
      total.count += count;
      total.timeNs += timeNs;
      totals.set(name, total);
    }
    for (let slot = 0; slot < PORTS * 2; slot++) {
      const count = stats[IO_COUNT + slot]!;
      if (count !== 0) empty.io.push({ port: slot >> 1, direction: (slot & 1) === IoDirection.Out ? 'out' : 'in', count, timeNs: ns(stats[IO_TIME + slot]!) });
    }
    for (let slot = 0; slot <= MMIO_PAGE_SLOTS; slot++) {
      const count = stats[MMIO_COUNT + slot]!;
      if (count === 0) continue;
      const key = stats[MMIO_KEY + slot]! - 1;
      const address = slot === MMIO_PAGE_SLOTS ? null : Math.floor(key / 2) * 4096;
      empty.mmio.push({ address, direction: slot === MMIO_PAGE_SLOTS ? 'any' : key % 2 === 0 ? 'read' : 'write', count, timeNs: ns(stats[MMIO_TIME + slot]!) });
    }
    byCount(empty.reasons);
    byCount(empty.io);
    byCount(empty.mmio);
    return empty;
  });
  const reasons = byCount([...totals].map(([reason, total]) => ({ reason, ...total })));
  return {
    enabled: buffers.some((buffer) => buffer !== null),
    since,
    vcpus,
    total: { count: reasons.reduce((sum, r) => sum + r.count, 0), timeNs: reasons.reduce((sum, r) => sum + r.timeNs, 0), reasons },
  };
}
