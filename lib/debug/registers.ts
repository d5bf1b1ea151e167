// The registers gdb sees, as a target description (gdb's manual, "Target Descriptions" and the
// i386 features it knows: org.gnu.gdb.i386.core, .sse, .segments) and as the `g` packet's bytes,
// in the description's order, each little-endian.
//
// Which description: the vCPU's mode when the debugger asks for it (once per connection, as gdb
// reads it once). Long mode active (EFER.LMA) gives i386:x86-64; anything else, protected or real
// mode, the 32-bit i386 layout (gdb has no 16-bit x86: in real mode eip is the offset in CS, and
// addresses gdb sends are taken as linear, translate.ts). The control registers gdb shows for
// QEMU (cr0, cr2, cr3, cr4, cr8, efer) are a feature of their own, org.gnu.gdb.i386.sys.
import type { Fpu, Regs, Sregs } from '../kvm/index.js';

/** Everything a debugger reads of a vCPU: general, special, FPU/SSE and debug registers. */
export interface VcpuRegisters {
  regs: Regs;
  sregs: Sregs;
  fpu: Fpu;
}

/** The architecture a debugger is told the target has: x86-64, or i386 for a guest in 32-bit mode. */
export type TargetArch = 'i386:x86-64' | 'i386';

type Segment = 'cs' | 'ss' | 'ds' | 'es' | 'fs' | 'gs';
type ControlRegister = 'cr0' | 'cr2' | 'cr3' | 'cr4' | 'cr8' | 'efer';

interface RegisterDef {
  name: string;
  bits: number;
  type: string;
  feature: 'core' | 'sse' | 'segments' | 'sys';
  read(state: VcpuRegisters): bigint;
  write(state: VcpuRegisters, value: bigint): void;
}

const mask = (bits: number) => (1n << BigInt(bits)) - 1n;
/** Replaces the low `bits` of `old` with `value`. */
const merge = (old: bigint, value: bigint, bits: number) => (old & ~mask(bits)) | (value & mask(bits));

const GPRS_64 = ['rax', 'rbx', 'rcx', 'rdx', 'rsi', 'rdi', 'rbp', 'rsp', 'r8', 'r9', 'r10', 'r11', 'r12', 'r13', 'r14', 'r15'] as const;
/** gdb's i386 order, each the low half of the 64-bit register named beside it. */
const GPRS_32 = [['eax', 'rax'], ['ecx', 'rcx'], ['edx', 'rdx'], ['ebx', 'rbx'], ['esp', 'rsp'], ['ebp', 'rbp'], ['esi', 'rsi'], ['edi', 'rdi']] as const;
const SEGMENTS: readonly Segment[] = ['cs', 'ss', 'ds', 'es', 'fs', 'gs'];
const CONTROL: readonly ControlRegister[] = ['cr0', 'cr2', 'cr3', 'cr4', 'cr8', 'efer'];

function gpr(name: string, field: keyof Regs, bits: number, type = `int${bits}`): RegisterDef {
  return {
    name, bits, type, feature: 'core',
    read: (s) => s.regs[field] & mask(bits),
    write: (s, v) => void (s.regs[field] = merge(s.regs[field], v, bits)),
  };
}

/** The 80-bit value of ST(i): FXSAVE keeps the stack in ST order, 16 bytes a register. */
function stRegister(i: number): RegisterDef {
  return {
    name: `st${i}`, bits: 80, type: 'i387_ext', feature: 'core',
    read: (s) => readLittle(s.fpu.fpr, i * 16, 10),
    write: (s, v) => writeLittle(s.fpu.fpr, i * 16, 10, v),
  };
}

