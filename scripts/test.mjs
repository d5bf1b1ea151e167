// Runs the tap suite and ends with the plain summary line CI reads: "N passed, N failed, N skipped"
// (one count per test, i.e. per top-level t.test() in each file), after a line "N todo" when
// tests are marked todo. Extra arguments go to tap.
import { spawn } from 'node:child_process';
import { createInterface } from 'node:readline';
import { createRequire } from 'node:module';
import path from 'node:path';

const require = createRequire(import.meta.url);
const tapBin = path.join(path.dirname(require.resolve('tap/package.json')), 'dist', 'esm', 'run.mjs');

const child = spawn(process.execPath, [tapBin, '--reporter=tap', ...process.argv.slice(2)], {
  stdio: ['ignore', 'pipe', 'inherit'],
});

let passed = 0;
let failed = 0;
let skipped = 0;
let todo = 0;
// Within the current file:
let fileFailures = 0; // its failed tests
let fileTimedOut = false;
let testTimedOut = false; // the test under way has an assertion "timeout!"
const lines = createInterface({ input: child.stdout });
lines.on('line', (line) => {
  process.stdout.write(`${line}\n`);
  // Past tap's per-file timeout, the test under way fails with "timeout!" and so may each test
  // still pending: the file then counts as one failure, not one per test it cut short.
  if (/^ {8,}not ok \d+ - timeout!$/.test(line)) {
    testTimedOut = true;
    return;
  }
  // A test inside a file: indented one level under the file's subtest.
  const test = /^ {4}(not )?ok \d+ - .*?(# (SKIP|TODO)\b.*)?$/.exec(line);
  if (test) {
    if (test[3] === 'SKIP') skipped++;
    else if (test[3] === 'TODO') todo++;
    else if (test[1] && testTimedOut) fileTimedOut = true;
    else if (test[1]) {
      failed++;
      fileFailures++;
    } else passed++;
    testTimedOut = false;
    return;
  }
  // A whole file: one failure if it timed out (tap names it "timeout!" then), or failed without a
  // failing test (a crash).
  const file = /^(not )?ok \d+ - (.*)$/.exec(line);
  if (file) {
    if (fileTimedOut || (file[1] && file[2] === 'timeout!') || (file[1] && fileFailures === 0)) failed++;
    fileFailures = 0;
    fileTimedOut = false;
    testTimedOut = false;
  }
});

child.on('close', (code) => {
  if (todo > 0) console.log(`${todo} todo`);
  console.log(`${passed} passed, ${failed} failed, ${skipped} skipped`);
  process.exit(code ?? 1);
});
