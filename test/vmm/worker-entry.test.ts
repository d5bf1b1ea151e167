// Built, the command and the worker threads each run from bundles (scripts/bundle.mjs): which
// worker file is chosen, and that the built command boots guests through them.
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import t from 'tap';
import { workerEntry } from '../../lib/vmm/worker-entry.js';
import { noKvm, repoRoot } from '../helpers/kvm.js';

t.test('workerEntry: the bundle beside built JavaScript, the module otherwise', async (t) => {
  const dir = mkdtempSync(path.join(tmpdir(), 'node-kvm-worker-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const importer = (extension: string) => path.join(dir, `pool${extension}`);
  t.equal(workerEntry(importer('.js'), 'vcpu-worker'), path.join(dir, 'vcpu-worker.js'), 'no bundle: the module');
  writeFileSync(path.join(dir, 'vcpu-worker.cjs'), '');
  t.equal(workerEntry(importer('.js'), 'vcpu-worker'), path.join(dir, 'vcpu-worker.cjs'), 'built: the bundle');
  t.equal(workerEntry(importer('.ts'), 'vcpu-worker'), path.join(dir, 'vcpu-worker.ts'), 'under a TypeScript loader: the source');
  t.equal(workerEntry(importer('.js'), 'virtio-worker'), path.join(dir, 'virtio-worker.js'), 'each worker its own bundle');
});

const built = path.join(repoRoot, 'dist', 'lib', 'cli', 'node-kvm.cjs');
const notBuilt = existsSync(built) ? false : `${built} is absent (run npm run build:ts): the built package is not tested`;
if (notBuilt) console.log(`# ${notBuilt}`);

t.test('the package\'s bin (the command in one file) boots guests through the bundled workers', { skip: noKvm || notBuilt }, async (t) => {
  const cli = path.join(repoRoot, 'dist', 'lib', 'cli', 'node-kvm.cjs');
  t.equal(JSON.parse(readFileSync(path.join(repoRoot, 'package.json'), 'utf8')).bin['node-kvm'], './dist/lib/cli/node-kvm.cjs');
  const hello = spawnSync(process.execPath, [cli, 'run', path.join(repoRoot, 'guests', 'build', 'hello.bin')], { encoding: 'latin1', timeout: 60_000 });
  t.equal(hello.stdout, 'Hello from node-kvm!\n');
  t.equal(hello.status, 0, hello.stderr);
  // Two vCPUs and the in-kernel irqchip: every vCPU thread from the bundle.
  const smp = spawnSync(process.execPath, [cli, 'run', path.join(repoRoot, 'guests', 'build', 'smp.elf'), '--vcpus', '2'], { encoding: 'latin1', timeout: 60_000 });
  t.equal(smp.stdout, 'cpu 0\ncpu 1\nall 2 cpus up\n');
  t.equal(smp.status, 65, smp.stderr);
});

t.test('the bin and its vCPU threads load through the code cache, written by the first run and used by the next', { skip: noKvm || notBuilt }, async (t) => {
  const cli = path.join(repoRoot, 'dist', 'lib', 'cli', 'node-kvm.cjs');
  const cacheDir = mkdtempSync(path.join(tmpdir(), 'node-kvm-cache-'));
  t.teardown(() => rmSync(cacheDir, { recursive: true, force: true }));
  const env = { ...process.env, NODE_KVM_CACHE_DIR: cacheDir };
  for (const run of ['first', 'second']) {
    const hello = spawnSync(process.execPath, [cli, 'run', path.join(repoRoot, 'guests', 'build', 'hello.bin')], { encoding: 'latin1', timeout: 60_000, env });
    t.equal(hello.stdout, 'Hello from node-kvm!\n', `${run} run`);
    t.equal(hello.status, 0, hello.stderr);
    const caches = readdirSync(cacheDir).sort();
    t.equal(caches.length, 2, caches.join(' '));
    t.match(caches[0], /^node-kvm-commands\.run\./);
    t.match(caches[1], /^vcpu-worker\.body\.vcpu-worker\./);
  }
});

t.test('the bin ends the vCPU thread it started early when run fails before booting', { skip: noKvm || notBuilt }, async (t) => {
  const cli = path.join(repoRoot, 'dist', 'lib', 'cli', 'node-kvm.cjs');
  // Each would hang until the timeout if the early thread were left running.
  for (const [args, message] of [
    [['run', path.join(repoRoot, 'no-such-image.bin')], /^node-kvm: .*no-such-image\.bin/],
    [['run', '--bogus'], /^node-kvm: Unknown option '--bogus'/],
    [['run'], /^node-kvm: run takes one IMAGE/],
  ] as const) {
    const result = spawnSync(process.execPath, [cli, ...args], { encoding: 'utf8', timeout: 20_000 });
    t.equal(result.status, 1, `${args.join(' ')}: ${result.stderr}`);
    t.match(result.stderr, message);
    t.equal(result.stderr.trim().split('\n').length, 1, 'one line');
  }
  const help = spawnSync(process.execPath, [cli, 'run', '--help'], { encoding: 'utf8', timeout: 20_000 });
  t.equal(help.status, 0);
  t.match(help.stdout, /^usage: node-kvm run/);
});
