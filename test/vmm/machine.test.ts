// The Machine with flat real-mode guests: output, exits, devices, pause/resume/stop, threads.
import { readFileSync, readdirSync } from 'node:fs';
import { Worker } from 'node:worker_threads';
import { PassThrough } from 'node:stream';
import t from 'tap';
import { Machine, VcpuWorkerPool, memoryMap } from '../../lib/index.js';
import { native } from '../../lib/kvm/native.js';
import { startVcpuThread, watchVcpuThread } from '../../lib/vmm/pool.js';
import { guestPath } from '../../guests/build.mjs';
import { guestImage, noKvm } from '../helpers/kvm.js';
import { boot, runToExit } from '../helpers/machine.js';
import { sharedPool } from '../helpers/pool.js';

// The machines of tests that are not about starting vCPU threads borrow them from here: each
// thread takes a second or more to load under tap's TypeScript loader.
const pool = noKvm ? undefined : sharedPool();

t.test('hello prints through the serial device and the machine ends on HLT', { skip: noKvm }, async (t) => {
  const { exit, output } = await runToExit({ image: guestImage('hello'), memoryBytes: 1 << 20, pool });
  t.equal(output, 'Hello from node-kvm!\n');
  t.equal(exit.reason, 'hlt');
  t.equal(exit.code, 0);
});

t.test('a debug-exit write ends the machine with its value; wild accesses are logged and survived', { skip: noKvm }, async (t) => {
  const logs: string[] = [];
  const booted = await boot({ image: guestImage('wild'), memoryBytes: 1 << 20, pool }, logs);
  booted.machine.start();
  const exit = await booted.machine.wait();
  await new Promise((resolve) => setImmediate(resolve));
  t.equal(booted.output(), 'wild ok\n');
  t.same({ reason: exit.reason, code: exit.code, vcpu: exit.vcpu }, { reason: 'debug-exit', code: 0x33, vcpu: 0 });
  t.same(booted.machine.unknownAccesses, { ports: 3, mmio: 2 });
  // Each address is logged once, at its first access; the counts once the machine has ended.
  t.equal(logs.at(-1), 'the guest made 3 accesses to 3 unknown ports and 2 unknown MMIO accesses');
  t.same(logs.slice(0, -1).sort(), [
    'vcpu0: unknown MMIO write to 0x100000 (1 bytes)',
    'vcpu0: unknown port read from 0x2345',
    'vcpu0: unknown port write to 0x1234',
    'vcpu0: unknown port write to 0x2f0',
  ].sort());
});

t.test('a triple fault is a clean shutdown exit with a register dump', { skip: noKvm }, async (t) => {
  const { exit } = await runToExit({ image: guestImage('triple'), memoryBytes: 1 << 20, mode: 'protected', pool });
  t.equal(exit.reason, 'shutdown', exit.detail);
  t.equal(exit.vcpu, 0);
  t.ok(exit.registers, 'registers are dumped');
  t.equal(exit.registers!.regs.rax, 0x1111n);
  t.equal(exit.registers!.regs.rbx, 0x2222n);
  t.same(exit.registers!.sregs.idt, { base: 0x1000n, limit: 0x7ff });
  t.equal(exit.registers!.sregs.cr0 & 1n, 1n, 'in protected mode');
});

t.test('the i8042 reset command ends the machine as a reset', { skip: noKvm }, async (t) => {
  const { exit } = await runToExit({ image: guestImage('reset'), memoryBytes: 1 << 20, pool });
  t.same({ reason: exit.reason, vcpu: exit.vcpu }, { reason: 'reset', vcpu: 0 });
});

t.test('pause, resume and stop a guest that spins with interrupts off', { skip: noKvm }, async (t) => {
  const { machine } = await boot({ image: guestImage('spin'), memoryBytes: 1 << 20, pool });
  machine.start();
  t.equal(machine.state, 'running');
  // The vCPU is a Linux thread named vcpu0.
  const names = readdirSync('/proc/self/task').map((tid) => {
    try {
      return readFileSync(`/proc/self/task/${tid}/comm`, 'utf8').trim();
    } catch {
      return '';
    }
  });
  t.ok(names.includes('vcpu0'), `a thread is named vcpu0 (${names.join(', ')})`);
  await machine.pause();
  t.equal(machine.state, 'paused');
  machine.resume();
  t.equal(machine.state, 'running');
  await new Promise((resolve) => setTimeout(resolve, 20));
  const started = performance.now();
  const exit = await machine.stop();
  const elapsed = performance.now() - started;
  t.equal(exit.reason, 'stopped');
  t.ok(elapsed < 1000, `stop() returned (${elapsed.toFixed(1)} ms)`);
});