function fpuControl(): RegisterDef[] {
  const u32 = (name: string, read: (f: Fpu) => bigint, write: (f: Fpu, v: bigint) => void): RegisterDef => ({
    name, bits: 32, type: 'int', feature: 'core', read: (s) => read(s.fpu), write: (s, v) => write(s.fpu, v),
  });
  return [
    u32('fctrl', (f) => BigInt(f.fcw), (f, v) => void (f.fcw = Number(v & 0xffffn))),
    u32('fstat', (f) => BigInt(f.fsw), (f, v) => void (f.fsw = Number(v & 0xffffn))),
    u32('ftag', (f) => BigInt(fullTagWord(f)), (f, v) => void (f.ftwx = abridgedTagWord(Number(v & 0xffffn)))),
    // The last instruction's and operand's address: segment in bits 32-47, offset below (as QEMU shows them).
    u32('fiseg', (f) => (f.lastIp >> 32n) & 0xffffn, (f, v) => void (f.lastIp = ((v & 0xffffn) << 32n) | (f.lastIp & 0xffffffffn))),
    u32('fioff', (f) => f.lastIp & 0xffffffffn, (f, v) => void (f.lastIp = merge(f.lastIp, v, 32))),
    u32('foseg', (f) => (f.lastDp >> 32n) & 0xffffn, (f, v) => void (f.lastDp = ((v & 0xffffn) << 32n) | (f.lastDp & 0xffffffffn))),
    u32('fooff', (f) => f.lastDp & 0xffffffffn, (f, v) => void (f.lastDp = merge(f.lastDp, v, 32))),
    u32('fop', (f) => BigInt(f.lastOpcode & 0x7ff), (f, v) => void (f.lastOpcode = Number(v & 0x7ffn))),
  ];
}

function sse(count: number): RegisterDef[] {
  const xmm = Array.from({ length: count }, (_, i): RegisterDef => ({
    name: `xmm${i}`, bits: 128, type: 'vec128', feature: 'sse',
    read: (s) => readLittle(s.fpu.xmm, i * 16, 16),
    write: (s, v) => writeLittle(s.fpu.xmm, i * 16, 16, v),
  }));
  return [...xmm, {
    name: 'mxcsr', bits: 32, type: 'i386_mxcsr', feature: 'sse',
    read: (s) => BigInt(s.fpu.mxcsr >>> 0), write: (s, v) => void (s.fpu.mxcsr = Number(v & 0xffffffffn)),
  }];
}

function segmentSelectors(): RegisterDef[] {
  // A selector written from gdb changes the selector only: the hidden part (base, limit) stays.
  return SEGMENTS.map((segment) => ({
    name: segment, bits: 32, type: 'int32', feature: 'core',
    read: (s) => BigInt(s.sregs[segment].selector), write: (s, v) => void (s.sregs[segment].selector = Number(v & 0xffffn)),
  }));
}

function segmentBases(): RegisterDef[] {
  return (['fs', 'gs'] as const).map((segment) => ({
    name: `${segment}_base`, bits: 64, type: 'int64', feature: 'segments',
    read: (s) => s.sregs[segment].base, write: (s, v) => void (s.sregs[segment].base = v),
  }));
}

function controlRegisters(): RegisterDef[] {
  return CONTROL.map((name) => ({
    name, bits: 64, type: 'int64', feature: 'sys', read: (s) => s.sregs[name], write: (s, v) => void (s.sregs[name] = v),
  }));
}

const REGISTERS: Record<TargetArch, readonly RegisterDef[]> = {
  'i386:x86-64': [
    ...GPRS_64.map((name) => gpr(name, name, 64, name === 'rbp' || name === 'rsp' ? 'data_ptr' : 'int64')),
    gpr('rip', 'rip', 64, 'code_ptr'),
    gpr('eflags', 'rflags', 32, 'i386_eflags'),
    ...segmentSelectors(),
    ...Array.from({ length: 8 }, (_, i) => stRegister(i)),
    ...fpuControl(),
    ...sse(16),
    ...segmentBases(),
    ...controlRegisters(),
  ],
  i386: [
    ...GPRS_32.map(([name, field]) => gpr(name, field, 32, name === 'esp' || name === 'ebp' ? 'data_ptr' : 'int32')),
    gpr('eip', 'rip', 32, 'code_ptr'),
    gpr('eflags', 'rflags', 32, 'i386_eflags'),
    ...segmentSelectors(),
    ...Array.from({ length: 8 }, (_, i) => stRegister(i)),
    ...fpuControl(),
    ...sse(8),
    // No org.gnu.gdb.i386.segments: gdb 13 with its default GNU/Linux OS ABI fails an internal
    // assertion on an i386 description that has one (fs_base and gs_base are 0 in 32-bit kernels
    // anyway, and the control registers are here).
    ...controlRegisters(),
  ],
};

