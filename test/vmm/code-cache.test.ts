// Bundles loaded through V8's code cache (lib/vmm/code-cache.ts): the cache is written at exit
// when missing, used when it fits, never confused with a rebuilt bundle, and never needed.
import { spawnSync } from 'node:child_process';
import { chmodSync, existsSync, mkdtempSync, readdirSync, rmSync, statSync, utimesSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import t, { type Test } from 'tap';
import { CODE_CACHE_MAX_AGE_MS, CODE_CACHE_MAX_FILES, codeCacheFile, pruneCodeCaches, requireBundle } from '../../lib/vmm/code-cache.js';
import { repoRoot } from '../helpers/kvm.js';
import { childExecArgv } from '../helpers/spawn.js';

const codeCache = pathToFileURL(path.join(repoRoot, 'lib', 'vmm', 'code-cache.ts')).href;

/** A fresh directory with a bundle (requiring a file beside it) and a script that loads it. */
function setUp(t: Test) {
  const dir = mkdtempSync(path.join(tmpdir(), 'node-kvm-code-cache-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const bundle = path.join(dir, 'thing.cjs');
  writeFileSync(path.join(dir, 'dep.cjs'), 'module.exports = 1;');
  const cacheDir = path.join(dir, 'cache');
  const loader = path.join(dir, 'load.mts');
  writeFileSync(loader, `import { createRequire } from 'node:module';\nimport { requireBundle } from ${JSON.stringify(codeCache)};\n`
    + `console.log(JSON.stringify(requireBundle(${JSON.stringify(bundle)}, process.argv[2] ?? 'test', createRequire(import.meta.url))));\n`);
  const load = (use = 'test', env: Record<string, string> = { NODE_KVM_CACHE_DIR: cacheDir }) => {
    const result = spawnSync(process.execPath, [...childExecArgv, loader, use], { encoding: 'utf8', env: { ...process.env, ...env }, timeout: 60_000 });
    if (result.status !== 0) throw new Error(`loader failed: ${result.stderr}`);
    return JSON.parse(result.stdout);
  };
  const caches = () => (readdirSync(cacheDir, { withFileTypes: true }).filter((entry) => entry.isFile()).map((entry) => entry.name)).sort();
  return { dir, bundle, cacheDir, load, caches };
}

t.test('the cache is written at exit, then used as it is; each use has its own', async (t) => {
  const { bundle, cacheDir, load, caches } = setUp(t);
  writeFileSync(bundle, 'function twice(x) { return 2 * x; }\nmodule.exports = { answer: twice(20) + require("./dep.cjs") + 1, file: __filename };');
  t.same(load(), { answer: 42, file: bundle }, 'exports, with require() and __filename relative to the bundle');
  const [file] = caches();
  t.equal(caches().length, 1);
  t.equal(path.join(cacheDir, file!), codeCacheFile(cacheDir, bundle, 'test'));
  t.equal(statSync(path.join(cacheDir, file!)).mode & 0o777, 0o600);
  t.equal(statSync(cacheDir).mode & 0o777, 0o700);
  const written = statSync(path.join(cacheDir, file!));
  t.same(load(), { answer: 42, file: bundle }, 'from the cache');
  const after = statSync(path.join(cacheDir, file!));
  t.same([after.ino, after.mtimeMs], [written.ino, written.mtimeMs], 'a cache V8 took is not written again');
  load('run');
  t.equal(caches().length, 2, 'another use, another cache');
  t.match(caches().join(' '), /thing\.run\./);
});

t.test('a rebuilt bundle of the same length never runs the old bytecode', async (t) => {
  const { bundle, load, caches } = setUp(t);
  writeFileSync(bundle, 'module.exports = { answer: 41 };');
  t.same(load(), { answer: 41 });
  writeFileSync(bundle, 'module.exports = { answer: 42 };');
  const later = new Date(Date.now() + 5000);
  utimesSync(bundle, later, later);
  t.same(load(), { answer: 42 });
  t.equal(caches().length, 1, 'its own cache, which replaced the old build\'s');
  t.same(load(), { answer: 42 }, 'and is used');
});

t.test('a corrupt cache is refused by V8 and replaced; no usable cache directory costs nothing but time', async (t) => {
  const { bundle, cacheDir, load, caches } = setUp(t);
  writeFileSync(bundle, 'module.exports = { answer: [1, 2, 3].map((x) => x * 2) };');
  t.same(load(), { answer: [2, 4, 6] });
  const file = path.join(cacheDir, caches()[0]!);
  writeFileSync(file, Buffer.alloc(4096, 0x5a));
  t.same(load(), { answer: [2, 4, 6] }, 'compiled from source');
  t.not(statSync(file).size, 4096, 'and cached again');
  t.same(load('test', { NODE_KVM_CACHE_DIR: path.join(bundle, 'not-a-directory') }), { answer: [2, 4, 6] });
  t.same(caches(), [path.basename(file)], 'no partial files left behind');
});

t.test('a cache directory others could write to is never read', async (t) => {
  const { bundle, cacheDir, load, caches } = setUp(t);
  writeFileSync(bundle, 'module.exports = { answer: 42 };');
  t.same(load(), { answer: 42 });
  const file = path.join(cacheDir, caches()[0]!);
  // A cache V8 refuses is replaced when read: here it must stay as it is.
  writeFileSync(file, Buffer.alloc(4096, 0x5a));
  chmodSync(cacheDir, 0o777);
  t.same(load(), { answer: 42 }, 'compiled from source');
  t.equal(statSync(file).size, 4096, 'neither read nor written');
  chmodSync(cacheDir, 0o700);
  t.same(load(), { answer: 42 });
  t.not(statSync(file).size, 4096, 'read (and replaced) once the directory is private again');
});

t.test('the cache goes to $XDG_CACHE_HOME, else $HOME/.cache; without either, nowhere', async (t) => {
  const { dir, bundle, load } = setUp(t);
  writeFileSync(bundle, 'module.exports = { answer: 42 };');
  const unset = { NODE_KVM_CACHE_DIR: '', XDG_CACHE_HOME: '' };
  t.same(load('test', { ...unset, HOME: path.join(dir, 'home') }), { answer: 42 });
  t.equal(readdirSync(path.join(dir, 'home', '.cache', 'node-kvm')).length, 1, 'under $HOME');
  t.same(load('test', { ...unset, XDG_CACHE_HOME: path.join(dir, 'xdg'), HOME: path.join(dir, 'home') }), { answer: 42 });
  t.equal(readdirSync(path.join(dir, 'xdg', 'node-kvm')).length, 1, 'under $XDG_CACHE_HOME');
  const before = readdirSync(dir).sort();
  t.same(load('test', { ...unset, XDG_CACHE_HOME: 'relative', HOME: '' }), { answer: 42 }, 'loads without a cache');
  t.same(readdirSync(dir).sort(), before, 'and writes none');
  t.notOk(existsSync('relative'), 'not under a relative $XDG_CACHE_HOME either');
});

t.test('requireBundle in this process: errors in the bundle are the bundle\'s (and nothing is cached for it)', async (t) => {
  const { bundle } = setUp(t);
  writeFileSync(bundle, 'throw new Error("broken bundle");');
  t.throws(() => requireBundle(bundle, 'test', createRequire(bundle)), { message: 'broken bundle' });
  t.throws(() => requireBundle(path.join(path.dirname(bundle), 'missing.cjs'), 'test', createRequire(bundle)), { code: 'ENOENT' });
});

t.test('writing a cache removes the same use\'s earlier builds, caches a month old, and the oldest past the cap', async (t) => {
  const dir = mkdtempSync(path.join(tmpdir(), 'node-kvm-code-cache-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const now = Date.now();
  const make = (name: string, ageMs: number) => {
    writeFileSync(path.join(dir, name), '');
    utimesSync(path.join(dir, name), (now - ageMs) / 1000, (now - ageMs) / 1000);
  };
  make('node-kvm.run.v20-x64.2-2-2.v8cache', 0);
  make('node-kvm.run.v20-x64.1-1-1.v8cache', 1000);
  make('node-kvm.stats.v20-x64.1-1-1.v8cache', CODE_CACHE_MAX_AGE_MS + 1000);
  make('node-kvm.info.v20-x64.1-1-1.v8cache', 5000);
  make('notes.txt', CODE_CACHE_MAX_AGE_MS + 1000);
  for (let i = 0; i < CODE_CACHE_MAX_FILES; i++) make(`vcpu-worker.u${i}.v20-x64.1-1-1.v8cache`, 10_000 + i * 1000);
  pruneCodeCaches(dir, path.join(dir, 'node-kvm.run.v20-x64.2-2-2.v8cache'), 'node-kvm.run.', now);
  const left = readdirSync(dir);
  t.ok(left.includes('node-kvm.run.v20-x64.2-2-2.v8cache'), 'the one written stays');
  t.notOk(left.includes('node-kvm.run.v20-x64.1-1-1.v8cache'), "the same use's earlier build goes");
  t.notOk(left.includes('node-kvm.stats.v20-x64.1-1-1.v8cache'), 'a month-old cache goes');
  t.ok(left.includes('notes.txt'), 'what is not a cache stays');
  t.equal(left.filter((name) => name.endsWith('.v8cache')).length, CODE_CACHE_MAX_FILES, 'at most the cap');
  t.ok(left.includes('node-kvm.info.v20-x64.1-1-1.v8cache'), 'the newest stay');
  t.notOk(left.includes(`vcpu-worker.u${CODE_CACHE_MAX_FILES - 1}.v20-x64.1-1-1.v8cache`), 'the oldest go');
});
