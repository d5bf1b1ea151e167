#!/usr/bin/env node
// Builds every guests/*.S into a flat real-mode binary guests/build/<name>.bin,
// linked at 0x7c00 (where the host loads it). Intermediates (.o, .elf) stay in
// guests/build too. A .bin newer than its .S is not rebuilt.
//
//   node guests/build.mjs            build what is out of date
//   node guests/build.mjs --force    rebuild everything
//
// Also importable: `import { buildGuests } from './guests/build.mjs'`.
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, readdirSync, statSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

export const GUESTS_DIR = dirname(fileURLToPath(import.meta.url));
export const BUILD_DIR = join(GUESTS_DIR, 'build');
export const LOAD_ADDRESS = 0x7c00;

function run(tool, args) {
  try {
    execFileSync(tool, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  } catch (err) {
    if (err.code === 'ENOENT') {
      throw new Error(`guests/build.mjs: '${tool}' not found in PATH (install binutils)`);
    }
    const out = `${err.stdout ?? ''}${err.stderr ?? ''}`.trim();
    throw new Error(`guests/build.mjs: ${tool} ${args.join(' ')} failed:\n${out}`);
  }
}

/** Path of the built binary for guest `name` (e.g. 'hello'). */
export function guestPath(name) {
  return join(BUILD_DIR, `${name}.bin`);
}

/**
 * Build all out-of-date guests. Returns { name: binPath } for every guest.
 * Throws on the first failure.
 */
export function buildGuests({ force = false, log = () => {} } = {}) {
  mkdirSync(BUILD_DIR, { recursive: true });
  const result = {};
  const sources = readdirSync(GUESTS_DIR).filter((f) => f.endsWith('.S')).sort();
  for (const src of sources) {
    const name = src.slice(0, -2);
    const srcPath = join(GUESTS_DIR, src);
    const obj = join(BUILD_DIR, `${name}.o`);
    const elf = join(BUILD_DIR, `${name}.elf`);
    const bin = guestPath(name);
    result[name] = bin;
    if (!force && existsSync(bin) && statSync(bin).mtimeMs > statSync(srcPath).mtimeMs) {
      log(`up to date: ${bin}`);
      continue;
    }
    run('as', ['--32', '-o', obj, srcPath]);
    // -z noexecstack: silences ld's "missing .note.GNU-stack" warning; the
    // ELF is only an intermediate, the stack flag means nothing here.
    run('ld', ['-m', 'elf_i386', `-Ttext=0x${LOAD_ADDRESS.toString(16)}`, '-e', '_start',
      '-z', 'noexecstack', '-o', elf, obj]);
    // Only .text: everything in these guests lives there (code + data).
    run('objcopy', ['-O', 'binary', '-j', '.text', elf, bin]);
    log(`built: ${bin} (${statSync(bin).size} bytes)`);
  }
  return result;
}

if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  try {
    buildGuests({ force: process.argv.includes('--force'), log: (m) => console.log(m) });
  } catch (err) {
    console.error(err.message);
    process.exit(1);
  }
}
