// Loads the one-file CommonJS bundles (scripts/bundle.mjs) with V8's code cache, as Node 22's
// module.enableCompileCache() does for every module (this package runs on Node 20). A process
// that boots a guest compiles the command's 400 KB bundle and a few hundred of its functions, and
// every vCPU thread compiles its own; that costs milliseconds each time on the way to the
// guest's first instruction, where reading the bytecode back costs a fraction.
//
// The cache is per user (NODE_KVM_CACHE_DIR, else $XDG_CACHE_HOME/node-kvm, else
// $HOME/.cache/node-kvm; none without any of them), one file per bundle and use. It is written
// at exit when it was missing or V8 refused it, so it holds the functions that use ran, and it
// replaces the one of an earlier build; writing one also removes caches a month old and the
// oldest past 64 (pruneCodeCaches). Failures to read or write it only cost the time it would
// have saved. A directory that
// another user, or anyone but its owner, could write to is never read: V8 runs what it holds.
//
// A vCPU thread runs this first, so it imports only what such a thread has loaded already (each
// other built-in module costs a new thread a tenth of a millisecond or more): no node:module, no
// node:os, and named imports (a bundle copies every export of a default import).
import { mkdirSync, readdirSync, readFileSync, renameSync, statSync, unlinkSync, writeFileSync } from 'node:fs';
import { basename, dirname, isAbsolute, join } from 'node:path';
import { Script } from 'node:vm';

/** Where caches go, or null if this user has nowhere to put them. */
export function codeCacheDir(): string | null {
  const configured = process.env.NODE_KVM_CACHE_DIR;
  if (configured) return configured;
  const xdg = process.env.XDG_CACHE_HOME;
  if (xdg && isAbsolute(xdg)) return join(xdg, 'node-kvm');
  const home = process.env.HOME;
  return home && isAbsolute(home) ? join(home, '.cache', 'node-kvm') : null;
}

/**
 * The cache file for `bundle` used as `use`. V8 checks a cache against the source's length only,
 * so the bundle's size, modification time and inode are in the name: a rebuilt bundle never
 * meets the bytecode of the one before.
 */
export function codeCacheFile(dir: string, bundle: string, use: string): string {
  const { size, mtimeMs, ino } = statSync(bundle);
  return join(dir, `${cachePrefix(bundle, use)}${process.version}-${process.arch}.${size}-${Math.trunc(mtimeMs)}-${ino}${CACHE_SUFFIX}`);
}

const CACHE_SUFFIX = '.v8cache';

/** What every cache of `bundle` used as `use` is named from, whatever its build. */
function cachePrefix(bundle: string, use: string): string {
  const safeUse = use.replace(/[^A-Za-z0-9_-]/g, '_').slice(0, 32) || 'default';
  return `${basename(bundle, '.cjs')}.${safeUse}.`;
}

/** What Node wraps a CommonJS module's source in (Module.wrap()). */
const WRAPPER = ['(function (exports, require, module, __filename, __dirname) { ', '\n});'] as const;

/**
 * Runs the CommonJS bundle `file` and returns its exports, as require() would, compiled from the
 * code cache where one fits. `use` names what this process or thread does with it (a command),
 * since each use compiles different functions. `require` is the bundle's: one made for a file
 * in its directory (a loader beside it passes its own).
 */
export function requireBundle(file: string, use: string, require: NodeJS.Require): unknown {
  const source = readFileSync(file, 'utf8');
  const dir = codeCacheDir();
  let cacheFile: string | null = null;
  let cachedData: Buffer | undefined;
  if (dir && mayHoldCode(dir)) {
    try {
      cacheFile = codeCacheFile(dir, file, use);
      cachedData = readFileSync(cacheFile);
    } catch {
      // No cache yet (or none possible): compiled from source, and cached at exit.
    }
  }
  const script = new Script(WRAPPER[0] + source + WRAPPER[1], { filename: file, cachedData });
  const module = { exports: {} as unknown, filename: file, id: file, loaded: false };
  const load = script.runInThisContext() as (exports: unknown, require: NodeJS.Require, module: unknown, filename: string, dirname: string) => void;
  load.call(module.exports, module.exports, require, module, file, dirname(file));
  module.loaded = true;
  // (A bundle that failed to load is not worth caching.)
  if (cacheFile && (cachedData === undefined || script.cachedDataRejected)) {
    const target = cacheFile;
    const stale = cachePrefix(file, use);
    process.once('exit', () => saveCodeCache(script, dir!, target, stale));
  }
  return module.exports;
}

/**
 * Whether `dir` is safe to load code from: V8 runs what a cache file says, so a directory that
 * someone else could write to is not used. A directory not there yet is made (0700) at exit.
 */
function mayHoldCode(dir: string): boolean {
  try {
    const stats = statSync(dir);
    const uid = process.getuid?.();
    return stats.isDirectory() && (uid === undefined || stats.uid === uid) && (stats.mode & 0o022) === 0;
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === 'ENOENT';
  }
}

/** A cache not rewritten for this long is removed when another is written (a used one is rewritten only when V8 refuses it). */
export const CODE_CACHE_MAX_AGE_MS = 30 * 24 * 3600 * 1000;
/** At most this many caches stay, the newest: every bundle, thread and command of a few builds and Node versions. */
export const CODE_CACHE_MAX_FILES = 64;

/**
 * Removes, beside the cache `file` just written, the caches of earlier builds of the same bundle
 * and use (named from `stale`), caches older than CODE_CACHE_MAX_AGE_MS, and the oldest past
 * CODE_CACHE_MAX_FILES.
 */
export function pruneCodeCaches(dir: string, file: string, stale: string, now = Date.now()): void {
  const caches: { name: string; mtimeMs: number }[] = [];
  for (const name of readdirSync(dir)) {
    if (!name.endsWith(CACHE_SUFFIX) || name === basename(file)) continue;
    try {
      const { mtimeMs } = statSync(join(dir, name));
      if (name.startsWith(stale) || now - mtimeMs > CODE_CACHE_MAX_AGE_MS) unlinkSync(join(dir, name));
      else caches.push({ name, mtimeMs });
    } catch {
      // removed by another process meanwhile
    }
  }
  caches.sort((a, b) => b.mtimeMs - a.mtimeMs);
  for (const { name } of caches.slice(CODE_CACHE_MAX_FILES - 1)) {
    try {
      unlinkSync(join(dir, name));
    } catch {
      // removed by another process meanwhile
    }
  }
}

/** Writes the cache to `file`, and removes old caches (pruneCodeCaches). */
function saveCodeCache(script: Script, dir: string, file: string, stale: string): void {
  try {
    mkdirSync(dir, { recursive: true, mode: 0o700 });
    // Whole or not at all, whoever else writes it at the same moment.
    const partial = `${file}.${process.pid}.${Math.random().toString(36).slice(2)}`;
    try {
      writeFileSync(partial, script.createCachedData(), { mode: 0o600 });
      renameSync(partial, file);
    } catch (error) {
      try {
        unlinkSync(partial);
      } catch {
        // never written
      }
      throw error;
    }
    pruneCodeCaches(dir, file, stale);
  } catch {
    // A read-only home, a full disk: the next run compiles again.
  }
}
