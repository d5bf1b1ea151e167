// Looking into a machine without a debugger attached: a vCPU's registers (as QEMU's `info
// registers` prints them) and guest memory by virtual address (through the vCPU's page tables,
// translate.ts) or physical address. A running machine is stopped quietly for the moment of the
// read (machineInternals().stopped(): no 'paused' or 'resumed' event, its state stays 'running')
// and runs on after; a paused one stays paused.
import { argTypeError, argValueError, outOfRangeError } from '../kvm/errors.js';
import type { Regs, Sregs, Segment } from '../kvm/index.js';
import { machineStateError } from '../vmm/errors.js';
import { machineInternals, type Machine } from '../vmm/machine.js';
import { mapLinear, pagingMode, type PagingMode } from './translate.js';

/** The most bytes one readGuestMemory() (or `x`) returns. */
export const MAX_INSPECT_BYTES = 1024 * 1024;

/** A vCPU's general and special registers, as readRegisters() reads them from a running or paused machine. */
export interface InspectedRegisters {
  vcpu: number;
  regs: Regs;
  sregs: Sregs;
}

function checkVcpu(machine: Machine, vcpu: unknown): number {
  if (typeof vcpu !== 'number' || !Number.isInteger(vcpu)) throw argTypeError('vcpu must be an integer');
  if (vcpu < 0 || vcpu >= machine.vcpuCount) throw outOfRangeError(`no vCPU ${vcpu}: the machine has ${machine.vcpuCount} (0..${machine.vcpuCount - 1})`);
  return vcpu;
}

async function vcpuState(machine: Machine, vcpu: number): Promise<InspectedRegisters> {
  const reply = await machineInternals(machine).vcpuRequest(vcpu, { type: 'debug-read' });
  if (reply.type === 'failed') throw machineStateError(`vCPU ${vcpu}: ${reply.error}`);
  if (reply.type !== 'debug-state') throw machineStateError(`vCPU ${vcpu} did not give its registers`);
  return { vcpu, regs: reply.regs, sregs: reply.sregs };
}

function checkLive(machine: Machine): void {
  const state = machine.state;
  if (state === 'stopping' || state === 'stopped') throw machineStateError(`machine is ${state}: there is nothing left to inspect`);
}

/** A vCPU's general, segment and control registers, read from the vCPU (the machine running or paused). */
export async function readRegisters(machine: Machine, vcpu = 0): Promise<InspectedRegisters> {
  checkVcpu(machine, vcpu);
  checkLive(machine);
  return machineInternals(machine).stopped(() => vcpuState(machine, vcpu));
}

/** How readGuestMemory() reads: through which vCPU's page tables, or guest-physical. */
export interface ReadMemoryOptions {
  /** Whose page tables translate a virtual address. Default 0. */
  vcpu?: number;
  /** `address` is guest-physical. Default false: virtual, through the vCPU's page tables. */
  physical?: boolean;
}

/**
 * `length` bytes of guest memory at `address` (virtual by default, see ReadMemoryOptions); at
 * most MAX_INSPECT_BYTES. An address not mapped, or mapped or lying outside guest RAM, is refused
 * (ERR_OUT_OF_RANGE) with the first address that is.
 */
export async function readGuestMemory(machine: Machine, address: bigint | number, length: number, options: ReadMemoryOptions = {}): Promise<Buffer> {
  if (typeof options !== 'object' || options === null) throw argTypeError('options must be an object');
  const vcpu = checkVcpu(machine, options.vcpu ?? 0);
  if (typeof address === 'number') {
    if (!Number.isSafeInteger(address) || address < 0) throw outOfRangeError(`address ${address} is not a non-negative integer`);
    address = BigInt(address);
  }
  if (typeof address !== 'bigint') throw argTypeError('address must be a bigint or a number');
  if (address < 0n || address > 0xffffffffffffffffn) throw outOfRangeError(`address 0x${address.toString(16)} is not a 64-bit address`);
  if (typeof length !== 'number' || !Number.isInteger(length)) throw argTypeError('length must be an integer');
  if (length < 1 || length > MAX_INSPECT_BYTES) throw outOfRangeError(`length ${length} is out of range 1..${MAX_INSPECT_BYTES}`);
  checkLive(machine);
  const memory = machine.memory;
  const start = address;
  if (options.physical) {
    if (start + BigInt(length) > BigInt(memory.size)) {
      throw outOfRangeError(`guest-physical 0x${start.toString(16)}..0x${(start + BigInt(length) - 1n).toString(16)} is outside guest RAM (0..0x${(memory.size - 1).toString(16)})`);
    }
    return Buffer.from(memory.bytes(Number(start), length));
  }
  return machineInternals(machine).stopped(async () => {
    const { sregs } = await vcpuState(machine, vcpu);
    const mapped = mapLinear(start, length, sregs, memory);
    if ('unmapped' in mapped) throw outOfRangeError(`virtual address 0x${mapped.unmapped.toString(16)} is not mapped (vCPU ${vcpu}, ${describePaging(pagingMode(sregs))})`);
    const out = Buffer.alloc(length);
    let done = 0;
    for (const [physical, bytes] of mapped.pieces) {
      out.set(memory.bytes(physical, bytes), done);
      done += bytes;
    }
    return out;
  });
}

function describePaging(mode: PagingMode): string {
  return mode === 'none' ? 'paging off' : `${mode} paging`;
}

const hex = (value: bigint | number, digits: number) => BigInt(value).toString(16).padStart(digits, '0');

