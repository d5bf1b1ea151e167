// Shared helpers for tests against the real /dev/kvm: whether to skip, guest images, and a
// standard real-mode machine.
import { existsSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { Test } from 'tap';
import { ExitReason, GuestMemory, IoDirection, Kvm, KvmError, type Vcpu, type Vm } from '../../lib/index.js';

export const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');

/** Why KVM tests must skip here, or false where /dev/kvm exists (they run). */
export const noKvm: string | false = existsSync('/dev/kvm') ? false : '/dev/kvm is absent on this host: KVM tests skipped';
if (noKvm) console.log(`# ${noKvm}`);

/** A guest built by guests/build.mjs. */
export function guestImage(name: string): Uint8Array {
  const file = path.join(repoRoot, 'guests', 'build', `${name}.bin`);
  if (!existsSync(file)) throw new Error(`guest ${name} is not built (${file}); run npm run build:guests`);
  return readFileSync(file);
}

export const LOAD_ADDR = 0x7c00;
export const COM1 = 0x3f8;

export interface RealModeMachine {
  kvm: Kvm;
  vm: Vm;
  memory: GuestMemory;
  vcpu: Vcpu;
  close(): void;
}

/**
 * A VM with `memoryBytes` of RAM at guest-physical 0 (slot 0), `image` loaded at 0x7c00, and
 * vCPU 0 in real mode at 0000:7c00.
 */
export function realModeMachine(image: Uint8Array, options: { memoryBytes?: number; setup?: (vm: Vm) => void } = {}): RealModeMachine {
  const kvm = Kvm.open();
  const vm = kvm.createVm();
  const memory = GuestMemory.create(options.memoryBytes ?? 1 << 20);
  vm.setUserMemoryRegion({ slot: 0, guestPhysAddr: 0, memory });
  memory.write(LOAD_ADDR, image);
  options.setup?.(vm);
  const vcpu = vm.createVcpu(0);
  enterRealMode(vcpu, LOAD_ADDR);
  return {
    kvm, vm, memory, vcpu,
    close() {
      vcpu.close();
      vm.close();
      memory.close();
      kvm.close();
    },
  };
}

export function enterRealMode(vcpu: Vcpu, ip: number): void {
  const sregs = vcpu.getSregs();
  for (const segment of [sregs.cs, sregs.ds, sregs.es, sregs.ss, sregs.fs, sregs.gs]) {
    segment.base = 0n;
    segment.selector = 0;
  }
  vcpu.setSregs(sregs);
  vcpu.setRegs({ ...vcpu.getRegs(), rip: BigInt(ip), rflags: 0x2n });
}

/**
 * Runs until HLT, collecting bytes written to COM1. Any other exit except port I/O fails;
 * `onIo` sees other port accesses.
 */
export function runToHalt(vcpu: Vcpu, onIo?: (port: number, direction: number, data: Uint8Array) => void): string {
  const run = vcpu.kvmRun;
  let output = '';
  for (;;) {
    const reason = vcpu.run();
    if (reason === ExitReason.Hlt) return output;
    if (reason !== ExitReason.Io) throw new Error(`unexpected exit ${JSON.stringify(vcpu.exit(), bigintJson)}`);
    const data = run.bytes.subarray(run.ioDataOffset, run.ioDataOffset + run.ioSize * run.ioCount);
    if (run.ioPort === COM1 && run.ioDirection === IoDirection.Out) output += Buffer.from(data).toString('latin1');
    else onIo?.(run.ioPort, run.ioDirection, data);
  }
}

export const bigintJson = (_: string, v: unknown) => (typeof v === 'bigint' ? `0x${v.toString(16)}` : v);

/** The error `fn` throws; fails the test if it returns. */
export function thrown(fn: () => unknown): unknown {
  try {
    fn();
  } catch (error) {
    return error;
  }
  throw new Error('expected a throw');
}

/** Asserts that `fn` throws a KvmError with these fields (and a message matching `message`). */
export function throwsKvm(t: Test, fn: () => unknown, expected: { code: string; errno?: number; syscall?: string; message?: RegExp }): void {
  const error = thrown(fn);
  t.type(error, KvmError, 'throws a KvmError');
  const { code, errno, syscall, message } = error as KvmError;
  t.equal(code, expected.code, `code ${expected.code}`);
  if (expected.errno !== undefined) t.equal(errno, expected.errno);
  if (expected.syscall !== undefined) t.equal(syscall, expected.syscall);
  if (expected.message) t.match(message, expected.message);
}

/** The class that comes with each argument error's code. */
const ARG_ERROR_CLASS = { ERR_INVALID_ARG_TYPE: TypeError, ERR_OUT_OF_RANGE: RangeError, ERR_INVALID_ARG_VALUE: RangeError } as const;
export type ArgErrorCode = keyof typeof ARG_ERROR_CLASS;

/**
 * Asserts that `fn` throws the argument error `code` (a TypeError for ERR_INVALID_ARG_TYPE, a
 * RangeError for ERR_OUT_OF_RANGE and ERR_INVALID_ARG_VALUE) with this message (exactly, for a string).
 */
export function throwsArgError(t: Test, fn: () => unknown, code: ArgErrorCode, message: string | RegExp): void {
  const error = thrown(fn);
  t.type(error, ARG_ERROR_CLASS[code], `a ${ARG_ERROR_CLASS[code].name}`);
  t.equal((error as { code?: unknown }).code, code, `code ${code}`);
  if (typeof message === 'string') t.equal((error as Error).message, message);
  else t.match((error as Error).message, message);
}
