// `node-kvm run`: boots a guest (or receives one by migration, or restores a snapshot) with its
// serial console on stdio (or where --serial says), optionally serving its control API.
import { closeSync, openSync, readSync } from 'node:fs';
import { constants as osConstants } from 'node:os';
import path from 'node:path';
import { debugExitStatus } from '../devices/debug-exit.js';
import { Machine, type DiskConfig, type NetConfig, type MachineExit, type MultibootModuleConfig } from '../vmm/machine.js';
import type { VcpuWorkerPool } from '../vmm/pool.js';
import type { CpuMode } from '../boot/index.js';
import { MULTIBOOT_SEARCH_BYTES, isMultibootKernel } from '../boot/multiboot.js';
import { argValueError, systemError } from '../kvm/errors.js';
import type { ApiServer } from './api-server.js';
import { MAX_VCPUS } from '../vmm/config.js';
import { runOptionsToConfig, parseAddress, parseCpuAffinity, parseDirtyLog, parseDiskOption, parseMemory, parseNetOption, parseVcpus, parseVsockOption, type RunOptions } from './run-options.js';
import { openSerialBackend, parseSerialOption, type SerialBackend } from './serial.js';
import { TOKEN_ENV, migrationToken } from './token.js';

export { formatSize, parseAddress, parseDiskOption, parseMemory, parseNetOption, parseSize, parseVcpus, parseVsockOption, type RunOptions } from './run-options.js';

