// The summary scripts/test.mjs prints after tap's output, from TAP as tap 21 writes it (these are
// excerpts of real runs): one count per top-level test, a file that times out counted once, todo
// apart from skip, and the line CI reads last.
import t from 'tap';
// @ts-expect-error: a plain JavaScript module, without type declarations
import { TapSummary } from '../../scripts/test.mjs';

function summarize(tap: string): string[] {
  const summary = new TapSummary();
  for (const line of tap.split('\n')) summary.add(line);
  return summary.lines();
}

const passing = `TAP version 14
1..1
# Subtest: test/kvm/hello.test.ts
    # Subtest: the hello guest prints its line
        ok 1 - should be equal
        1..1
    ok 1 - the hello guest prints its line # time=20.1ms
    ok 2 - the TSC counts on from the value written # TODO kvm_pvm does not offset the guest TSC
    # Subtest: a todo assertion in a passing test
        not ok 1 - not yet # TODO x
        1..1
    ok 3 - a todo assertion in a passing test # time=0.4ms
    ok 4 - a Debian cloud kernel boots to its initramfs /init # SKIP KVM here is kvm_pvm (software)
    1..4
ok 1 - test/kvm/hello.test.ts # time=2000.1ms`;

// A test awaiting a timer when tap's timeout fired: it fails with "timeout!" (in a subtest of its
// own here), and so does the test still pending after it; then the file ends as "timeout!".
const timedOut = `# Subtest: test/zz-a.test.ts
    # Subtest: passes
        ok 1 - ok
        1..1
    ok 1 - passes # time=4.763ms
    # Subtest: fails
        not ok 1 - really
          ---
          at:
            fileName: test/zz-a.test.ts
          ...
        1..1
    not ok 2 - fails # time=21.529ms
    ok 3 - todo one # TODO later
    ok 4 - skipped # SKIP why
    # Subtest: hangs
        # Subtest: inner
            ok 1 - before
            not ok 2 - timeout!
              ---
              signal: SIGALRM
              expired: TAP
              ...
            1..2
        not ok 1 - inner # time=1975.558ms
        1..1
    not ok 5 - hangs # time=1978.571ms
    # Subtest: after
        not ok 1 - timeout!
          ---
          signal: null
          expired: TAP
          ...
        1..1
    not ok 6 - after # time=1.573ms
    # test count(6) != plan(null)
{ message: 'timeout!', test: 'test/zz-a.test.ts' }
not ok 3 - timeout!
  ---
  expired: test/zz-a.test.ts
  ...`;

// Blocked in a synchronous call when tap's timeout fired: killed, with no test reported failing.
const killed = `# Subtest: test/zz-b.test.ts
    # Subtest: passes
        ok 1 - ok
        1..1
    ok 1 - passes # time=4.576ms
    # Subtest: blocks
        ok 1 - before
not ok 1 - test/zz-b.test.ts # time=4096.687ms
  ---
  exitCode: null
  signal: SIGKILL
  ...`;

// The process exited in the middle of a test: that test fails as unfinished, the file too.
const crashed = `# Subtest: test/zz-c.test.ts
    # Subtest: passes
        ok 1 - ok
        1..1
    ok 1 - passes # time=3.204ms
    # Subtest: crash
        not ok 1 - test unfinished
        1..1
    not ok 2 - crash # time=22.664ms
not ok 2 - test/zz-c.test.ts # time=43.669ms
  ---
  exitCode: 1
  ...`;

t.test('passing, todo and skipped tests; the summary is the last line, todo on the line before', async (t) => {
  t.same(summarize(passing), ['1 todo', '2 passed, 0 failed, 1 skipped']);
});

t.test('no todo: no todo line', async (t) => {
  t.same(summarize(killed.replace('not ok 1 - test/zz-b', 'ok 1 - test/zz-b')), ['1 passed, 0 failed, 0 skipped']);
});

t.test('a file that timed out counts once, besides the tests that failed on their own', async (t) => {
  t.same(summarize(timedOut), ['1 todo', '1 passed, 2 failed, 1 skipped']);
});

t.test('a file killed at its timeout with no test failing counts once', async (t) => {
  t.same(summarize(killed), ['1 passed, 1 failed, 0 skipped']);
});

t.test('a crash counts as its failing test, not again for the file', async (t) => {
  t.same(summarize(crashed), ['1 passed, 1 failed, 0 skipped']);
});

t.test('files one after another: each file\'s timeout is its own', async (t) => {
  t.same(summarize(['TAP version 14', '1..4', killed, crashed, timedOut, passing.split('\n').slice(2).join('\n')].join('\n')),
    ['2 todo', '5 passed, 4 failed, 2 skipped']);
});
