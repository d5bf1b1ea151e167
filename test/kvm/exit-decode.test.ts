// decodeExit over a synthetic kvm_run page: every exit kind the union names, with the fields
// written where the kernel writes them (offsets from KvmRunOffset, checked by layout.test.ts).
import t from 'tap';
import { ExitReason, KvmRun, KvmRunOffset as O, decodeExit } from '../../lib/index.js';

const PAGE = 4096;

function page(reason: number, fill: (view: DataView) => void = () => {}): KvmRun {
  const run = new KvmRun(new ArrayBuffer(3 * PAGE));
  run.view.setUint32(O.exit_reason, reason, true);
  fill(run.view);
  return run;
}

t.test('io: direction, port, size, count and a view of the data in the PIO page', async (t) => {
  const run = page(ExitReason.Io, (v) => {
    v.setUint8(O['io.direction'], 1);
    v.setUint8(O['io.size'], 2);
    v.setUint16(O['io.port'], 0x1f0, true);
    v.setUint32(O['io.count'], 3, true);
    v.setBigUint64(O['io.data_offset'], BigInt(PAGE), true);
    for (let i = 0; i < 6; i++) v.setUint8(PAGE + i, 0x10 + i);
  });
  const exit = decodeExit(run);
  t.same(exit, { reason: 'io', direction: 'out', port: 0x1f0, size: 2, count: 3, data: new Uint8Array([0x10, 0x11, 0x12, 0x13, 0x14, 0x15]) });
  // The data is a view: filling it answers an IN in place.
  if (exit.reason !== 'io') throw new Error('expected io');
  exit.data[0] = 0xff;
  t.equal(run.bytes[PAGE], 0xff);
  t.equal(run.ioDirection, 1);
});

t.test('io with a data offset past the mapping yields no bytes rather than a wild view', async (t) => {
  const run = page(ExitReason.Io, (v) => {
    v.setUint8(O['io.size'], 4);
    v.setUint32(O['io.count'], 1, true);
    v.setBigUint64(O['io.data_offset'], BigInt(3 * PAGE - 2), true);
  });
  const exit = decodeExit(run);
  t.equal(exit.reason, 'io');
  t.equal(exit.reason === 'io' && exit.direction, 'in');
  t.equal(exit.reason === 'io' && exit.data.length, 0);
});

t.test('mmio: address, direction and the bytes, clamped to 8', async (t) => {
  const run = page(ExitReason.Mmio, (v) => {
    v.setBigUint64(O['mmio.phys_addr'], 0xd000_0000n, true);
    v.setUint32(O['mmio.len'], 4, true);
    v.setUint8(O['mmio.is_write'], 1);
    v.setUint32(O['mmio.data'], 0xdeadbeef, true);
  });
  t.same(decodeExit(run), { reason: 'mmio', addr: 0xd000_0000n, isWrite: true, len: 4, data: new Uint8Array([0xef, 0xbe, 0xad, 0xde]) });
  const wide = page(ExitReason.Mmio, (v) => v.setUint32(O['mmio.len'], 4000, true));
  const exit = decodeExit(wide);
  t.equal(exit.reason === 'mmio' && exit.len, 8);
  t.equal(wide.mmioIsWrite, false);
});

t.test('exits without details', async (t) => {
  const simple: [number, string][] = [
    [ExitReason.Hlt, 'hlt'], [ExitReason.Shutdown, 'shutdown'], [ExitReason.Intr, 'intr'],
    [ExitReason.IrqWindowOpen, 'irq-window-open'], [ExitReason.DirtyRingFull, 'dirty-ring-full'],
    [ExitReason.Nmi, 'nmi'], [ExitReason.SetTpr, 'set-tpr'], [ExitReason.ApResetHold, 'ap-reset-hold'],
    [ExitReason.X86BusLock, 'bus-lock'],
  ];
  for (const [reason, name] of simple) t.same(decodeExit(page(reason)), { reason: name }, name);
  t.same(decodeExit(page(99)), { reason: 'other', exitReason: 99 });
});

