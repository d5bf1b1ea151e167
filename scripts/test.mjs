// Runs the tap suite and ends with the plain summary line CI reads: "N passed, N failed, N skipped"
// (one count per test, i.e. per top-level t.test() in each file), after a line "N todo" when
// tests are marked todo. Extra arguments go to tap.
import { spawn } from 'node:child_process';
import { createInterface } from 'node:readline';
import { createRequire } from 'node:module';
import path from 'node:path';
import { pathToFileURL } from 'node:url';

/** Counts the tests in tap's TAP output (--reporter=tap), fed line by line. */
export class TapSummary {
  passed = 0;
  failed = 0;
  skipped = 0;
  todo = 0;
  // Within the current file:
  #fileFailures = 0; // its failed tests
  #fileTimedOut = false;
  #testTimedOut = false; // the test under way has an assertion "timeout!"

  add(line) {
    // Past tap's per-file timeout, the test under way fails with "timeout!" and so may each test
    // still pending: the file then counts as one failure, not one per test it cut short.
    if (/^ {8,}not ok \d+ - timeout!$/.test(line)) {
      this.#testTimedOut = true;
      return;
    }
    // A test inside a file: indented one level under the file's subtest.
    const test = /^ {4}(not )?ok \d+ - .*?(# (SKIP|TODO)\b.*)?$/.exec(line);
    if (test) {
      if (test[3] === 'SKIP') this.skipped++;
      else if (test[3] === 'TODO') this.todo++;
      else if (test[1] && this.#testTimedOut) this.#fileTimedOut = true;
      else if (test[1]) {
        this.failed++;
        this.#fileFailures++;
      } else this.passed++;
      this.#testTimedOut = false;
      return;
    }
    // A whole file: one failure if it timed out (tap may name it "timeout!" then), or failed
    // without a failing test (a crash).
    const file = /^(not )?ok \d+ - (.*)$/.exec(line);
    if (file) {
      if (this.#fileTimedOut || (file[1] && (file[2] === 'timeout!' || this.#fileFailures === 0))) this.failed++;
      this.#fileFailures = 0;
      this.#fileTimedOut = false;
      this.#testTimedOut = false;
    }
  }

  /** The closing lines: "N todo" if any, then the summary line. */
  lines() {
    return [...(this.todo > 0 ? [`${this.todo} todo`] : []), `${this.passed} passed, ${this.failed} failed, ${this.skipped} skipped`];
  }
}

if (process.argv[1] && import.meta.url === pathToFileURL(path.resolve(process.argv[1])).href) {
  const require = createRequire(import.meta.url);
  const tapBin = path.join(path.dirname(require.resolve('tap/package.json')), 'dist', 'esm', 'run.mjs');
  const child = spawn(process.execPath, [tapBin, '--reporter=tap', ...process.argv.slice(2)], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const summary = new TapSummary();
  const lines = createInterface({ input: child.stdout });
  lines.on('line', (line) => {
    process.stdout.write(`${line}\n`);
    summary.add(line);
  });
  child.on('close', (code) => {
    for (const line of summary.lines()) console.log(line);
    process.exit(code ?? 1);
  });
}