export const RUN_USAGE = `usage: node-kvm run IMAGE [options]
       node-kvm run --kernel FILE [--initrd FILE|'MODULE[ ARGS][,MODULE2 ...]'] [--append TEXT] [options]
       node-kvm run --incoming tcp:HOST:PORT|unix:PATH [--token T] [--memory SIZE] [--vcpus N] [--api-socket PATH]
       node-kvm run --restore FILE [--no-verify] [--api-socket PATH]
       node-kvm run --config FILE [options]

Boots IMAGE (a flat binary, ELF32, ELF64, Multiboot or PVH kernel, or a Linux bzImage) with its
serial console (COM1) on stdin and stdout, a terminal or not (see --serial). Exits with the
guest's debug-exit status ((value << 1) | 1, as QEMU's isa-debug-exit), 0 when every vCPU halts
with nothing left to run, the guest resets (itself or through the API's reset), it is stopped
(the API's stop), or it migrates away. The end of stdin does not stop the guest; on a terminal,
Ctrl-A x does.

With --incoming, waits for one live migration (from node-kvm migrate) and runs the guest it
receives (from node-kvm migrate --local on a unix:PATH: the guest's RAM, disks and TAPs as the
old process had them, which then take the place of --disk and --net); with --restore, runs the guest saved in a snapshot file (node-kvm snapshot), once its
RAM image has been checked against the checksum the file holds.

options:
  --config FILE               read options from a JSON file: each field an option by its long
                              name ("memory": "64M", "vcpus": 2, "disk": ["a.img,ro"],
                              "irqchip": false), and "image"; options given here override it
                              (node-kvm config prints a running machine's in this form)
  --mode real|protected|long  entry mode for a flat binary (default real)
  --load-addr ADDR            load address of a flat binary (default 0x7c00)
  --memory SIZE               guest RAM, a multiple of 1 MiB, at most 3 GiB: 64M, 1.5G, 0x4000000
                              (K, M, G, T: binary units; none: bytes) (default 64M; with
                              --incoming, what the migration must bring, by default whatever it
                              brings)
  --vcpus N                   number of vCPUs, 1 to 255 (default 1; with --incoming, as --memory)
  --cmdline TEXT              kernel command line (Multiboot, PVH, Linux)
  --kernel FILE               the image to boot, as QEMU's -kernel (instead of IMAGE)
  --initrd FILE               initial ramdisk for a Linux bzImage, as QEMU's -initrd
  --initrd 'MODULE[ ARGS][,MODULE2[ ARGS2] ...]'
                              for a Multiboot kernel, as QEMU's -initrd: each file a boot module,
                              with the whole 'MODULE ARGS' as its string (,, is a comma in the text)
  --append TEXT               kernel command line, as QEMU's -append (the same as --cmdline)
  --disk FILE[,ro][,id=ID]    a virtio-blk disk backed by a raw image file (repeat for more; ro:
                              read-only). With --restore or --incoming: where this host finds the
                              disks the guest had, in order (default: the paths it had)
  --net tap=NAME[,mac=MAC][,netns=PATH]
                              a virtio-net card over the TAP NAME (created if it does not exist
                              and we may; netns: in that network namespace, e.g. /run/netns/NS),
                              MAC default 52:54:00:12:34:56 (+1 per card); repeat for more. With
                              --restore or --incoming: the TAPs this host gives the guest's cards
  --rng                       a virtio-rng device: the guest's random bytes from the host kernel
  --vsock cid=N,uds=PATH      a virtio-vsock device for guest CID N (3 or more), Firecracker's hybrid
                              vsock on the unix socket PATH: a host program connects to PATH and
                              writes 'CONNECT <port>\n'; the guest's connections to host port P
                              reach PATH_P. With --restore or --incoming: uds=PATH alone (this
                              host's socket; the guest keeps its CID)
  --serial stdio|none|unix:PATH|file:PATH
                              where COM1 goes (default stdio: stdin and stdout; a terminal in raw
                              mode). unix:PATH: served on a new unix socket (mode 0600), one client
                              at a time, the latest 64 KiB of output kept for the next client;
                              file:PATH: output to the file (truncated; created mode 0600), no
                              input; none: output discarded, no input
  --api-socket PATH           serve the control API (node-kvm status, pause, resume, stop, reset,
                              snapshot, migrate) on this unix socket
  --incoming ADDRESS          receive the guest: tcp:HOST:PORT (port 0: any free port) or
                              unix:PATH; HOST 0.0.0.0 listens on every interface
  --token T                   the secret the migration must prove it knows (required for tcp);
                              or set ${TOKEN_ENV}, which other users cannot see in ps
  --restore FILE              run the guest saved in this snapshot
  --verify, --no-verify       with --restore: check the RAM image against the file's checksum
                              (the default), or skip that (which reads all of it)
  --irqchip, --no-irqchip     in-kernel interrupt controllers, PIT, ACPI and MP tables (the
                              default), or none: HLT then exits to the VMM, and the machine ends
                              once every vCPU has halted
  --dirty-log bitmap|ring     how snapshots and migrations find the pages the guest wrote:
                              KVM_GET_DIRTY_LOG (the default) or the dirty ring, where the
                              host has it
  --cpu-affinity [VCPU=]CPUS  host CPUs a vCPU may run on, as taskset -c lists them (2, 0,2-3):
                              VCPU=CPUS for one vCPU, CPUS alone for every vCPU (repeat for more)
  --gdb tcp:HOST:PORT|unix:PATH  serve a GDB remote stub there (tcp::PORT: loopback); whoever
                              connects controls the guest fully
  --gdb-wait                  with --gdb: no vCPU runs until the debugger continues (QEMU's -s -S)
  --trace-exits FILE          write every exit (time, vCPU, reason, RIP, port or address, data) to
                              FILE in a binary format (read it with node-kvm trace FILE)
  --exit-stats                count exits from the start (node-kvm stats reads them)
  -h, --help                  show this help`;

/**
 * QEMU's -initrd for a Multiboot kernel: modules separated by commas (",," stands for a comma in
 * a name or its arguments), each "FILE[ ARGS]", whose whole text is the module's string.
 */
