// The vCPU throttle (lib/vmm/throttle.ts) on its own: a share of every period slept at the ticker
// thread's kicks, slowing a guest in a tight loop at CPL 3; a pause or stop wakes a sleeping vCPU
// at once; the machine's end ends it.
import t from 'tap';
import { machineInternals, type Machine } from '../../lib/vmm/machine.js';
import { noKvm } from '../helpers/kvm.js';
import { MiB, startDirtier } from '../helpers/migration.js';
import { sharedPool } from '../helpers/pool.js';

const pool = noKvm ? undefined : sharedPool(1);
/** Where the dirtier's range starts (guests/dirtier.S): its first quadword holds (pass << 40) | address. */
const RANGE_START = 2 * MiB;

function guestPass(machine: Machine): number {
  const ram = machine.memory.bytes();
  return Number(new DataView(ram.buffer, ram.byteOffset + RANGE_START, 8).getBigUint64(0, true) >> 40n);
}

async function passRate(machine: Machine, windowMs: number): Promise<number> {
  const first = guestPass(machine);
  const started = performance.now();
  await new Promise((resolve) => setTimeout(resolve, windowMs));
  return ((guestPass(machine) - first) * 1000) / (performance.now() - started);
}

async function throttled(machine: Machine) {
  const throttle = machineInternals(machine).vcpuThrottle;
  // Under the test's TypeScript loader the ticker thread takes a second or more to load.
  throttle.prepare();
  while (!throttle.ticking) await new Promise((resolve) => setTimeout(resolve, 10));
  return throttle;
}

t.test('a share of 99 % slows the guest down many times; 0 gives it its pace back', { skip: noKvm }, async (t) => {
  const { machine } = await startDirtier({ rangeBytes: 2 * MiB, config: { pool } });
  t.teardown(() => machine.stop());
  const throttle = await throttled(machine);
  const before = await passRate(machine, 300);
  throttle.set(99);
  t.equal(throttle.percent, 99);
  const slowed = await passRate(machine, 500);
  throttle.set(0);
  const after = await passRate(machine, 300);
  t.ok(slowed < before / 5, `${slowed.toFixed(1)} passes/s at 99 %, ${before.toFixed(1)} before`);
  t.ok(after > before / 2, `${after.toFixed(1)} passes/s once the throttle ended`);
  t.ok(throttle.throttledMs >= 450 && throttle.throttledMs < 2000, `throttled for ${throttle.throttledMs.toFixed(0)} ms`);
});

t.test('a pause does not wait for a sleeping vCPU, and the throttle holds after resume', { skip: noKvm }, async (t) => {
  const { machine } = await startDirtier({ rangeBytes: 2 * MiB, config: { pool } });
  t.teardown(() => machine.stop());
  const throttle = await throttled(machine);
  throttle.set(99);
  // At 99 % each vCPU sleeps 99 ms of every 100: a pause that waited for the sleep would take
  // 50 ms on average.
  const pauses: number[] = [];
  for (let i = 0; i < 5; i++) {
    await new Promise((resolve) => setTimeout(resolve, 30));
    const started = performance.now();
    await machine.pause();
    pauses.push(performance.now() - started);
    const pass = guestPass(machine);
    await new Promise((resolve) => setTimeout(resolve, 20));
    t.equal(guestPass(machine), pass, 'paused: the guest does not run');
    machine.resume();
  }
  pauses.sort((a, b) => a - b);
  t.ok(pauses[2]! < 25, `pause() took ${pauses.map((ms) => ms.toFixed(1)).join(', ')} ms`);
  t.equal(throttle.percent, 99, 'still throttled after resume');
  throttle.set(0);
});

t.test("the machine's end ends the throttle and its ticker", { skip: noKvm }, async (t) => {
  const { machine } = await startDirtier({ rangeBytes: 2 * MiB, config: { pool } });
  const throttle = await throttled(machine);
  throttle.set(50);
  const started = performance.now();
  await machine.stop();
  t.ok(performance.now() - started < 1000, 'stop() did not wait on a sleeping vCPU');
  t.equal(throttle.percent, 0);
  for (let turn = 0; turn < 200 && throttle.ticking; turn++) await new Promise((resolve) => setTimeout(resolve, 10));
  t.equal(throttle.ticking, false, 'the ticker thread ended');
});

t.test('set() takes an integer percentage 0..99', { skip: noKvm }, async (t) => {
  const { machine } = await startDirtier({ config: { pool } });
  t.teardown(() => machine.stop());
  const throttle = machineInternals(machine).vcpuThrottle;
  t.throws(() => throttle.set(100), { code: 'ERR_OUT_OF_RANGE', message: 'percent must be an integer 0..99, got 100' });
  t.throws(() => throttle.set(-1), { code: 'ERR_OUT_OF_RANGE' });
  t.throws(() => throttle.set(12.5), { code: 'ERR_OUT_OF_RANGE' });
  t.throws(() => throttle.set('10' as unknown as number), { code: 'ERR_INVALID_ARG_TYPE' });
  t.equal(throttle.percent, 0);
});
