// The last exit of a vCPU, decoded into a discriminated union. For tests and tools: the VMM's
// hot path reads kvm_run in place instead (see kvm-run.ts).
import { ExitReason, IoDirection } from './constants.js';
import { KvmRunOffset as O, type KvmRun } from './kvm-run.js';

/** The last exit of a vCPU decoded from its kvm_run page (vcpu.exit()), a union tagged by `reason`. */
export type VcpuExit =
  | {
      reason: 'io';
      direction: 'in' | 'out';
      port: number;
      size: number;
      count: number;
      /** size * count bytes in the kvm_run mapping: the guest's data (out) or ours to fill (in). */
      data: Uint8Array;
    }
  | { reason: 'mmio'; addr: bigint; isWrite: boolean; len: number; data: Uint8Array }
  | { reason: 'hlt' }
  | { reason: 'shutdown' }
  | { reason: 'fail-entry'; hardwareEntryFailureReason: bigint; cpu: number }
  | { reason: 'internal-error'; suberror: number; data: bigint[] }
  | { reason: 'system-event'; type: number; data: bigint[] }
  | { reason: 'intr' }
  | { reason: 'irq-window-open' }
  | { reason: 'debug'; exception: number; pc: bigint; dr6: bigint; dr7: bigint }
  | { reason: 'dirty-ring-full' }
  | { reason: 'exception'; exception: number; errorCode: number }
  | { reason: 'hypercall'; nr: bigint; args: bigint[] }
  | { reason: 'nmi' }
  | { reason: 'ioapic-eoi'; vector: number }
  | { reason: 'x86-rdmsr' | 'x86-wrmsr'; index: number; data: bigint; msrReason: number }
  | { reason: 'tpr-access'; rip: bigint; isWrite: boolean }
  | { reason: 'set-tpr' }
  | { reason: 'ap-reset-hold' }
  | { reason: 'bus-lock' }
  | { reason: 'notify'; flags: number }
  | { reason: 'unknown'; hardwareExitReason: bigint }
  | { reason: 'other'; exitReason: number };

function u64s(run: KvmRun, offset: number, count: number): bigint[] {
  return Array.from({ length: count }, (_, i) => run.view.getBigUint64(offset + i * 8, true));
}

/** Decodes the exit in `run` (the kvm_run page) as a VcpuExit; `exitReason` defaults to the page's. */
export function decodeExit(run: KvmRun, exitReason: number = run.exitReason): VcpuExit {
  const v = run.view;
  switch (exitReason) {
    case ExitReason.Io: {
      const size = run.ioSize;
      const count = run.ioCount;
      const offset = run.ioDataOffset;
      const length = size * count;
      // The kernel sets data_offset inside the mapping; clamp anyway so a bad value cannot
      // produce a view past it.
      const data = offset + length <= run.bytes.length ? run.bytes.subarray(offset, offset + length) : new Uint8Array(0);
      return {
        reason: 'io',
        direction: run.ioDirection === IoDirection.Out ? 'out' : 'in',
        port: run.ioPort,
        size,
        count,
        data,
      };
    }
    case ExitReason.Mmio: {
      const len = Math.min(run.mmioLen, 8);
      return { reason: 'mmio', addr: run.mmioPhysAddr, isWrite: run.mmioIsWrite, len, data: run.mmioData.subarray(0, len) };
    }
    case ExitReason.Hlt:
      return { reason: 'hlt' };
    case ExitReason.Shutdown:
      return { reason: 'shutdown' };
    case ExitReason.FailEntry:
      return {
        reason: 'fail-entry',
        hardwareEntryFailureReason: v.getBigUint64(O['fail_entry.hardware_entry_failure_reason'], true),
        cpu: v.getUint32(O['fail_entry.cpu'], true),
      };
    case ExitReason.InternalError: {
      const ndata = Math.min(v.getUint32(O['internal.ndata'], true), 16);
      return { reason: 'internal-error', suberror: v.getUint32(O['internal.suberror'], true), data: u64s(run, O['internal.data'], ndata) };
    }
    case ExitReason.SystemEvent: {
      const ndata = Math.min(v.getUint32(O['system_event.ndata'], true), 16);
      return { reason: 'system-event', type: v.getUint32(O['system_event.type'], true), data: u64s(run, O['system_event.data'], ndata) };
    }
    case ExitReason.Intr:
      return { reason: 'intr' };
    case ExitReason.IrqWindowOpen:
      return { reason: 'irq-window-open' };
    case ExitReason.Debug:
      return {
        reason: 'debug',
        exception: v.getUint32(O['debug.arch.exception'], true),
        pc: v.getBigUint64(O['debug.arch.pc'], true),
        dr6: v.getBigUint64(O['debug.arch.dr6'], true),
        dr7: v.getBigUint64(O['debug.arch.dr7'], true),
      };
    case ExitReason.DirtyRingFull:
      return { reason: 'dirty-ring-full' };
    case ExitReason.Exception:
      return { reason: 'exception', exception: v.getUint32(O['ex.exception'], true), errorCode: v.getUint32(O['ex.error_code'], true) };
    case ExitReason.Hypercall:
      return { reason: 'hypercall', nr: v.getBigUint64(O['hypercall.nr'], true), args: u64s(run, O['hypercall.args'], 6) };
    case ExitReason.Nmi:
      return { reason: 'nmi' };
    case ExitReason.IoapicEoi:
      return { reason: 'ioapic-eoi', vector: v.getUint8(O['eoi.vector']) };
    case ExitReason.X86Rdmsr:
    case ExitReason.X86Wrmsr:
      return {
        reason: exitReason === ExitReason.X86Rdmsr ? 'x86-rdmsr' : 'x86-wrmsr',
        index: v.getUint32(O['msr.index'], true),
        data: v.getBigUint64(O['msr.data'], true),
        msrReason: v.getUint32(O['msr.reason'], true),
      };
    case ExitReason.TprAccess:
      return { reason: 'tpr-access', rip: v.getBigUint64(O['tpr_access.rip'], true), isWrite: v.getUint32(O['tpr_access.is_write'], true) !== 0 };
    case ExitReason.SetTpr:
      return { reason: 'set-tpr' };
    case ExitReason.ApResetHold:
      return { reason: 'ap-reset-hold' };
    case ExitReason.X86BusLock:
      return { reason: 'bus-lock' };
    case ExitReason.Notify:
      return { reason: 'notify', flags: v.getUint32(O['notify.flags'], true) };
    case ExitReason.Unknown:
      return { reason: 'unknown', hardwareExitReason: v.getBigUint64(O['hw.hardware_exit_reason'], true) };
    default:
      return { reason: 'other', exitReason };
  }
}