t.test('a bad image fails before any VM is created', { skip: noKvm }, async (t) => {
  await t.rejects(Machine.create({ image: new Uint8Array(0) }), /empty|zero|no bytes|bootable/i);
  await t.rejects(Machine.create({ image: '/nonexistent/guest.bin' }), /cannot read the image \/nonexistent\/guest.bin: ENOENT/);
  await t.rejects(Machine.create({ image: guestImage('hello'), memoryBytes: 1000 }), RangeError);
  await t.rejects(Machine.create({ image: guestImage('hello'), vcpus: 0 }), RangeError);
});

t.test('machines borrow vCPU threads from a pool and give them back', { skip: noKvm }, async (t) => {
  const pool = await VcpuWorkerPool.create(2);
  t.teardown(() => pool.close());
  t.equal(pool.idleCount, 2);
  for (let i = 0; i < 3; i++) {
    const { exit, output } = await runToExit({ image: guestImage('hello'), memoryBytes: 1 << 20, pool });
    t.equal(output, 'Hello from node-kvm!\n', `run ${i}`);
    t.equal(exit.reason, 'hlt');
    t.equal(pool.idleCount, 2, 'threads are back in the pool');
  }
});

t.test('a pool whose threads are still loading: a machine takes them as they come, and close() waits for them', { skip: noKvm }, async (t) => {
  const pool = VcpuWorkerPool.start(2);
  t.equal(pool.idleCount, 0, 'nothing idle yet: the threads are loading');
  const { exit, output } = await runToExit({ image: guestImage('hello'), memoryBytes: 1 << 20, pool });
  t.equal(output, 'Hello from node-kvm!\n');
  t.equal(exit.reason, 'hlt');
  // The thread the machine took is back; the other one goes idle once it has loaded.
  for (const deadline = Date.now() + 20_000; pool.idleCount < 2 && Date.now() < deadline;) await new Promise((resolve) => setTimeout(resolve, 20));
  t.equal(pool.idleCount, 2);
  await pool.close();
  await t.rejects(pool.acquire(1), { message: 'the vCPU pool is closed' });

  const closing = VcpuWorkerPool.start(2);
  await closing.close(); // before any thread has loaded: each is ended once it has
  t.equal(closing.idleCount, 0);
  t.throws(() => VcpuWorkerPool.start(-1), RangeError);
  t.throws(() => VcpuWorkerPool.start(1.5), RangeError);
});

t.test('a pool adopts threads started before it, loading or not, and a machine sends them their vCPU before they have loaded', { skip: noKvm }, async (t) => {
  const early = startVcpuThread();
  t.equal(early.status, 'loading');
  const pool = VcpuWorkerPool.start(2, [early]);
  t.teardown(() => pool.close());
  // Taken while both are still loading: the assignment waits in each thread's queue.
  const { exit, output } = await runToExit({ image: readFileSync(guestPath('smp')), memoryBytes: 16 << 20, vcpus: 2, irqchip: true, pool });
  t.same({ reason: exit.reason, code: exit.code }, { reason: 'debug-exit', code: 0x20 }, output);
  t.equal(output.trim().split('\n').at(-1), 'all 2 cpus up');
  t.equal(early.status, 'loaded');
  t.equal(pool.idleCount, 2, 'the early thread and the one the pool started, both back');
  t.throws(() => VcpuWorkerPool.start(1, 'no' as never), TypeError);
});

t.test('a vCPU thread that fails to load fails Machine.create() with why, and the pool drops it', { skip: noKvm }, async (t) => {
  const broken = () => watchVcpuThread(new Worker('throw new Error("no code here")', { eval: true }));
  const thread = broken();
  await t.rejects(thread.loaded, { message: /a vCPU thread failed to load: no code here/ });
  t.equal(thread.status, 'failed');
  await thread.exited;

  const pool = VcpuWorkerPool.start(1, [broken()]);
  t.teardown(() => pool.close());
  await t.rejects(Machine.create({ image: guestImage('hello'), memoryBytes: 1 << 20, pool }), { message: /vCPU 0 could not start: a vCPU thread failed to load: no code here/ });
  t.equal(pool.idleCount, 0, 'the failed thread is not handed out again');
  // The pool starts a new thread for the next machine.
  const { exit, output } = await runToExit({ image: guestImage('hello'), memoryBytes: 1 << 20, pool });
  t.equal(output, 'Hello from node-kvm!\n');
  t.equal(exit.reason, 'hlt');
  // A thread that ends before it has loaded (a worker that exits at once) is a failure too.
  const quitter = watchVcpuThread(new Worker('process.exit(3)', { eval: true }));
  await t.rejects(quitter.loaded, { message: /ended \(status 3\) before it had loaded/ });
});