export function parseModulesOption(value: string): MultibootModuleConfig[] {
  const entries = [''];
  for (let i = 0; i < value.length; i++) {
    if (value[i] !== ',') entries[entries.length - 1] += value[i];
    else if (value[i + 1] === ',') entries[entries.length - 1] += value[i++];
    else entries.push('');
  }
  return entries.map((text, index) => {
    const file = text.split(' ')[0]!;
    if (file === '') throw argValueError(`--initrd '${value}': module ${index} names no file (give 'FILE[ ARGS][,FILE2[ ARGS2] ...]')`);
    return { data: file, cmdline: text };
  });
}

/** Whether the file `image` is a Multiboot kernel; false if it cannot be read (the boot says why). */
function isMultibootFile(image: string): boolean {
  let fd: number;
  try {
    fd = openSync(image, 'r');
  } catch {
    return false;
  }
  try {
    const head = new Uint8Array(MULTIBOOT_SEARCH_BYTES);
    return isMultibootKernel(head.subarray(0, readSync(fd, head, 0, head.length, 0)));
  } catch {
    return false;
  } finally {
    closeSync(fd);
  }
}

/** Checks that exactly one of IMAGE, --incoming and --restore is given, with options that fit it. */
export function checkRunSource(options: RunOptions): void {
  if (options.image !== undefined && options.kernel !== undefined) throw argValueError('give the kernel as IMAGE or as --kernel FILE, not both');
  const image = options.image ?? options.kernel;
  const sources = [image !== undefined, options.incoming !== undefined, options.restore !== undefined].filter(Boolean).length;
  if (sources !== 1) throw argValueError('run takes one IMAGE, or --incoming ADDRESS, or --restore FILE (see node-kvm run --help)');
  const imageOnly = (['mode', 'loadAddr', 'cmdline', 'initrd', 'append'] as const).filter((key) => options[key] !== undefined);
  if (image === undefined && imageOnly.length > 0) {
    const names = { mode: '--mode', loadAddr: '--load-addr', cmdline: '--cmdline', initrd: '--initrd', append: '--append' };
    throw argValueError(`${names[imageOnly[0]!]} applies to booting an IMAGE only`);
  }
  if (options.append !== undefined && options.cmdline !== undefined) throw argValueError('--append and --cmdline both give the command line: use one');
  if (options.restore !== undefined && (options.memory !== undefined || options.vcpus !== undefined)) {
    throw argValueError('--memory and --vcpus come from the snapshot with --restore');
  }
  if (options.token !== undefined && options.incoming === undefined) throw argValueError('--token applies to --incoming only');
  if (options.verify !== undefined && options.restore === undefined) throw argValueError(`--${options.verify ? '' : 'no-'}verify applies to --restore only`);
  if (options.irqchip !== undefined && image === undefined) {
    throw argValueError(`--${options.irqchip ? '' : 'no-'}irqchip applies to booting an IMAGE only (a restored or received guest keeps the machine it had)`);
  }
  if (options.rng === true && image === undefined) throw argValueError('--rng applies to booting an IMAGE only (a restored or received guest keeps the devices it had)');
  if (options.vsock !== undefined && image !== undefined && parseVsockOption(options.vsock).cid === undefined) throw argValueError('--vsock needs cid=N when booting an IMAGE');
  if (options.gdbWait === true && options.gdb === undefined) throw argValueError('--gdb-wait applies to --gdb only');
}

/** Runs the machine; `pool` holds vCPU threads started early, perhaps still loading (closed here). */
export async function run(options: RunOptions, pool: VcpuWorkerPool): Promise<number> {
  try {
    return await runWith(options, pool);
  } finally {
    await pool.close();
  }
}

