// The probe of what guest debugging the host does (lib/debug/host-debug-support.ts), on this host:
// kvm_pvm fails on `int3` in guest kernel code (an emulation failure: the machine ends with
// internal-error) and never triggers data breakpoints (the watched write goes through, the guest
// reaches its HLT), so both answers are "no"; a hardware execution breakpoint, which it does serve, is
// seen by the same probe machinery as a "yes"; a guest that never stops is cut off by the time bound.
import t from 'tap';
import { SOFTWARE_BREAKPOINT_PROBE, WATCHPOINT_PROBE, hostDebugSupport, probeHostDebugSupport, runDebugProbe } from '../../lib/debug/host-debug-support.js';
import { noKvm } from '../helpers/kvm.js';
import { sharedPool } from '../helpers/pool.js';

const skip = noKvm;
const pool = noKvm ? undefined : sharedPool(1);
const DR7_G0 = 1n << 1n;

t.test('this host: int3 is an emulation failure, a watched write goes through to the HLT', { skip }, async (t) => {
  t.same(await runDebugProbe(SOFTWARE_BREAKPOINT_PROBE, { pool, timeoutMs: 5000 }), { supported: false, end: 'internal-error' });
  t.same(await runDebugProbe(WATCHPOINT_PROBE, { pool, timeoutMs: 5000 }), { supported: false, end: 'hlt' });
});

t.test('this host: no software breakpoints, no watchpoints; asked once per process', { skip }, async (t) => {
  t.same(await probeHostDebugSupport({ pool }), { softwareBreakpoints: false, watchpoints: false });
  const first = hostDebugSupport({ pool });
  t.equal(hostDebugSupport(), first, 'the second caller gets the first probe');
  t.same(await first, { softwareBreakpoints: false, watchpoints: false });
});

t.test('the probe sees a debug exit the host does make: an execution breakpoint at the guest\'s second instruction', { skip }, async (t) => {
  // nop; hlt, with DR0 on the hlt.
  const stops: { exception: number; pc: bigint }[] = [];
  const outcome = await runDebugProbe({
    image: Uint8Array.of(0x90, 0xf4),
    guestDebug: { hardwareBreakpoints: true, debugreg: [0x100001n, 0n, 0n, 0n, 0n, 0n, 0n, DR7_G0] },
    expected: (stop) => {
      stops.push({ exception: stop.exception, pc: stop.pc });
      return (stop.dr6 & 1n) !== 0n;
    },
  }, { pool, timeoutMs: 5000 });
  t.same(outcome, { supported: true, end: 'debug' });
  t.same(stops, [{ exception: 1, pc: 0x100001n }], '#DB at the hlt');
});

t.test('a probe guest that never stops is a "no" once its time is up', { skip }, async (t) => {
  const started = Date.now();
  // jmp . (a CPL-0 loop the host emulates) with software breakpoints on: no debug exit ever comes.
  const outcome = await runDebugProbe({ image: Uint8Array.of(0xeb, 0xfe), guestDebug: { softwareBreakpoints: true }, expected: () => true }, { pool, timeoutMs: 300 });
  t.same(outcome, { supported: false, end: 'timeout' });
  const elapsed = Date.now() - started;
  t.ok(elapsed >= 300 && elapsed < 5000, `stopped after its time bound (${elapsed} ms)`);
});
