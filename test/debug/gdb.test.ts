// The GDB stub with the real gdb (Debian's, in batch mode) against guests/gdb.S (ELF64, with
// symbols) and protected.S (ELF32): break and hbreak at symbols, single steps through a loop,
// registers and memory read and changed and the guest acting on it, watchpoints refused, two
// vCPUs as two threads, the guest's exit reported; detach (the guest runs on) and kill.
import { execFile } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import t from 'tap';
import { nodeKvmInProcess, startNodeKvm, type NodeKvmProcess } from '../helpers/cli.js';
import { noKvm, repoRoot } from '../helpers/kvm.js';

const GDB = '/usr/bin/gdb';
const skip = noKvm || (existsSync(GDB) ? false : `${GDB} is absent (.ci/run installs it)`);
const elf = (name: string) => path.join(repoRoot, 'guests', 'build', `${name}.elf`);
const dir = mkdtempSync(path.join(tmpdir(), 'node-kvm-gdb-'));
t.teardown(() => rmSync(dir, { recursive: true, force: true }));

/** Runs gdb in batch mode on `file` with `commands` (each an -ex: an error in one does not stop the rest). */
function gdb(file: string, commands: string[]): Promise<string> {
  const args = ['-batch', '-nx', '-ex', 'set pagination off', '-ex', 'set confirm off', ...commands.flatMap((c) => ['-ex', c]), file];
  return new Promise((resolve) => {
    execFile(GDB, args, { timeout: 30_000 }, (_error, stdout, stderr) => resolve(`${stdout}${stderr}`));
  });
}

/** Starts node-kvm with a stub and waits until it listens; returns the process and the address. */
async function startWithStub(args: string[]): Promise<{ vm: NodeKvmProcess; address: string }> {
  const vm = startNodeKvm(args);
  // A test that fails half-way leaves no machine waiting for a debugger.
  t.teardown(() => vm.kill('SIGKILL'));
  const [, address] = await vm.waitFor(/gdb stub on (\S+?)(?:: waiting|\n)/, 'stderr');
  return { vm, address: address! };
}

t.test('break, hbreak, step, change a register and memory, two threads, watchpoints refused, the exit', { skip }, async (t) => {
  const socket = path.join(dir, 'gdb.sock');
  const { vm } = await startWithStub(['run', elf('gdb'), '--vcpus', '2', '--gdb', `unix:${socket}`, '--gdb-wait']);
  const out = await gdb(elf('gdb'), [
    `target remote ${socket}`,
    'info threads',
    'break after_loop',
    'hbreak count_loop',
    'continue',
    ...Array.from({ length: 4 }, () => ['stepi', 'printf "pc=%#lx\\n", $pc']).flat(),
    'delete 2',
    'continue',
    'printf "rbx=%d\\n", $rbx',
    'set $rbx = 7',
    'set var *(char *)&message = 74',
    'x/s &message',
    'printf "cr0=%#lx efer=%#lx\\n", $cr0, $efer',
    'x/2x 0xffff800000000000',
    'watch *(char *)&message',
    'continue',
    'delete',
    'continue',
  ]);
  t.match(out, /\* 1 +Thread 1 \(vCPU 0\) 0x0+100000 in _start \(\)/, 'vCPU 0 is thread 1, at the entry');
  t.match(out, /  2 +Thread 2 \(vCPU 1\)/, 'vCPU 1 is thread 2');
  t.match(out, 'Breakpoint 1 at 0x100015');
  t.match(out, 'Hardware assisted breakpoint 2 at 0x10000e');
  t.match(out, /Thread 1 hit Breakpoint 2, 0x0+10000e in count_loop/);
  // inc %rbx (3 bytes), dec %ecx (2), jnz count_loop (taken), inc again.
  t.same([...out.matchAll(/^pc=(0x[0-9a-f]+)$/gm)].map((m) => m[1]), ['0x100011', '0x100013', '0x10000e', '0x100011']);
  t.match(out, /Thread 1 hit Breakpoint 1, 0x0+100015 in after_loop/);
  t.match(out, /^rbx=5$/m);
  t.match(out, /0x101000(?: <message>)?:\s+"Jello"/);
  t.match(out, /^cr0=0x80000011 efer=0x500$/m);
  t.match(out, 'Cannot access memory at address 0xffff800000000000');
  t.match(out, 'Could not insert hardware watchpoint');
  t.match(out, /\[Inferior 1 \(Remote target\) exited with code 0103\]/, 'the guest exit (status 67) reported as W');
  const result = await vm.result;
  t.equal(result.stdout, 'rbx=7 msg=Jello\n', 'the guest printed what the debugger changed');
  t.equal(result.status, 67);
});