t.test('serial input from a stream reaches the guest, and its echo comes back', { skip: noKvm }, async (t) => {
  const input = new PassThrough();
  const booted = await boot({ image: guestImage('echo'), memoryBytes: 1 << 20, serial: { input }, pool });
  booted.machine.start();
  await booted.waitForOutput('echo> ');
  input.write('hi there');
  await booted.waitForOutput('echo> hi there');
  t.equal(booted.machine.sendSerialInput(new TextEncoder().encode('!q')), 2);
  const exit = await booted.machine.wait();
  await new Promise((resolve) => setImmediate(resolve));
  t.equal(booted.output(), 'echo> hi there!q');
  t.same({ reason: exit.reason, code: exit.code }, { reason: 'debug-exit', code: 5 });
});

t.test('a vCPU thread can be pinned to host CPUs', { skip: noKvm }, async (t) => {
  // Its own thread, started with the machine: a pinned thread back in a pool would stay pinned.
  const { machine } = await boot({ image: guestImage('spin'), memoryBytes: 1 << 20, affinity: [[0]] });
  machine.start();
  t.teardown(() => machine.stop());
  const tid = readdirSync('/proc/self/task').find((task) => {
    try {
      return readFileSync(`/proc/self/task/${task}/comm`, 'utf8').trim() === 'vcpu0';
    } catch {
      return false;
    }
  });
  t.ok(tid, 'the vcpu0 thread exists');
  t.match(readFileSync(`/proc/self/task/${tid}/status`, 'utf8'), /^Cpus_allowed_list:\s+0$/m);
});

t.test('a rejected image leaves no kernel object behind', { skip: noKvm }, async (t) => {
  const before = native.handleCount();
  await t.rejects(Machine.create({ image: Uint8Array.from([0x7f, 0x45, 0x4c, 0x46, 1, 1, 1]) }), /ELF/);
  t.equal(native.handleCount(), before, 'no Kvm, Vm or Vcpu handle was opened');
});

for (const [name, mode, output, code] of [
  ['protected', undefined, 'protected mode OK\n', 0x10],
  ['long', undefined, 'long mode OK\n', 0x11],
] as const) {
  t.test(`the ${name} guest through the VMM`, { skip: noKvm }, async (t) => {
    const { exit, output: printed } = await runToExit({ image: readFileSync(guestPath(name)), mode, memoryBytes: 16 << 20, pool });
    t.equal(printed, output);
    t.same({ reason: exit.reason, code: exit.code }, { reason: 'debug-exit', code });
  });
}

t.test('the multiboot guest prints the memory map and command line it was given', { skip: noKvm }, async (t) => {
  const { exit, output } = await runToExit({ image: readFileSync(guestPath('multiboot')), memoryBytes: 32 << 20, cmdline: 'console=ttyS0 quiet', pool });
  t.same({ reason: exit.reason, code: exit.code }, { reason: 'debug-exit', code: 0x12 });
  const mmap = memoryMap(32 << 20).map((e) => `mmap 0x${e.addr.toString(16).padStart(16, '0')} 0x${e.size.toString(16).padStart(16, '0')} ${e.type}`);
  for (const line of mmap) t.ok(output.split('\n').includes(line), line);
  t.match(output, /^cmdline: console=ttyS0 quiet$/m);
});

t.test('serial input raises IRQ 4 through the in-kernel PIC; an interrupt-driven guest echoes it', { skip: noKvm }, async (t) => {
  const input = new PassThrough();
  const booted = await boot({ image: guestImage('echo-irq'), memoryBytes: 1 << 20, irqchip: true, serial: { input }, pool });
  booted.machine.start();
  await booted.waitForOutput('irq> ');
  input.write('interrupts');
  await booted.waitForOutput('irq> interrupts');
  input.write(' q');
  const exit = await booted.machine.wait();
  await new Promise((resolve) => setImmediate(resolve));
  t.equal(booted.output(), 'irq> interrupts q');
  t.same({ reason: exit.reason, code: exit.code }, { reason: 'debug-exit', code: 6 });
});