async function runWith(options: RunOptions, pool: VcpuWorkerPool): Promise<number> {
  checkRunSource(options);
  const mode = options.mode;
  if (mode !== undefined && mode !== 'real' && mode !== 'protected' && mode !== 'long') {
    throw argValueError(`--mode must be real, protected or long, got '${mode}'`);
  }
  const vcpus = options.vcpus === undefined ? undefined : parseVcpus(options.vcpus);
  const memoryBytes = options.memory === undefined ? undefined : parseMemory(options.memory);
  const disks = options.disk?.map((disk) => parseDiskOption(disk));
  const net = options.net?.map((card) => parseNetOption(card));
  const vsock = options.vsock === undefined ? undefined : parseVsockOption(options.vsock);
  const serialBackend = await openSerialBackend(parseSerialOption(options.serial), (message) => process.stderr.write(`node-kvm: ${message}\n`));
  try {
    return await runMachine(options, { mode, vcpus, memoryBytes, disks, net, vsock }, serialBackend, pool);
  } finally {
    await serialBackend.close();
  }
}

async function runMachine(
  options: RunOptions,
  parsed: { mode?: string; vcpus?: number; memoryBytes?: number; disks?: DiskConfig[]; net?: NetConfig[]; vsock?: { cid?: number; uds: string } },
  serialBackend: SerialBackend, pool: VcpuWorkerPool,
): Promise<number> {
  const { mode, vcpus, memoryBytes, disks, net, vsock } = parsed;
  const serial = serialBackend.config;
  const instrument = {
    exitStats: options.exitStats === true,
    ...(options.traceExits === undefined ? {} : { traceExits: path.resolve(options.traceExits) }),
    ...(options.dirtyLog === undefined ? {} : { dirtyLog: parseDirtyLog(options.dirtyLog) }),
    // A received machine's vCPU count is the migration's: every vCPU it may have gets the list.
    ...(options.cpuAffinity === undefined ? {} : { affinity: parseCpuAffinity(options.cpuAffinity, vcpus ?? ((options.image ?? options.kernel) === undefined ? MAX_VCPUS : 1)) }),
  };
  let machine: Machine;
  if (options.incoming !== undefined) {
    // Migration and API code load only when used: a plain boot starts sooner without them.
    const { parseMigrationAddress } = await import('../migration/transport.js');
    const address = parseMigrationAddress(options.incoming);
    const token = migrationToken(options.token);
    if (address.kind === 'tcp' && token === undefined) throw argValueError(`--incoming ${options.incoming} needs --token (or ${TOKEN_ENV}): anyone who can reach the port could send a guest`);
    const { receiveMachine } = await import('../migration/receive.js');
    machine = await receiveMachine(options.incoming, {
      memoryBytes, vcpus, token, serial, pool, disks, net, vsock, ...instrument,
      onListening: (bound) => process.stderr.write(`node-kvm: listening for a migration on ${bound}\n`),
      // Connections refused while waiting (not a migration source, a wrong token), and the VMM's warnings.
      log: (message) => process.stderr.write(`node-kvm: ${message}\n`),
    });
    if (machine.state === 'paused') {
      process.stderr.write(`node-kvm: the guest arrived paused, as it was at the source${options.apiSocket ? ': resume it through the API socket' : ''}\n`);
    }
  } else if (options.restore !== undefined) {
    const { restoreMachine } = await import('../migration/snapshot.js');
    machine = await restoreMachine(options.restore, { serial, pool, disks, net, vsock, ...instrument, verify: options.verify !== false });
  } else {
    const image = (options.image ?? options.kernel)!;
    // --initrd is a Linux initrd, or QEMU's module list for a Multiboot kernel.
    const modules = options.initrd !== undefined && isMultibootFile(image) ? parseModulesOption(options.initrd) : undefined;
    machine = await Machine.create({
      image,
      mode: mode as CpuMode | undefined,
      loadAddr: options.loadAddr === undefined ? undefined : parseAddress(options.loadAddr, '--load-addr'),
      memoryBytes,
      vcpus: vcpus ?? 1,
      cmdline: options.cmdline ?? options.append,
      initrd: modules ? undefined : options.initrd,
      modules,
      irqchip: options.irqchip,
      rng: options.rng === true ? true : undefined,
      vsock: vsock as { cid: number; uds: string } | undefined,
      disks,
      net,
      serial,
      pool,
      ...instrument,
    });
    // Only a flat binary started in real mode has nowhere to put a command line.
    const cmdlineOption = options.append === undefined ? (options.cmdline === undefined ? null : '--cmdline') : '--append';
    if (cmdlineOption && machine.boot?.format === 'flat' && machine.boot.mode === 'real') {
      await machine.stop();
      throw argValueError(`${cmdlineOption}: ${path.basename(image)} boots as a flat binary in real mode, which takes no command line (with --mode protected or long it gets one)`);
    }
  }
  const exit = machine.wait();
  let api: ApiServer | null = null;
  if (options.apiSocket !== undefined) {
    try {
      const { apiMachine, startApiServer } = await import('./api-server.js');
      api = await startApiServer(path.resolve(options.apiSocket), apiMachine(machine, runOptionsToConfig(absolutePaths(options))));
    } catch (error) {
      await machine.stop();
      throw systemError(`--api-socket ${options.apiSocket}: ${(error as Error).message}`, error);
    }
  }
  let gdb: { close(): Promise<void> } | null = null;
  if (options.gdb !== undefined) {
    try {
      const { GdbServer } = await import('../debug/gdb-server.js');
      const server = await GdbServer.listen(machine, options.gdb, { log: (message) => process.stderr.write(`node-kvm: ${message}\n`) });
      process.stderr.write(`node-kvm: gdb stub on ${server.address}${options.gdbWait ? ': waiting for the debugger to continue' : ''}\n`);
      gdb = server;
    } catch (error) {
      await machine.stop();
      await api?.close();
      throw systemError(`--gdb ${options.gdb}: ${(error as Error).message}`, error);
    }
  }
  // Ended by a signal: stop the guest and remove the API socket rather than die with it open.
  let signalled: NodeJS.Signals | null = null;
  const onSignal = (signal: NodeJS.Signals) => {
    signalled = signal;
    void machine.stop();
  };
  process.on('SIGINT', onSignal).on('SIGTERM', onSignal);
  try {
    serialBackend.attach(machine);
    // A machine that arrived by migration is running already.
    if (machine.state === 'created') machine.start({ paused: options.gdbWait === true });
    const result = await exit;
    if (signalled) return 128 + osConstants.signals[signalled];
    return exitStatus(result);
  } finally {
    process.off('SIGINT', onSignal).off('SIGTERM', onSignal);
    await api?.close();
    await gdb?.close();
  }
}