t.test('exits with details', async (t) => {
  t.same(decodeExit(page(ExitReason.FailEntry, (v) => {
    v.setBigUint64(O['fail_entry.hardware_entry_failure_reason'], 0x21n, true);
    v.setUint32(O['fail_entry.cpu'], 3, true);
  })), { reason: 'fail-entry', hardwareEntryFailureReason: 0x21n, cpu: 3 });

  t.same(decodeExit(page(ExitReason.InternalError, (v) => {
    v.setUint32(O['internal.suberror'], 1, true);
    v.setUint32(O['internal.ndata'], 2, true);
    v.setBigUint64(O['internal.data'], 7n, true);
    v.setBigUint64(O['internal.data'] + 8, 8n, true);
  })), { reason: 'internal-error', suberror: 1, data: [7n, 8n] });

  // ndata beyond the array is clamped to its 16 entries.
  const clamped = decodeExit(page(ExitReason.SystemEvent, (v) => {
    v.setUint32(O['system_event.type'], 2, true);
    v.setUint32(O['system_event.ndata'], 1000, true);
  }));
  t.equal(clamped.reason === 'system-event' && clamped.type, 2);
  t.equal(clamped.reason === 'system-event' && clamped.data.length, 16);

  t.same(decodeExit(page(ExitReason.Debug, (v) => {
    v.setUint32(O['debug.arch.exception'], 1, true);
    v.setBigUint64(O['debug.arch.pc'], 0x7c02n, true);
    v.setBigUint64(O['debug.arch.dr6'], 0xffff4ff0n, true);
    v.setBigUint64(O['debug.arch.dr7'], 0x400n, true);
  })), { reason: 'debug', exception: 1, pc: 0x7c02n, dr6: 0xffff4ff0n, dr7: 0x400n });

  t.same(decodeExit(page(ExitReason.Exception, (v) => {
    v.setUint32(O['ex.exception'], 13, true);
    v.setUint32(O['ex.error_code'], 0x18, true);
  })), { reason: 'exception', exception: 13, errorCode: 0x18 });

  t.same(decodeExit(page(ExitReason.Hypercall, (v) => {
    v.setBigUint64(O['hypercall.nr'], 12n, true);
    v.setBigUint64(O['hypercall.args'] + 8, 5n, true);
  })), { reason: 'hypercall', nr: 12n, args: [0n, 5n, 0n, 0n, 0n, 0n] });

  t.same(decodeExit(page(ExitReason.IoapicEoi, (v) => v.setUint8(O['eoi.vector'], 0x30))), { reason: 'ioapic-eoi', vector: 0x30 });

  for (const [reason, name] of [[ExitReason.X86Rdmsr, 'x86-rdmsr'], [ExitReason.X86Wrmsr, 'x86-wrmsr']] as const) {
    t.same(decodeExit(page(reason, (v) => {
      v.setUint32(O['msr.index'], 0xc0000080, true);
      v.setBigUint64(O['msr.data'], 0x500n, true);
      v.setUint32(O['msr.reason'], 1, true);
    })), { reason: name, index: 0xc0000080, data: 0x500n, msrReason: 1 });
  }

  t.same(decodeExit(page(ExitReason.TprAccess, (v) => {
    v.setBigUint64(O['tpr_access.rip'], 0x1000n, true);
    v.setUint32(O['tpr_access.is_write'], 1, true);
  })), { reason: 'tpr-access', rip: 0x1000n, isWrite: true });

  t.same(decodeExit(page(ExitReason.Notify, (v) => v.setUint32(O['notify.flags'], 1, true))), { reason: 'notify', flags: 1 });
  t.same(decodeExit(page(ExitReason.Unknown, (v) => v.setBigUint64(O['hw.hardware_exit_reason'], 0x30n, true))), { reason: 'unknown', hardwareExitReason: 0x30n });
});

t.test('KvmRun accessors read and write the page in place', async (t) => {
  const run = page(ExitReason.Hlt, (v) => {
    v.setUint8(O.ready_for_interrupt_injection, 1);
    v.setUint8(O.if_flag, 1);
    v.setBigUint64(O.cr8, 5n, true);
    v.setBigUint64(O.apic_base, 0xfee00900n, true);
  });
  t.equal(run.exitReason, ExitReason.Hlt);
  t.equal(run.readyForInterruptInjection, 1);
  t.equal(run.ifFlag, 1);
  t.equal(run.cr8, 5n);
  t.equal(run.apicBase, 0xfee00900n);
  run.immediateExit = 1;
  run.requestInterruptWindow = 1;
  t.equal(run.view.getUint8(O.immediate_exit), 1);
  t.equal(run.immediateExit, 1);
  t.equal(run.requestInterruptWindow, 1);
  run.immediateExit = 0;
  t.equal(run.view.getUint8(O.immediate_exit), 0);
});
