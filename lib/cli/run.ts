// `node-kvm run IMAGE`: boots a guest with its serial console on this terminal.
import { debugExitStatus } from '../devices/debug-exit.js';
import { Machine, type MachineExit } from '../vmm/machine.js';
import type { VcpuWorkerPool } from '../vmm/pool.js';
import type { CpuMode } from '../boot/index.js';

export const RUN_USAGE = `usage: node-kvm run IMAGE [options]

Boots IMAGE (a flat binary, ELF32, ELF64, Multiboot or PVH kernel) with its serial console (COM1)
on this terminal. Exits with the guest's debug-exit status ((value << 1) | 1, as QEMU's
isa-debug-exit), 0 when every vCPU halts with nothing left to run or the guest resets.
On a terminal, Ctrl-A x stops the guest.

options:
  --mode real|protected|long  entry mode for a flat binary (default real)
  --load-addr ADDR            load address of a flat binary (default 0x7c00)
  --memory SIZE               guest RAM, e.g. 64M, 1G (default 64M)
  --vcpus N                   number of vCPUs (default 1)
  --cmdline TEXT              kernel command line (Multiboot, PVH)
  -h, --help                  show this help`;

export interface RunOptions {
  image: string;
  mode?: string;
  loadAddr?: string;
  memory?: string;
  vcpus?: string;
  cmdline?: string;
}

export function parseSize(text: string): number {
  const match = /^(\d+)([KMG]?)i?B?$/i.exec(text.trim());
  if (!match) throw new RangeError(`--memory: '${text}' is not a size like 64M or 1G`);
  const unit = { '': 1, K: 1024, M: 1024 ** 2, G: 1024 ** 3 }[match[2]!.toUpperCase() as '' | 'K' | 'M' | 'G'];
  return Number(match[1]) * unit;
}

export function parseAddress(text: string, option: string): number {
  const value = /^0x[0-9a-f]+$/i.test(text) ? parseInt(text, 16) : /^\d+$/.test(text) ? Number(text) : NaN;
  if (!Number.isSafeInteger(value)) throw new RangeError(`${option}: '${text}' is not an address (decimal or 0x hex)`);
  return value;
}

/** Runs the machine; `pool` holds vCPU threads started early (closed here). */
export async function run(options: RunOptions, pool: Promise<VcpuWorkerPool>): Promise<number> {
  const threads = await pool;
  try {
    return await runWith(options, threads);
  } finally {
    await threads.close();
  }
}

async function runWith(options: RunOptions, pool: VcpuWorkerPool): Promise<number> {
  const mode = options.mode;
  if (mode !== undefined && mode !== 'real' && mode !== 'protected' && mode !== 'long') {
    throw new RangeError(`--mode must be real, protected or long, got '${mode}'`);
  }
  const vcpus = options.vcpus === undefined ? 1 : Number(options.vcpus);
  if (!Number.isInteger(vcpus) || vcpus < 1) throw new RangeError(`--vcpus must be a positive integer, got '${options.vcpus}'`);
  const stdin = process.stdin;
  const interactive = stdin.isTTY === true;
  const machine = await Machine.create({
    image: options.image,
    mode: mode as CpuMode | undefined,
    loadAddr: options.loadAddr === undefined ? undefined : parseAddress(options.loadAddr, '--load-addr'),
    memoryBytes: options.memory === undefined ? undefined : parseSize(options.memory),
    vcpus,
    cmdline: options.cmdline,
    serial: { output: 1, input: null },
    pool,
  });
  const exit = machine.wait();
  if (interactive) attachTerminal(machine);
  machine.start();
  const result = await exit;
  if (interactive) {
    stdin.setRawMode(false);
    stdin.pause();
  }
  return exitStatus(result);
}

/** Raw terminal input to the guest's COM1; Ctrl-A x stops the machine (as in QEMU). */
function attachTerminal(machine: Machine): void {
  const stdin = process.stdin;
  stdin.setRawMode(true);
  let escape = false;
  stdin.on('data', (chunk: Buffer) => {
    const forward: number[] = [];
    for (const byte of chunk) {
      if (escape) {
        escape = false;
        if (byte === 0x78 /* x */) {
          void machine.stop();
          return;
        }
        if (byte !== 0x01) forward.push(0x01);
      } else if (byte === 0x01) {
        escape = true;
        continue;
      }
      forward.push(byte);
    }
    machine.sendSerialInput(Uint8Array.from(forward));
  });
  stdin.resume();
}

export function exitStatus(exit: MachineExit): number {
  switch (exit.reason) {
    case 'debug-exit':
      return debugExitStatus(exit.code ?? 0);
    case 'hlt':
    case 'reset':
    case 'stopped':
      return 0;
    default:
      process.stderr.write(`node-kvm: guest stopped: ${exit.reason}${exit.vcpu === undefined ? '' : ` on vCPU ${exit.vcpu}`}${exit.detail ? ` (${exit.detail})` : ''}\n`);
      if (exit.registers) process.stderr.write(formatRegisters(exit.registers));
      return 1;
  }
}

export function formatRegisters(registers: NonNullable<MachineExit['registers']>): string {
  const hex = (v: bigint) => `0x${v.toString(16).padStart(16, '0')}`;
  const { regs, sregs } = registers;
  const lines = [
    `rip ${hex(regs.rip)} rflags ${hex(regs.rflags)} rsp ${hex(regs.rsp)} rbp ${hex(regs.rbp)}`,
    `rax ${hex(regs.rax)} rbx ${hex(regs.rbx)} rcx ${hex(regs.rcx)} rdx ${hex(regs.rdx)}`,
    `rsi ${hex(regs.rsi)} rdi ${hex(regs.rdi)} r8  ${hex(regs.r8)} r9  ${hex(regs.r9)}`,
    `cr0 ${hex(sregs.cr0)} cr2 ${hex(sregs.cr2)} cr3 ${hex(sregs.cr3)} cr4 ${hex(sregs.cr4)} efer ${hex(sregs.efer)}`,
    `cs ${sregs.cs.selector.toString(16).padStart(4, '0')} base ${hex(sregs.cs.base)} ss ${sregs.ss.selector.toString(16).padStart(4, '0')} gdt ${hex(sregs.gdt.base)}/${sregs.gdt.limit} idt ${hex(sregs.idt.base)}/${sregs.idt.limit}`,
  ];
  return lines.map((line) => `  ${line}\n`).join('');
}