/** `options` with its file paths absolute: the configuration the API reports means the same from any directory. */
function absolutePaths(options: RunOptions): RunOptions {
  const resolve = (file: string | undefined) => (file === undefined ? undefined : path.resolve(file));
  const withPrefix = (value: string | undefined) => value?.replace(/^(unix:|file:)(.+)$/, (_, prefix: string, file: string) => prefix + path.resolve(file));
  return {
    ...options,
    image: resolve(options.image),
    kernel: resolve(options.kernel),
    restore: resolve(options.restore),
    apiSocket: resolve(options.apiSocket),
    // A secret: not for whoever reads the configuration.
    token: undefined,
    traceExits: resolve(options.traceExits),
    serial: withPrefix(options.serial),
    incoming: withPrefix(options.incoming),
    disk: options.disk?.map((disk) => disk.replace(/^[^,]+/, (file) => path.resolve(file))),
  };
}

export function exitStatus(exit: MachineExit): number {
  switch (exit.reason) {
    case 'debug-exit':
      return debugExitStatus(exit.code ?? 0);
    case 'hlt':
    case 'reset':
    case 'poweroff':
    case 'stopped':
      return 0;
    case 'migrated':
      process.stderr.write('node-kvm: the guest migrated away; it runs at the destination now\n');
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