/** RFLAGS bits by name, as QEMU shows the arithmetic ones in `info registers`. */
const FLAG_NAMES: [number, string][] = [
  [0, 'CF'], [2, 'PF'], [4, 'AF'], [6, 'ZF'], [7, 'SF'], [8, 'TF'], [9, 'IF'], [10, 'DF'], [11, 'OF'],
  [14, 'NT'], [16, 'RF'], [17, 'VM'], [18, 'AC'], [19, 'VIF'], [20, 'VIP'], [21, 'ID'],
];

/** The set RFLAGS bits by name, with IOPL: e.g. 'IF ZF IOPL=0'. */
export function decodeRflags(rflags: bigint): string {
  const set = FLAG_NAMES.filter(([bit]) => (rflags >> BigInt(bit)) & 1n).map(([, name]) => name);
  return [...set, `IOPL=${Number((rflags >> 12n) & 3n)}`].join(' ');
}

/** A segment's descriptor attributes as the GDT entry's bits 8..23 hold them (QEMU's third column). */
function segmentAttributes(segment: Segment): number {
  return (segment.type | (segment.s << 4) | (segment.dpl << 5) | (segment.present << 7) | (segment.avl << 12) | (segment.l << 13) | (segment.db << 14) | (segment.g << 15)) << 8;
}

function describeSegment(segment: Segment, efer: bigint): string {
  if (segment.unusable || !segment.present) return 'unusable';
  if (!segment.s) return `DPL=${segment.dpl} system type ${segment.type}`;
  const code = (segment.type & 8) !== 0;
  const width = segment.l && (efer & (1n << 10n)) !== 0n ? '64' : segment.db ? '32' : '16';
  const bits = code
    ? `${segment.type & 4 ? 'C' : '-'}${segment.type & 2 ? 'R' : '-'}${segment.type & 1 ? 'A' : '-'}`
    : `${segment.type & 4 ? 'E' : '-'}${segment.type & 2 ? 'W' : '-'}${segment.type & 1 ? 'A' : '-'}`;
  return `DPL=${segment.dpl} ${code ? 'CS' : 'DS'}${width} [${bits}]`;
}

/** The registers as QEMU's `info registers` prints them (general, RIP, RFLAGS, segments, tables, control). */
export function formatRegisters(state: InspectedRegisters): string {
  const { regs, sregs } = state;
  const row = (names: [string, bigint][]) => names.map(([name, value]) => `${name.padEnd(3)}=${hex(value, 16)}`).join(' ');
  const cpl = sregs.cs.dpl;
  const lines = [
    `vCPU ${state.vcpu} (${describePaging(pagingMode(sregs))})`,
    row([['RAX', regs.rax], ['RBX', regs.rbx], ['RCX', regs.rcx], ['RDX', regs.rdx]]),
    row([['RSI', regs.rsi], ['RDI', regs.rdi], ['RBP', regs.rbp], ['RSP', regs.rsp]]),
    row([['R8', regs.r8], ['R9', regs.r9], ['R10', regs.r10], ['R11', regs.r11]]),
    row([['R12', regs.r12], ['R13', regs.r13], ['R14', regs.r14], ['R15', regs.r15]]),
    `RIP=${hex(regs.rip, 16)} RFL=${hex(regs.rflags, 8)} [${decodeRflags(regs.rflags)}] CPL=${cpl}`,
  ];
  const segments = ['es', 'cs', 'ss', 'ds', 'fs', 'gs', 'ldt', 'tr'] as const;
  for (const name of segments) {
    const segment = sregs[name];
    const label = name === 'ldt' ? 'LDT' : name.toUpperCase().padEnd(3);
    lines.push(`${label}=${hex(segment.selector, 4)} ${hex(segment.base, 16)} ${hex(segment.limit, 8)} ${hex(segmentAttributes(segment), 8)} ${describeSegment(segment, sregs.efer)}`);
  }
  lines.push(`GDT=     ${hex(sregs.gdt.base, 16)} ${hex(sregs.gdt.limit, 8)}`);
  lines.push(`IDT=     ${hex(sregs.idt.base, 16)} ${hex(sregs.idt.limit, 8)}`);
  lines.push(`CR0=${hex(sregs.cr0, 8)} CR2=${hex(sregs.cr2, 16)} CR3=${hex(sregs.cr3, 16)} CR4=${hex(sregs.cr4, 8)}`);
  lines.push(`CR8=${hex(sregs.cr8, 16)} EFER=${hex(sregs.efer, 16)} APIC_BASE=${hex(sregs.apicBase, 16)}`);
  return `${lines.join('\n')}\n`;
}

/** A hex and ASCII dump, 16 bytes a line, each line starting with its address. */
export function hexDump(address: bigint, bytes: Uint8Array): string {
  const lines: string[] = [];
  const width = address + BigInt(bytes.length) > 0xffffffffn ? 16 : 8;
  for (let at = 0; at < bytes.length; at += 16) {
    const line = bytes.subarray(at, at + 16);
    const hexes = [...line].map((byte) => hex(byte, 2));
    const left = hexes.slice(0, 8).join(' ');
    const right = hexes.slice(8).join(' ');
    const ascii = [...line].map((byte) => (byte >= 0x20 && byte < 0x7f ? String.fromCharCode(byte) : '.')).join('');
    lines.push(`${hex(address + BigInt(at), width)}  ${left.padEnd(23)}  ${right.padEnd(23)}  |${ascii}|`);
  }
  return lines.length ? `${lines.join('\n')}\n` : '';
}

/** Parses an address or length as the commands take it: decimal, or hex with 0x. */
export function parseNumber(text: string, what: string): bigint {
  if (typeof text !== 'string' || !/^(0x[0-9a-f]+|\d+)$/i.test(text.trim())) throw argValueError(`${what} '${text}' must be a number (decimal, or hex with 0x)`);
  return BigInt(text.trim());
}
