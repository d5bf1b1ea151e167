// `node-kvm run` on a terminal (a pty from util-linux's script): raw mode, so what is typed
// reaches the guest at once and is not echoed by the terminal; Ctrl-A Ctrl-A types a Ctrl-A, and
// Ctrl-A x ends the run with status 0.
import { spawn, spawnSync } from 'node:child_process';
import path from 'node:path';
import t from 'tap';
import { noKvm, repoRoot } from '../helpers/kvm.js';
import { childExecArgv } from '../helpers/spawn.js';

const noScript = spawnSync('script', ['--version']).status === 0 ? false : 'script (util-linux) is not installed: no pty to test with';
const quote = (word: string) => `'${word.replace(/'/g, `'\\''`)}'`;

t.test('a terminal: raw mode, Ctrl-A Ctrl-A, and Ctrl-A x', { skip: noKvm || noScript }, async (t) => {
  const command = [process.execPath, ...childExecArgv, path.join(repoRoot, 'lib', 'cli', 'main.ts'), 'run', path.join(repoRoot, 'guests', 'build', 'echo.bin')];
  // -q: no banner; -f: flush at once; -e: its status is the command's.
  const child = spawn('script', ['-qfec', command.map(quote).join(' '), '/dev/null'], { stdio: ['pipe', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  const waiters = new Set<() => void>();
  child.stdout.on('data', (chunk: Buffer) => {
    stdout += chunk.toString('latin1');
    for (const waiter of waiters) waiter();
  });
  child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString('latin1')));
  const closed = new Promise<number | null>((resolve) => child.on('close', resolve));
  const waitFor = (expected: string) => new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no ${JSON.stringify(expected)} on the terminal; got ${JSON.stringify(stdout)} ${stderr}`)), 60_000);
    const check = () => {
      if (!stdout.endsWith(expected)) return;
      waiters.delete(check);
      clearTimeout(timer);
      resolve();
    };
    waiters.add(check);
    check();
  });
  await waitFor('echo> ');
  child.stdin.write('hi\x01\x01');
  await waitFor('echo> hi\x01');
  child.stdin.write('\x01x');
  const status = await closed;
  t.equal(status, 0, stderr);
  t.equal(stdout, 'echo> hi\x01', 'only the guest echoes: the terminal is raw; Ctrl-A x reaches no guest');
});
