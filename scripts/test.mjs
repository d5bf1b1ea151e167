// Runs the tap suite and ends with the plain summary line CI reads: "N passed, N failed, N skipped"
// (one count per test, i.e. per top-level t.test() in each file). Extra arguments go to tap.
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
let fileFailures = 0; // failures seen inside the current file
const lines = createInterface({ input: child.stdout });
lines.on('line', (line) => {
  process.stdout.write(`${line}\n`);
  // A test inside a file: indented one level under the file's subtest.
  const test = /^ {4}(not )?ok \d+ - .*?(# (SKIP|TODO)\b.*)?$/.exec(line);
  if (test) {
    if (test[3]) skipped++;
    else if (test[1]) {
      failed++;
      fileFailures++;
    } else passed++;
    return;
  }
  // A whole file: count it as one failure if it failed without a failing test (a crash).
  const file = /^(not )?ok \d+ - /.exec(line);
  if (file) {
    if (file[1] && fileFailures === 0) failed++;
    fileFailures = 0;
  }
});

child.on('close', (code) => {
  console.log(`${passed} passed, ${failed} failed, ${skipped} skipped`);
  process.exit(code ?? 1);
});
