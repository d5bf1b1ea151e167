// The dirtier guests (used by migration tests): each pass checks the previous pass's pattern and
// writes its own, so a page that loses a write is reported on the next pass.
import t, { type Test } from 'tap';
import { GUEST_PARAMS_ADDR } from '../../lib/boot/index.js';
import { bootGuest, elfGuest, runGuest } from '../helpers/boot-runner.js';
import { noKvm } from '../helpers/kvm.js';

const MiB = 1 << 20;
const RANGE_START = 2 * MiB;
/** What pass `pass` leaves in the quadword at `addr`. */
const pattern = (pass: number, addr: number) => (BigInt(pass) << 40n) | BigInt(addr);

/** Boots `name` with its parameters at GUEST_PARAMS_ADDR: pass limit (0 = forever) and range bytes (0 = default). */
function dirtier(t: Test, name: string, passes: number, rangeBytes = 0, memoryBytes = 64 * MiB) {
  const guest = bootGuest(elfGuest(name), {
    memoryBytes,
    setup: (memory) => {
      const params = new DataView(memory.buffer, GUEST_PARAMS_ADDR, 8);
      params.setUint32(0, passes, true);
      params.setUint32(4, rangeBytes, true);
    },
  });
  t.teardown(() => guest.close());
  const quad = (addr: number) => new DataView(guest.memory.buffer).getBigUint64(addr, true);
  const setQuad = (addr: number, value: bigint) => new DataView(guest.memory.buffer).setBigUint64(addr, value, true);
  return { guest, quad, setQuad };
}

for (const [name, defaultRange] of [['dirtier', MiB], ['dirtier-user', 16 * MiB]] as const) {
  t.test(`${name}: two passes over its default ${defaultRange / MiB} MiB, then exit 0`, { skip: noKvm }, async (t) => {
    const { guest, quad } = dirtier(t, name, 2);
    t.same(runGuest(guest.vcpu), { output: 'pass 1 ok\npass 2 ok\n', end: { reason: 'debug-exit', code: 0 } });
    const end = RANGE_START + defaultRange;
    for (const addr of [RANGE_START, RANGE_START + 0x12340, end - 8]) t.equal(quad(addr), pattern(2, addr), `pass 2's value at 0x${addr.toString(16)}`);
    t.equal(quad(RANGE_START - 8), 0n, 'nothing written below the range');
    t.equal(quad(end), 0n, 'nothing written past the range');
  });
}

t.test('dirtier-user: a lost write (a page zeroed between passes) is reported with its address', { skip: noKvm }, async (t) => {
  const { guest, setQuad } = dirtier(t, 'dirtier-user', 3);
  const lost = RANGE_START + 0x123450;
  let zeroed = false;
  const run = runGuest(guest.vcpu, {
    onOutput: (output) => {
      if (!zeroed && output === 'pass 1 ok\n') {
        setQuad(lost, 0n);
        zeroed = true;
      }
    },
  });
  t.same(run, { output: 'pass 1 ok\npass 2 BAD at 0x0000000000323450\n', end: { reason: 'debug-exit', code: 0x7f } });
});

t.test('dirtier: a stale page (an older pass\'s value) is reported too', { skip: noKvm }, async (t) => {
  const { guest, setQuad } = dirtier(t, 'dirtier', 4, 64 * 1024);
  const stale = RANGE_START + 0xfff8;
  let restored = false;
  const run = runGuest(guest.vcpu, {
    onOutput: (output) => {
      if (!restored && output.endsWith('pass 2 ok\n')) {
        setQuad(stale, pattern(1, stale));
        restored = true;
      }
    },
  });
  t.same(run, { output: 'pass 1 ok\npass 2 ok\npass 3 BAD at 0x000000000020fff8\n', end: { reason: 'debug-exit', code: 0x7f } });
});

t.test('dirtier: the host sets the range; with no pass limit it keeps going', { skip: noKvm }, async (t) => {
  const rangeBytes = 4096 + 8 + 3; // rounded down to 8
  const { guest, quad } = dirtier(t, 'dirtier', 0, rangeBytes);
  const run = runGuest(guest.vcpu, { stopWhen: (output) => output.endsWith('pass 5 ok\n') });
  t.same(run, { output: 'pass 1 ok\npass 2 ok\npass 3 ok\npass 4 ok\npass 5 ok\n', end: { reason: 'stopped' } });
  t.equal(quad(RANGE_START + 4096), pattern(5, RANGE_START + 4096), 'the last quadword of the range');
  t.equal(quad(RANGE_START + 4096 + 8), 0n, 'the range ends there');
});

t.test('dirtier-user: a range beyond RAM is refused before any pass', { skip: noKvm }, async (t) => {
  const { guest, quad } = dirtier(t, 'dirtier-user', 1, 63 * MiB, 64 * MiB);
  t.same(runGuest(guest.vcpu), { output: 'dirtier BAD: range beyond RAM\n', end: { reason: 'debug-exit', code: 0x7e } });
  t.equal(quad(RANGE_START), 0n, 'nothing was written');
});
