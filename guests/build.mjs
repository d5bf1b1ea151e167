#!/usr/bin/env node
// Builds every guests/*.S into a flat real-mode binary guests/build/<name>.bin,
// linked at 0x7c00 (where the host loads it), except the ELF kernels listed in
// ELF_GUESTS, which become guests/build/<name>.elf, linked at 1 MiB by the script
// in ELF_LINKER_SCRIPT (text, then data+bss in its own segment, and a PT_NOTE for
// .note.Xen), and the C guests listed in C_GUESTS (on the runtime in guests/rt/).
// The bzImage guests in BZIMAGE_GUESTS become guests/build/<name>.bin, not linked.
// Intermediates (.o, the flat guests' .bin.elf, the linker script) stay in
// guests/build too. Routines shared between guests live in guests/include/*.inc,
// pulled in with GNU as `.include "<file>.inc"` (as runs with -I guests/include).
// An output newer than its .S and every include file (and, for ELF kernels, than
// this file) is not rebuilt.
//
//   node guests/build.mjs            build what is out of date
//   node guests/build.mjs --force    rebuild everything
//
// Also importable: `import { buildGuests } from './guests/build.mjs'`.
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

export const GUESTS_DIR = dirname(fileURLToPath(import.meta.url));
export const BUILD_DIR = join(GUESTS_DIR, 'build');
export const INCLUDE_DIR = join(GUESTS_DIR, 'include');
export const LOAD_ADDRESS = 0x7c00;
export const ELF_LOAD_ADDRESS = 0x100000;

/**
 * Guests that are ELF kernels: name -> { bits: 32 | 64, source (default <name>.S),
 * defsyms: symbols for `as --defsym` }.
 */
export const ELF_GUESTS = {
  protected: { bits: 32 },
  long: { bits: 64 },
  multiboot: { bits: 32 },
  'multiboot-modules': { bits: 32 },
  pvh: { bits: 64 },
  dirtier: { bits: 64 },
  'dirtier-user': { bits: 64, source: 'dirtier.S', defsyms: { USER_MODE: 1 } },
  smp: { bits: 32 },
  gdb: { bits: 64 },
  inspect: { bits: 64 },
  'inspect-spin': { bits: 64, source: 'inspect.S', defsyms: { SPIN: 1 } },
};

/**
 * Guests in the Linux bzImage format: name -> {}. Assembled as 64-bit code (with .code32 parts
 * where they say so) and turned straight into a flat file by objcopy, not linked: the file is
 * loaded in pieces at addresses the loader picks, so the code must be position-independent,
 * and the build refuses an object that still has relocations.
 */
export const BZIMAGE_GUESTS = {
  bzimage: {},
};

function buildBzImageGuest(name, { force, log }) {
  const srcPath = join(GUESTS_DIR, `${name}.S`);
  const obj = join(BUILD_DIR, `${name}.o`);
  const bin = guestPath(name);
  if (!force && isNewer(bin, [srcPath, ...includeFiles(), fileURLToPath(import.meta.url)])) {
    log(`up to date: ${bin}`);
    return bin;
  }
  run('as', ['--64', '-I', INCLUDE_DIR, '-o', obj, srcPath]);
  const relocations = execFileSync('readelf', ['-r', '-W', obj], { encoding: 'utf8' });
  if (/^Relocation section/m.test(relocations)) {
    throw new Error(`guests/build.mjs: ${name}.S must be position-independent (RIP-relative), but its object has relocations:\n${relocations.trim()}`);
  }
  run('objcopy', ['-O', 'binary', '-j', '.text', obj, bin]);
  log(`built: ${bin} (${statSync(bin).size} bytes)`);
  return bin;
}

const ELF_LINKER_SCRIPT = `ENTRY(_start)
PHDRS {
  text PT_LOAD FLAGS(5);
  data PT_LOAD FLAGS(6);
  note PT_NOTE FLAGS(4);
}
SECTIONS {
  . = 0x${ELF_LOAD_ADDRESS.toString(16)};
  .text : { *(.multiboot) *(.text .text.*) *(.rodata .rodata.*) } :text
  .note.Xen : { *(.note.Xen) } :text :note
  . = ALIGN(4096);
  .data : { *(.data .data.*) } :data
  .bss : { *(.bss .bss.*) *(COMMON) } :data
  /DISCARD/ : { *(.note.gnu.property) *(.comment) }
}
`;

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

/** Path of the built image of guest `name` (e.g. 'hello' -> .bin, 'long' -> .elf). */
export function guestPath(name) {
  return join(BUILD_DIR, `${name}${Object.hasOwn(ELF_GUESTS, name) || Object.hasOwn(C_GUESTS, name) ? '.elf' : '.bin'}`);
}

/** The shared include files: any of them changing rebuilds every guest. */
const includeFiles = () => (existsSync(INCLUDE_DIR)
  ? readdirSync(INCLUDE_DIR).filter((f) => f.endsWith('.inc')).map((f) => join(INCLUDE_DIR, f))
  : []);

const isNewer = (output, inputs) => existsSync(output) && inputs.every((input) => statSync(output).mtimeMs > statSync(input).mtimeMs);

