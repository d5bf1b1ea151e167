// Aborting a machine's build (MachineConfig.signal, BuildPlan.signal) at any step rejects with
// ABORT_ERR and gives back everything the build took: vCPU threads (back to their pool, or
// ended), native handles, guest-memory mappings, fds, the disk and its thread. The fixture aborts
// each step in a process of its own, which must then exit by itself: a thread left behind would
// keep it alive.
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import t from 'tap';
import { noKvm } from '../helpers/kvm.js';
import { childExecArgv } from '../helpers/spawn.js';

const fixture = fileURLToPath(new URL('../fixtures/build-aborts.ts', import.meta.url));
const LAST_LINE = 'aborted after it resolved';

t.test('an abort at any step of a build rejects with ABORT_ERR and gives back everything it took', { skip: noKvm }, async (t) => {
  const dir = mkdtempSync(path.join(tmpdir(), 'node-kvm-abort-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const child = spawn(process.execPath, [...childExecArgv, fixture, dir], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  // Once its last line is out, the process has 5 s to exit by itself before it counts as hung.
  let hung = false;
  let watchdog: NodeJS.Timeout | undefined;
  child.stdout.on('data', (chunk: Buffer) => {
    stdout += chunk.toString();
    if (!watchdog && stdout.includes(LAST_LINE)) {
      watchdog = setTimeout(() => {
        hung = true;
        child.kill('SIGKILL');
      }, 5000);
    }
  });
  child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  t.teardown(() => {
    clearTimeout(watchdog);
    child.kill('SIGKILL');
  });
  const [status] = await new Promise<[number | null]>((resolve) => child.on('close', (code) => resolve([code])));
  clearTimeout(watchdog);
  t.notOk(hung, 'the process exited on its own: no thread was left behind');
  t.equal(status, 0, stderr);
  const aborted = (step: string) => [
    `${step}: ABORT_ERR AbortError the machine was not built: aborted (the reason)`,
    `${step}: everything is back`,
  ];
  t.same(stdout.trimEnd().split('\n'), [
    ...aborted('aborted before the call'),
    ...aborted('aborted while the threads load'),
    'aborted while the threads load: the pool has 2 idle',
    ...aborted('aborted while the VM is made'),
    'aborted while the VM is made: the pool has 2 idle',
    ...aborted('aborted while guest RAM is made (buildMachine)'),
    'aborted while guest RAM is made (buildMachine): the pool has 2 idle',
    ...aborted('aborted once a vCPU is created'),
    'aborted once a vCPU is created: the pool has 2 idle',
    ...aborted('aborted with threads of its own'),
    'aborted after it resolved: 0 abort listeners left, running, then stopped',
  ], stdout);
});
