#!/usr/bin/env node
// Compiles the C reference benchmark bench/c/kvm-bench.c into
// bench/build/kvm-bench (skipped when the binary is newer than the source).
//
//   node bench/c/build.mjs      prints the binary path
//   import { buildCBench } from './bench/c/build.mjs'
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, statSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const HERE = dirname(fileURLToPath(import.meta.url));
const BENCH_DIR = dirname(HERE);
const SOURCE = join(HERE, 'kvm-bench.c');
const OUT_DIR = join(BENCH_DIR, 'build');
const BINARY = join(OUT_DIR, 'kvm-bench');

/** Build (if out of date) and return the absolute path of kvm-bench. */
export function buildCBench({ force = false } = {}) {
  if (!force && existsSync(BINARY) && statSync(BINARY).mtimeMs > statSync(SOURCE).mtimeMs) {
    return BINARY;
  }
  mkdirSync(OUT_DIR, { recursive: true });
  const args = ['-O2', '-Wall', '-Wextra', '-o', BINARY, SOURCE];
  try {
    execFileSync('cc', args, { stdio: ['ignore', 'pipe', 'pipe'] });
  } catch (err) {
    if (err.code === 'ENOENT') {
      throw new Error("bench/c/build.mjs: 'cc' not found in PATH (install gcc)");
    }
    const out = `${err.stdout ?? ''}${err.stderr ?? ''}`.trim();
    throw new Error(`bench/c/build.mjs: cc ${args.join(' ')} failed:\n${out}`);
  }
  return BINARY;
}

if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  try {
    console.log(buildCBench({ force: process.argv.includes('--force') }));
  } catch (err) {
    console.error(err.message);
    process.exit(1);
  }
}