/** How many registers the description of `arch` has (the `p`/`P` numbers run 0 to this - 1). */
export function registerCount(arch: TargetArch): number {
  return REGISTERS[arch].length;
}

export function registerNames(arch: TargetArch): string[] {
  return REGISTERS[arch].map((r) => r.name);
}

/** The description for a vCPU in this state: x86-64 once long mode is active, i386 otherwise. */
export function archFor(sregs: Sregs): TargetArch {
  const EFER_LMA = 1n << 10n;
  return (sregs.efer & EFER_LMA) !== 0n ? 'i386:x86-64' : 'i386';
}

/** The `g` packet's reply: every register in order, as hex. */
export function encodeRegisters(arch: TargetArch, state: VcpuRegisters): string {
  return REGISTERS[arch].map((r) => encodeValue(r.read(state), r.bits)).join('');
}

/**
 * Applies a `G` packet's hex to `state`; a shorter packet sets the registers it covers (gdb's
 * manual allows it). Returns false, changing nothing, for hex that is not whole registers.
 */
export function decodeRegisters(arch: TargetArch, state: VcpuRegisters, hex: string): boolean {
  if (!/^[0-9a-fA-F]*$/.test(hex)) return false;
  const writes: [RegisterDef, bigint][] = [];
  let offset = 0;
  for (const r of REGISTERS[arch]) {
    if (offset >= hex.length) break;
    const digits = r.bits / 4;
    if (offset + digits > hex.length) return false;
    writes.push([r, decodeValue(hex.slice(offset, offset + digits))]);
    offset += digits;
  }
  if (offset !== hex.length) return false;
  for (const [r, value] of writes) r.write(state, value);
  return true;
}

/** `p N`: one register's hex, or null for a number the description does not have. */
export function encodeRegister(arch: TargetArch, state: VcpuRegisters, number: number): string | null {
  const r = REGISTERS[arch][number];
  return r ? encodeValue(r.read(state), r.bits) : null;
}

/** `P N=V`: false for an unknown number or a value of the wrong width. */
export function decodeRegister(arch: TargetArch, state: VcpuRegisters, number: number, hex: string): boolean {
  const r = REGISTERS[arch][number];
  if (!r || hex.length !== r.bits / 4 || !/^[0-9a-fA-F]*$/.test(hex)) return false;
  r.write(state, decodeValue(hex));
  return true;
}

function encodeValue(value: bigint, bits: number): string {
  const bytes = new Uint8Array(bits / 8);
  writeLittle(bytes, 0, bytes.length, value);
  return Buffer.from(bytes).toString('hex');
}

function decodeValue(hex: string): bigint {
  return readLittle(Buffer.from(hex, 'hex'), 0, hex.length / 2);
}

function readLittle(bytes: Uint8Array, offset: number, length: number): bigint {
  let value = 0n;
  for (let i = length - 1; i >= 0; i--) value = (value << 8n) | BigInt(bytes[offset + i]!);
  return value;
}

function writeLittle(bytes: Uint8Array, offset: number, length: number, value: bigint): void {
  for (let i = 0; i < length; i++) bytes[offset + i] = Number((value >> BigInt(8 * i)) & 0xffn);
}

/**
 * The x87 tag word gdb shows (two bits per physical register: 0 valid, 1 zero, 2 special,
 * 3 empty) from FXSAVE's abridged one (a bit per physical register: set = not empty). Physical
 * register p is ST((p - TOP) mod 8).
 */
