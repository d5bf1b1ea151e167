// The migration source's rehearsal (lib/migration/source-warm-up.ts): once per process, over
// made-up pages and an in-memory connection, started a little after the first machine the process
// boots starts (afterNextMachineStart(), where lib/migration registers it as it loads).
import t from 'tap';
import { Machine } from '../../lib/index.js';
import { warmUpMigrationSource, warmUpStateSaving } from '../../lib/migration/source-warm-up.js';
import { newMigrationStats } from '../../lib/migration/stats.js';
import { afterNextMachineStart, machineInternals } from '../../lib/vmm/machine.js';
import { guestImage, noKvm } from '../helpers/kvm.js';
import { sharedPool } from '../helpers/pool.js';

const pool = noKvm ? undefined : sharedPool();
const quiet = { serial: { output: null }, log: () => {} };
const activeHandles = () => (process as unknown as { _getActiveHandles(): unknown[] })._getActiveHandles().length;

/** A promise that settles when `work` registered with afterNextMachineStart() has run. */
function registered(name: string, calls: string[]): Promise<void> {
  return new Promise((resolve) => afterNextMachineStart(() => {
    calls.push(name);
    resolve();
  }));
}

t.test("a migration's first statistics: every count and time at zero, the machine's size and dirty log mode", async (t) => {
  const stats = newMigrationStats(256 << 20, 'ring');
  t.same(stats, {
    phase: 'setup', totalTimeMs: 0, setupTimeMs: 0, downtimeMs: 0, expectedDowntimeMs: 0, bytesTransferred: 0, pagesTransferred: 0,
    zeroPagesSkipped: 0, pagesResent: 0, iterations: 0, dirtyPagesRate: 0, throughputBytesPerSec: 0, remainingPages: 0,
    memoryBytes: 256 << 20, dirtyLogMode: 'ring', cpuThrottlePercentage: 0, throttledMs: 0,
  });
  t.not(newMigrationStats(4096, 'bitmap'), newMigrationStats(4096, 'bitmap'), 'a new object each time');
});

t.test('rehearses every step once per process and leaves no handle behind', async (t) => {
  const handles = activeHandles();
  const first = warmUpMigrationSource();
  t.equal(warmUpMigrationSource(), first, "a second call gets the first call's promise");
  t.equal(await first, true, 'the handshake, the harvests, the page encoders and the replies all ran through');
  t.equal(activeHandles(), handles, 'no socket, no timer left');
});

t.test('cut short by a migration: the rehearsal stops at its next slice and resolves false', async (t) => {
  // A module instance of its own, whose rehearsal has not run yet (the one above has).
  const fresh = (await import('../../lib/migration/source-warm-up.js?cut-short')) as typeof import('../../lib/migration/source-warm-up.js');
  const handles = activeHandles();
  const warming = fresh.warmUpMigrationSource();
  fresh.cutSourceWarmUpShort();
  t.equal(await warming, false, 'resolves false, rejects nothing');
  t.equal(fresh.warmUpMigrationSource(), warming, 'and is not run again');
  t.equal(activeHandles(), handles, 'no socket, no timer left');
});

t.test('work runs once, a little after the next machine start() starts; a throw stops nothing', { skip: noKvm }, async (t) => {
  const calls: string[] = [];
  const firstRan = registered('first', calls);
  const a = await Machine.create({ image: guestImage('spin'), memoryBytes: 1 << 20, pool, ...quiet });
  const b = await Machine.create({ image: guestImage('spin'), memoryBytes: 1 << 20, pool, ...quiet });
  try {
    t.same(calls, [], 'nothing runs while no machine has started');
    t.equal(await warmUpStateSaving(b), false, 'a machine not yet running saves nothing');
    a.start();
    await firstRan;
    t.same(calls, ['first']);
    const events: string[] = [];
    for (const name of ['paused', 'resumed']) a.on(name, () => events.push(name));
    t.equal(await warmUpStateSaving(a), true, "a running machine's state is saved (its vCPU kicked) and encoded, then its stop rehearsed");
    t.equal(a.state, 'running', 'and it runs on');
    t.same(events, [], 'the stop was one its owner does not see: no event');
    afterNextMachineStart(() => {
      calls.push('throws');
      throw new Error('a failing rehearsal');
    });
    const secondRan = registered('second', calls);
    b.start();
    await secondRan;
    t.same(calls, ['first', 'throws', 'second'], 'each once, in order, past the one that threw');
    t.equal(b.state, 'running');
  } finally {
    await Promise.all([a.stop(), b.stop()]);
  }
});

t.test("the rehearsed stop: each vCPU of two stopped and saved, unseen; a machine not running is left as it is", { skip: noKvm }, async (t) => {
  const machine = await Machine.create({ image: guestImage('spin'), memoryBytes: 1 << 20, vcpus: 2, irqchip: true, pool, ...quiet });
  const events: string[] = [];
  for (const name of ['paused', 'resumed']) machine.on(name, () => events.push(name));
  try {
    t.equal(await machineInternals(machine).warmUpPause(), false, 'not started: nothing stopped');
    t.equal(machine.state, 'created');
    machine.start();
    t.equal(await machineInternals(machine).warmUpPause(), true, 'both vCPUs answered');
    t.equal(machine.state, 'running', 'and the guest runs on');
    t.same(events, [], 'no event');
    await machine.pause();
    t.equal(await machineInternals(machine).warmUpPause(), false, 'paused by its owner: nothing stopped');
    t.equal(machine.state, 'paused', 'and it stays paused');
    machine.resume();
    t.same(events, ['paused', 'resumed'], "only the owner's pause and resume were seen");
  } finally {
    await machine.stop();
  }
});