function buildElfGuest(name, { bits, source = `${name}.S`, defsyms = {} }, { force, log }) {
  const srcPath = join(GUESTS_DIR, source);
  const obj = join(BUILD_DIR, `${name}.o`);
  const script = join(BUILD_DIR, 'elf-guest.ld');
  const elf = guestPath(name);
  if (!force && isNewer(elf, [srcPath, ...includeFiles(), fileURLToPath(import.meta.url)])) {
    log(`up to date: ${elf}`);
    return elf;
  }
  writeFileSync(script, ELF_LINKER_SCRIPT);
  const defs = Object.entries(defsyms).flatMap(([symbol, value]) => ['--defsym', `${symbol}=${value}`]);
  run('as', [bits === 64 ? '--64' : '--32', '-I', INCLUDE_DIR, ...defs, '-o', obj, srcPath]);
  run('ld', ['-m', bits === 64 ? 'elf_x86_64' : 'elf_i386', '-T', script, '-z', 'noexecstack', '-z', 'max-page-size=4096', '-o', elf, obj]);
  log(`built: ${elf} (${statSync(elf).size} bytes)`);
  return elf;
}

/**
 * Guests written in C on the freestanding runtime in guests/rt/ (see rt/rt.h): name ->
 * { sources: C files in guests/ }. Each becomes guests/build/<name>.elf, an ELF64 linked at
 * 1 MiB by rt/rt.ld with rt/crt0.S and every rt/*.c; a change to any file in rt/ rebuilds it.
 */
export const C_GUESTS = {
  disk: { sources: ['disk.c'] },
  'pc-ports': { sources: ['pc-ports.c'] },
  fwcfg: { sources: ['fwcfg.c'] },
  'pc-tables': { sources: ['pc-tables.c'] },
  rtc: { sources: ['rtc.c'] },
  rng: { sources: ['rng.c'] },
  'net-echo': { sources: ['net-echo.c'] },
  'vsock-echo': { sources: ['vsock-echo.c'] },
};

const RT_DIR = join(GUESTS_DIR, 'rt');
const C_GUEST_FLAGS = [
  '-ffreestanding', '-nostdlib', '-fno-pic', '-fno-pie', '-mno-red-zone', '-mno-sse', '-mno-mmx',
  '-mgeneral-regs-only', '-fno-stack-protector', '-O2', '-m64', '-static', '-std=gnu11', '-Wall', '-Wextra',
  // No .eh_frame: nothing unwinds, and rt.ld has no place for it.
  '-fno-asynchronous-unwind-tables', '-fno-unwind-tables',
  '-I', GUESTS_DIR, `-Wa,-I,${INCLUDE_DIR}`,
];

function buildCGuest(name, { sources }, { force, log }) {
  const elf = guestPath(name);
  const rtFiles = readdirSync(RT_DIR).map((f) => join(RT_DIR, f));
  const compiled = [join(RT_DIR, 'crt0.S'), ...rtFiles.filter((f) => f.endsWith('.c')).sort(), ...sources.map((f) => join(GUESTS_DIR, f))];
  if (!force && isNewer(elf, [...compiled, ...rtFiles, ...includeFiles(), fileURLToPath(import.meta.url)])) {
    log(`up to date: ${elf}`);
    return elf;
  }
  const objects = compiled.map((src) => {
    const obj = join(BUILD_DIR, `${name}-${src.slice(src.lastIndexOf('/') + 1).replace(/\.[cS]$/, '')}.o`);
    run('gcc', [...C_GUEST_FLAGS, '-c', '-o', obj, src]);
    return obj;
  });
  run('ld', ['-m', 'elf_x86_64', '-T', join(RT_DIR, 'rt.ld'), '-z', 'noexecstack', '-z', 'max-page-size=4096', '-o', elf, ...objects]);
  log(`built: ${elf} (${statSync(elf).size} bytes)`);
  return elf;
}

/**
 * Build all out-of-date guests. Returns { name: binPath } for every guest.
 * Throws on the first failure.
 */
export function buildGuests({ force = false, log = () => {} } = {}) {
  mkdirSync(BUILD_DIR, { recursive: true });
  const result = {};
  const elfSources = new Set(Object.entries(ELF_GUESTS).map(([name, spec]) => spec.source ?? `${name}.S`));
  const sources = readdirSync(GUESTS_DIR).filter((f) => f.endsWith('.S') && !elfSources.has(f)).sort();
  for (const [name, spec] of Object.entries(ELF_GUESTS)) result[name] = buildElfGuest(name, spec, { force, log });
  for (const name of Object.keys(BZIMAGE_GUESTS)) result[name] = buildBzImageGuest(name, { force, log });
  for (const [name, spec] of Object.entries(C_GUESTS)) result[name] = buildCGuest(name, spec, { force, log });
  for (const src of sources) {
    const name = src.slice(0, -2);
    if (Object.hasOwn(BZIMAGE_GUESTS, name)) continue;
    const srcPath = join(GUESTS_DIR, src);
    const obj = join(BUILD_DIR, `${name}.o`);
    // The linked intermediate: not an image of its own (guestImages() in lib/boot/guests.ts and
    // the package's files leave *.bin.elf out).
    const elf = join(BUILD_DIR, `${name}.bin.elf`);
    const bin = guestPath(name);
    rmSync(join(BUILD_DIR, `${name}.elf`), { force: true }); // its name before
    result[name] = bin;
    if (!force && isNewer(bin, [srcPath, ...includeFiles()])) {
      log(`up to date: ${bin}`);
      continue;
    }
    run('as', ['--32', '-I', INCLUDE_DIR, '-o', obj, srcPath]);
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
