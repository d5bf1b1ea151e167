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
// node-kvm's own CRC-32C, so that the reference checksums with the same code (see crc32c.h).
const CRC_SOURCE = join(BENCH_DIR, '..', 'native', 'crc32c.cc');
const OUT_DIR = join(BENCH_DIR, 'build');
const BINARY = join(OUT_DIR, 'kvm-bench');

function run(tool, args) {
  try {
    execFileSync(tool, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  } catch (err) {
    if (err.code === 'ENOENT') {
      throw new Error(`bench/c/build.mjs: '${tool}' not found in PATH (install gcc and g++)`);
    }
    const out = `${err.stdout ?? ''}${err.stderr ?? ''}`.trim();
    throw new Error(`bench/c/build.mjs: ${tool} ${args.join(' ')} failed:\n${out}`);
  }
}

/** Build (if out of date) and return the absolute path of kvm-bench. */
export function buildCBench({ force = false } = {}) {
  const newest = Math.max(statSync(SOURCE).mtimeMs, statSync(CRC_SOURCE).mtimeMs);
  if (!force && existsSync(BINARY) && statSync(BINARY).mtimeMs > newest) {
    return BINARY;
  }
  mkdirSync(OUT_DIR, { recursive: true });
  const crcObject = join(OUT_DIR, 'crc32c.o');
  const benchObject = join(OUT_DIR, 'kvm-bench.o');
  run('c++', ['-O2', '-Wall', '-Wextra', '-std=c++17', '-c', '-o', crcObject, CRC_SOURCE]);
  run('cc', ['-O2', '-Wall', '-Wextra', '-c', '-o', benchObject, SOURCE]);
  run('c++', ['-o', BINARY, benchObject, crcObject]);
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