export function fullTagWord(fpu: Fpu): number {
  const top = (fpu.fsw >> 11) & 7;
  let tags = 0;
  for (let physical = 0; physical < 8; physical++) {
    let tag = 3;
    if (fpu.ftwx & (1 << physical)) {
      const st = (physical - top + 8) & 7;
      const exponent = Number(readLittle(fpu.fpr, st * 16 + 8, 2) & 0x7fffn);
      const significand = readLittle(fpu.fpr, st * 16, 8);
      if (exponent === 0x7fff) tag = 2;
      else if (exponent === 0) tag = significand === 0n ? 1 : 2;
      else tag = significand >> 63n ? 0 : 2;
    }
    tags |= tag << (physical * 2);
  }
  return tags;
}

/** The abridged tag byte for a full tag word: a register is kept unless tagged empty (3). */
export function abridgedTagWord(tags: number): number {
  let abridged = 0;
  for (let physical = 0; physical < 8; physical++) if (((tags >> (physical * 2)) & 3) !== 3) abridged |= 1 << physical;
  return abridged;
}

const EFLAGS_FIELDS = [
  ['CF', 0], ['', 1], ['PF', 2], ['AF', 4], ['ZF', 6], ['SF', 7], ['TF', 8], ['IF', 9], ['DF', 10], ['OF', 11],
  ['NT', 14], ['RF', 16], ['VM', 17], ['AC', 18], ['VIF', 19], ['VIP', 20], ['ID', 21],
] as const;
const MXCSR_FIELDS = [
  ['IE', 0], ['DE', 1], ['ZE', 2], ['OE', 3], ['UE', 4], ['PE', 5], ['DAZ', 6], ['IM', 7], ['DM', 8], ['ZM', 9],
  ['OM', 10], ['UM', 11], ['PM', 12], ['FZ', 15],
] as const;

const flags = (id: string, fields: readonly (readonly [string, number])[]) =>
  `<flags id="${id}" size="4">${fields.map(([name, bit]) => `<field name="${name}" start="${bit}" end="${bit}"/>`).join('')}</flags>`;

const VEC128 =
  '<vector id="v4f" type="ieee_single" count="4"/><vector id="v2d" type="ieee_double" count="2"/>' +
  '<vector id="v16i8" type="int8" count="16"/><vector id="v8i16" type="int16" count="8"/>' +
  '<vector id="v4i32" type="int32" count="4"/><vector id="v2i64" type="int64" count="2"/>' +
  '<union id="vec128"><field name="v4_float" type="v4f"/><field name="v2_double" type="v2d"/>' +
  '<field name="v16_int8" type="v16i8"/><field name="v8_int16" type="v8i16"/><field name="v4_int32" type="v4i32"/>' +
  '<field name="v2_int64" type="v2i64"/><field name="uint128" type="uint128"/></union>';

const FEATURES = {
  core: { name: 'org.gnu.gdb.i386.core', types: flags('i386_eflags', EFLAGS_FIELDS) },
  sse: { name: 'org.gnu.gdb.i386.sse', types: VEC128 + flags('i386_mxcsr', MXCSR_FIELDS) },
  segments: { name: 'org.gnu.gdb.i386.segments', types: '' },
  sys: { name: 'org.gnu.gdb.i386.sys', types: '' },
} as const;

/** target.xml for qXfer:features:read: one document, every feature inline (no xi:include). */
export function targetDescription(arch: TargetArch): string {
  const registers = REGISTERS[arch];
  // A feature gdb knows must hold its registers if present at all: an empty one is left out.
  const present = (Object.keys(FEATURES) as (keyof typeof FEATURES)[]).filter((key) => registers.some((r) => r.feature === key));
  const features = present.map((key) => {
    const regs = registers
      .map((r, number) => ({ r, number }))
      .filter(({ r }) => r.feature === key)
      .map(({ r, number }) => `<reg name="${r.name}" bitsize="${r.bits}" type="${r.type}" regnum="${number}"${r.feature === 'sse' && r.name !== 'mxcsr' ? ' group="vector"' : ''}/>`);
    return `<feature name="${FEATURES[key].name}">${FEATURES[key].types}${regs.join('')}</feature>`;
  });
  return `<?xml version="1.0"?><!DOCTYPE target SYSTEM "gdb-target.dtd"><target version="1.0"><architecture>${arch}</architecture>${features.join('')}</target>`;
}