t.test('detach: the breakpoints go, the guest runs on and exits as it would have', { skip }, async (t) => {
  const { vm, address } = await startWithStub(['run', elf('gdb'), '--gdb', 'tcp:127.0.0.1:0', '--gdb-wait']);
  t.match(address, /^tcp:127\.0\.0\.1:\d+$/);
  const out = await gdb(elf('gdb'), [`target remote ${address.slice('tcp:'.length)}`, 'break count_loop', 'continue', 'printf "rbx=%d\\n", $rbx', 'detach']);
  t.match(out, /Breakpoint 1, 0x0+10000e in count_loop/);
  t.match(out, /^rbx=0$/m);
  t.match(out, 'Inferior 1 (Remote target) detached');
  const result = await vm.result;
  t.equal(result.stdout, 'rbx=5 msg=hello\n');
  t.equal(result.status, 67);
});

t.test('a 32-bit guest is shown as i386; kill ends the machine', { skip }, async (t) => {
  const socket = path.join(dir, 'kill.sock');
  const { vm } = await startWithStub(['run', elf('protected'), '--gdb', `unix:${socket}`, '--gdb-wait']);
  const out = await gdb(elf('protected'), [`target remote ${socket}`, 'show architecture', 'printf "eip=%#x cs=%#x\\n", $eip, $cs', 'kill']);
  t.match(out, /i386/);
  t.notMatch(out, /x86-64/);
  t.match(out, /^eip=0x100000 cs=0x8$/m);
  t.match(out, '[Inferior 1 (Remote target) killed]');
  const result = await vm.result;
  t.equal(result.stdout, '', 'the guest never ran');
  t.equal(result.status, 0, 'stopped');
});

t.test('a breakpoint on every vCPU: the AP that hits it becomes the current thread', { skip }, async (t) => {
  const socket = path.join(dir, 'smp.sock');
  const { vm } = await startWithStub(['run', elf('smp'), '--vcpus', '2', '--gdb', `unix:${socket}`, '--gdb-wait']);
  const out = await gdb(elf('smp'), [`target remote ${socket}`, 'hbreak ap_entry', 'continue', 'info threads', 'delete', 'continue']);
  t.match(out, /Thread 2 hit Breakpoint 1, 0x00100150 in ap_entry/);
  t.match(out, /\* 2 +Thread 2 \(vCPU 1\) 0x00100150 in ap_entry/);
  t.match(out, /exited with code 0101/, 'debug-exit 0x20: status 65');
  const result = await vm.result;
  t.equal(result.stdout, 'cpu 0\ncpu 1\nall 2 cpus up\n');
  t.equal(result.status, 65);
});

t.test('run refuses --gdb-wait without --gdb, and an address it cannot parse', { skip: noKvm }, async (t) => {
  const wait = await nodeKvmInProcess(['run', elf('gdb'), '--gdb-wait'], { builtFirstThread: true });
  t.not(wait.status, 0);
  t.match(wait.stderr, '--gdb-wait applies to --gdb only');
  const bad = await nodeKvmInProcess(['run', elf('gdb'), '--gdb', 'tcp:localhost'], { builtFirstThread: true });
  t.not(bad.status, 0);
  t.match(bad.stderr, "gdb address 'tcp:localhost' must be tcp:HOST:PORT or unix:PATH");
});
