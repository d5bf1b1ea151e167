// Whatever step of building a machine fails, everything it took is given back: its vCPU threads
// (started before the VM exists), VM and vCPU handles and guest memory. The fixture fails each step in a process
// of its own, which must then exit by itself: a thread left behind would keep it alive.
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import t from 'tap';
import { noKvm } from '../helpers/kvm.js';
import { childExecArgv } from '../helpers/spawn.js';

const fixture = fileURLToPath(new URL('../fixtures/build-failures.ts', import.meta.url));

t.test('every failure of create, restore and incoming releases every thread, handle and mapping', { skip: noKvm }, async (t) => {
  const dir = mkdtempSync(path.join(tmpdir(), 'node-kvm-build-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const child = spawn(process.execPath, [...childExecArgv, fixture, dir], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (chunk: Buffer) => (stdout += chunk.toString()));
  child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  // Ended by itself, or killed as hung once its last line is out and it still runs.
  const ended = new Promise<number | null>((resolve) => child.on('close', (code) => resolve(code)));
  let hung = false;
  const watchdog = setInterval(() => {
    if (stdout.includes('handles and mappings are back') || stdout.includes('left behind')) {
      clearInterval(watchdog);
      setTimeout(() => {
        if (child.exitCode === null) {
          hung = true;
          child.kill('SIGKILL');
        }
      }, 5000).unref();
    }
  }, 100);
  t.teardown(() => {
    clearInterval(watchdog);
    child.kill('SIGKILL');
  });
  const status = await ended;
  clearInterval(watchdog);
  t.notOk(hung, 'the process exited on its own after its last failure');
  t.equal(status, 0, stderr);
  const missing = path.join(dir, 'missing.img');
  const lines = stdout.trimEnd().split('\n');
  t.same(lines.map((line) => line.replace(/: .*/, '')), [
    'no /dev/kvm', 'a vCPU that cannot take its saved state', 'no /dev/kvm, threads from a pool', 'a disk that is missing',
    'a restore whose disk does not fit', 'the same vCPU, threads from a pool', 'a vCPU thread that fails to load',
    'an incoming machine built early, then nowhere to listen', 'an incoming machine that cannot be built, and no migration',
    'the pool still serves a machine', 'handles and mappings are back',
  ], stdout);
  t.match(lines[0], /^no \/dev\/kvm: .*\/nonexistent\/kvm/);
  t.equal(lines[1], 'a vCPU that cannot take its saved state: vCPU 1 could not start: KVM_SET_XSAVE needs 4096 bytes, got 16');
  t.match(lines[2], /^no \/dev\/kvm, threads from a pool: .*\/nonexistent\/kvm/);
  t.equal(lines[3], `a disk that is missing: disk 0: cannot open ${missing} for writing: ENOENT`);
  t.match(lines[4], /does not fit: .*had 64 sectors, .*small\.img has 32/);
  t.equal(lines[5], 'the same vCPU, threads from a pool: vCPU 1 could not start: KVM_SET_XSAVE needs 4096 bytes, got 16');
  t.match(lines[6], /^a vCPU thread that fails to load: vCPU 0 could not start: .*this thread cannot load/);
  t.match(lines[7], /cannot listen for a migration on unix:.*dir\.sock/);
  t.match(lines[8], /no migration arrived .* within 200 ms/);
  t.equal(lines[9], 'the pool still serves a machine: 2 vCPUs');
});
