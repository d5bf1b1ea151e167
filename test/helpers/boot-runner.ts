// Boots a guest the way the VMM does, on the raw binding and the calling thread: planBoot(),
// a VM with all RAM in slot 0, writeBootPlan(), vCPU 0 with guestCpuid() then bootMsrs(), then
// applyBootState(). runGuest() handles the two devices test guests use: COM1 output and the
// debug-exit port.
import { existsSync, readFileSync } from 'node:fs';
import path from 'node:path';
import {
  applyBootState, bootMsrs, guestCpuid, planBoot, writeBootPlan, type BootPlan, type CpuMode,
} from '../../lib/boot/index.js';
import { ExitReason, GuestMemory, IoDirection, Kvm, type Vcpu, type Vm } from '../../lib/index.js';
import { bigintJson, COM1, repoRoot } from './kvm.js';

export const DEBUG_EXIT_PORT = 0xf4;
/** Where the VMM tells KVM it may put the real-mode TSS and the EPT identity map (Intel). */
const TSS_ADDR = 0xfffbd000;
const IDENTITY_MAP_ADDR = 0xfffbc000;

/** A guest ELF kernel built by guests/build.mjs (guests/build/<name>.elf). */
export function elfGuest(name: string): Uint8Array {
  const file = path.join(repoRoot, 'guests', 'build', `${name}.elf`);
  if (!existsSync(file)) throw new Error(`guest ${name} is not built (${file}); run npm run build:guests`);
  return readFileSync(file);
}

export interface BootOptions {
  memoryBytes?: number;
  mode?: CpuMode;
  loadAddr?: number;
  cmdline?: string;
  /** Create the in-kernel irqchip (before any vCPU). */
  irqchip?: boolean;
  /** vCPUs the guest is told about (CPUID topology); only vCPU 0 is created here. */
  vcpus?: number;
  /** Runs after the plan is written and before vCPU 0 is created (e.g. to set guest parameters). */
  setup?: (memory: GuestMemory, vm: Vm) => void;
}

export interface BootedGuest {
  kvm: Kvm;
  vm: Vm;
  memory: GuestMemory;
  plan: BootPlan;
  vcpu: Vcpu;
  close(): void;
}

export function bootGuest(image: Uint8Array, options: BootOptions = {}): BootedGuest {
  const memoryBytes = options.memoryBytes ?? 64 << 20;
  const vcpus = options.vcpus ?? 1;
  const plan = planBoot(image, { memoryBytes, vcpus, mode: options.mode, loadAddr: options.loadAddr, cmdline: options.cmdline });
  const kvm = Kvm.open();
  const vm = kvm.createVm();
  const memory = GuestMemory.create(memoryBytes);
  const close = () => {
    vm.close();
    memory.close();
    kvm.close();
  };
  try {
    vm.setTssAddr(TSS_ADDR);
    vm.setIdentityMapAddr(IDENTITY_MAP_ADDR);
    if (options.irqchip) vm.createIrqChip();
    vm.setUserMemoryRegion({ slot: 0, guestPhysAddr: 0, memory });
    writeBootPlan(plan, memory);
    options.setup?.(memory, vm);
    const vcpu = vm.createVcpu(0);
    vcpu.setCpuid2(guestCpuid(kvm.getSupportedCpuid(), 0, vcpus));
    vcpu.setMsrs(bootMsrs());
    applyBootState(vcpu, plan.bsp);
    return {
      kvm, vm, memory, plan, vcpu,
      close() {
        vcpu.close();
        close();
      },
    };
  } catch (error) {
    close();
    throw error;
  }
}

/**
 * Console bytes from several vCPU threads, kept in the order the guest wrote them: each vCPU
 * thread appends a byte while its vCPU is stopped on that `out`.
 */
export class SharedConsole {
  readonly buffer: SharedArrayBuffer;
  readonly #length: Int32Array;
  readonly #bytes: Uint8Array;

  constructor(buffer: SharedArrayBuffer = new SharedArrayBuffer(4 + 64 * 1024)) {
    this.buffer = buffer;
    this.#length = new Int32Array(buffer, 0, 1);
    this.#bytes = new Uint8Array(buffer, 4);
  }

  append(byte: number): void {
    const at = Atomics.add(this.#length, 0, 1);
    if (at < this.#bytes.length) this.#bytes[at] = byte;
  }

  get text(): string {
    const length = Math.min(Atomics.load(this.#length, 0), this.#bytes.length);
    return Buffer.from(this.#bytes.slice(0, length)).toString('latin1');
  }
}

export type GuestEnd = { reason: 'debug-exit'; code: number } | { reason: 'hlt' } | { reason: 'stopped' };

export interface GuestRun {
  /** Bytes written to COM1, as latin1. */
  output: string;
  end: GuestEnd;
}

/**
 * Runs until the guest writes the debug-exit port or halts. COM1 writes are collected; reads of
 * any port return all-ones; other writes are ignored. Any other exit throws with the register
 * state.
 */
export interface RunOptions {
  /** Sees the output so far after each COM1 byte, while the vCPU is stopped on it. */
  onOutput?: (output: string) => void;
  /** Ends the run (reason 'stopped') once this returns true for the output so far. */
  stopWhen?: (output: string) => boolean;
  /** Also appends COM1 bytes here. */
  console?: SharedConsole;
}

export function runGuest(vcpu: Vcpu, options: RunOptions = {}): GuestRun {
  const run = vcpu.kvmRun;
  let output = '';
  for (;;) {
    const reason = vcpu.run();
    if (reason === ExitReason.Hlt) return { output, end: { reason: 'hlt' } };
    if (reason === ExitReason.Io) {
      const data = run.bytes.subarray(run.ioDataOffset, run.ioDataOffset + run.ioSize * run.ioCount);
      if (run.ioDirection === IoDirection.In) {
        data.fill(0xff);
      } else if (run.ioPort === COM1) {
        output += Buffer.from(data).toString('latin1');
        for (const byte of data) options.console?.append(byte);
        options.onOutput?.(output);
        if (options.stopWhen?.(output)) return { output, end: { reason: 'stopped' } };
      } else if (run.ioPort === DEBUG_EXIT_PORT) {
        return { output, end: { reason: 'debug-exit', code: data[0]! } };
      }
      continue;
    }
    if (reason === ExitReason.Intr) continue;
    throw new Error(`unexpected exit ${JSON.stringify(vcpu.exit(), bigintJson)} after output ${JSON.stringify(output)}; ` +
      `regs ${JSON.stringify(vcpu.getRegs(), bigintJson)} sregs ${JSON.stringify(vcpu.getSregs(), bigintJson)}`);
  }
}
