// When auto-converge steps the throttle up, and how far (lib/migration/auto-converge.ts), over a
// stand-in for the VMM's throttle.
import t from 'tap';
import { AutoConverge, checkAutoConverge, type ThrottleControl } from '../../lib/migration/auto-converge.js';
import type { MigrationStats } from '../../lib/migration/types.js';

function fakeThrottle(): ThrottleControl & { prepared: number; shares: number[] } {
  let percent = 0;
  return {
    prepared: 0,
    shares: [],
    prepare() {
      this.prepared++;
    },
    set(share: number) {
      percent = share;
      this.shares.push(share);
    },
    get percent() {
      return percent;
    },
    throttledMs: 12.5,
  };
}

const MB = 1_000_000;

t.test('two dirty rounds per step: 20, 30, ... up to 99, as QEMU does', async (t) => {
  const throttle = fakeThrottle();
  const converge = new AutoConverge(checkAutoConverge(true)!, throttle);
  t.equal(throttle.prepared, 1, 'the throttle is made ready at once');
  for (let round = 0; round < 24; round++) converge.afterRound(4 * MB, 3 * MB);
  t.same(throttle.shares, [20, 30, 40, 50, 60, 70, 80, 90, 99], 'a step every second round, capped at 99');
  converge.afterRound(4 * MB, 3 * MB);
  converge.afterRound(4 * MB, 3 * MB);
  t.same(throttle.shares.at(-1), 99, 'no step past the cap');
});

t.test('a round that dirtied half of what it sent or less is not counted', async (t) => {
  const throttle = fakeThrottle();
  const converge = new AutoConverge(checkAutoConverge(true)!, throttle);
  converge.afterRound(4 * MB, 2 * MB);
  converge.afterRound(4 * MB, 2 * MB);
  converge.afterRound(64 * MB, 4 * MB);
  t.same(throttle.shares, [], 'converging on its own: no throttle');
  converge.afterRound(4 * MB, 2.5 * MB);
  t.same(throttle.shares, [], 'one dirty round is not enough');
  converge.afterRound(0, 1);
  t.same(throttle.shares, [20], 'the second one (not necessarily the next) steps up');
});

t.test('tuned: initial, increment and max', async (t) => {
  const throttle = fakeThrottle();
  const converge = new AutoConverge(checkAutoConverge({ throttleInitial: 50, throttleIncrement: 25, throttleMax: 80 })!, throttle);
  for (let round = 0; round < 10; round++) converge.afterRound(MB, MB);
  t.same(throttle.shares, [50, 75, 80]);
});

t.test('statistics, and stop(): the share set last stays in the statistics, the throttle ends', async (t) => {
  const throttle = fakeThrottle();
  const converge = new AutoConverge(checkAutoConverge({ throttleInitial: 40 })!, throttle);
  const stats = { cpuThrottlePercentage: 0, throttledMs: 0 } as MigrationStats;
  converge.report(stats);
  t.same([stats.cpuThrottlePercentage, stats.throttledMs], [0, 12.5]);
  converge.afterRound(MB, MB);
  converge.afterRound(MB, MB);
  converge.report(stats);
  t.equal(stats.cpuThrottlePercentage, 40);
  converge.stop();
  t.equal(throttle.percent, 0, 'the guest runs unthrottled');
  converge.report(stats);
  t.equal(stats.cpuThrottlePercentage, 40, 'what the guest was throttled to when it paused');
  converge.afterRound(MB, MB);
  converge.afterRound(MB, MB);
  t.equal(throttle.percent, 0, 'no step once stopped');
});

t.test('checkAutoConverge: off, on, and the ranges', async (t) => {
  t.equal(checkAutoConverge(undefined), null);
  t.equal(checkAutoConverge(false), null);
  t.same(checkAutoConverge(true), { throttleInitial: 20, throttleIncrement: 10, throttleMax: 99 });
  t.same(checkAutoConverge({ throttleMax: 60 }), { throttleInitial: 20, throttleIncrement: 10, throttleMax: 60 });
  t.throws(() => checkAutoConverge({ throttleInitial: 0 }), { code: 'ERR_OUT_OF_RANGE' });
  t.throws(() => checkAutoConverge({ throttleIncrement: 100 }), { code: 'ERR_OUT_OF_RANGE' });
  t.throws(() => checkAutoConverge({ throttleMax: 10 }), { code: 'ERR_OUT_OF_RANGE', message: /at least throttleInitial \(20\)/ });
  t.throws(() => checkAutoConverge({ speed: 1 } as never), { code: 'ERR_INVALID_ARG_VALUE' });
  t.throws(() => checkAutoConverge(1 as never), { code: 'ERR_INVALID_ARG_TYPE' });
});
