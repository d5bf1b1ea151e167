// Thousands of create/close cycles of every handle kind leave nothing behind: open fds, native
// handles, guest-memory mappings and kvm_run mappings all return exactly to where they started.
//
// close() releases native handles and VM, vCPU and eventfd fds at once. A mapping (guest RAM with
// its memfd, a vCPU's kvm_run page) goes when napi runs the finalizer of its detached ArrayBuffer,
// which happens on a later turn of the event loop, not at a garbage collection: each check waits
// one setImmediate turn and no more. Only handles dropped without close() need the collector.
import { readdirSync, readFileSync } from 'node:fs';
import v8 from 'node:v8';
import { runInNewContext } from 'node:vm';
import t, { type Test } from 'tap';
import { EventFd, GuestMemory, Kvm, KvmError } from '../../lib/index.js';
import { native } from '../../lib/kvm/native.js';
import { guestImage, LOAD_ADDR, noKvm, enterRealMode, runToHalt } from '../helpers/kvm.js';

const MiB = 1 << 20;
const CYCLES = 2000;
// Turns between batches bound how many closed VMs the kernel still holds through kvm_run
// mappings whose finalizers have not run yet.
const BATCH = 50;
const HELLO = 'Hello from node-kvm!\n';
// V8 may grow or shrink its own heap during a test; guest RAM alone is 2 GiB over 2000 cycles.
const MAPPED_BYTES_TOLERANCE = 64 * MiB;

const turn = () => new Promise<void>((resolve) => setImmediate(resolve));

interface Usage {
  fds: number;
  handles: number;
  guestMappings: number;
  guestBytes: number;
  vcpuMaps: number;
  memfdMaps: number;
  mappedBytes: number;
}

function usage(): Usage {
  const maps = readFileSync('/proc/self/maps', 'utf8').trimEnd().split('\n');
  let mappedBytes = 0;
  for (const line of maps) {
    const [start, end] = line.slice(0, line.indexOf(' ')).split('-');
    mappedBytes += parseInt(end!, 16) - parseInt(start!, 16);
  }
  const count = (pattern: RegExp) => maps.filter((line) => pattern.test(line)).length;
  const stats = GuestMemory.stats();
  return {
    fds: readdirSync('/proc/self/fd').length,
    handles: native.handleCount(),
    guestMappings: stats.mappings,
    guestBytes: stats.bytes,
    vcpuMaps: count(/anon_inode:kvm-vcpu/),
    // All guest RAM (anonymous included) is a memfd, so that its holes can be found.
    memfdMaps: count(/memfd:node-kvm-guest-ram/),
    mappedBytes,
  };
}

function assertBack(t: Test, before: Usage, after: Usage): void {
  const { mappedBytes: beforeBytes, ...beforeExact } = before;
  const { mappedBytes: afterBytes, ...afterExact } = after;
  t.same(afterExact, beforeExact, 'fds, native handles and mappings are back where they started');
  t.ok(Math.abs(afterBytes - beforeBytes) <= MAPPED_BYTES_TOLERANCE,
    `mapped bytes within ${MAPPED_BYTES_TOLERANCE / MiB} MiB (${((afterBytes - beforeBytes) / MiB).toFixed(1)} MiB)`);
}

/** Runs `cycle` once to warm up, records usage, runs it `count` times, and checks usage is back. */
async function cycles(t: Test, count: number, cycle: (i: number) => void | Promise<void>): Promise<void> {
  await cycle(-1);
  await turn();
  const before = usage();
  const started = performance.now();
  for (let i = 0; i < count; i++) {
    await cycle(i);
    if (i % BATCH === BATCH - 1) await turn();
  }
  await turn();
  t.comment(`${count} cycles in ${(performance.now() - started).toFixed(0)} ms`);
  assertBack(t, before, usage());
}

function openKvm(t: Test): Kvm {
  const kvm = Kvm.open();
  t.teardown(() => kvm.close());
  return kvm;
}

t.test('Kvm open/close', { skip: noKvm }, async (t) => {
  await cycles(t, CYCLES, () => Kvm.open().close());
});

t.test('VM create/close', { skip: noKvm }, async (t) => {
  const kvm = openKvm(t);
  await cycles(t, CYCLES, () => kvm.createVm().close());
});

// KVM frees a vCPU only with its VM, and ids cannot be reused on one VM: one VM per vCPU.
t.test('VM + vCPU create/close', { skip: noKvm }, async (t) => {
  const kvm = openKvm(t);
  await cycles(t, CYCLES, () => {
    const vm = kvm.createVm();
    vm.createVcpu(0).close();
    vm.close();
  });
});

t.test('GuestMemory create/close, 1 MiB, anonymous and memfd', { skip: noKvm }, async (t) => {
  await cycles(t, CYCLES, (i) => {
    const memory = GuestMemory.create(MiB, { backing: i % 2 ? 'memfd' : 'anonymous' });
    memory.bytes(((i + 1) * 4096) % MiB, 1)[0] = 1;
    memory.close();
  });
});

t.test('EventFd create/close', async (t) => {
  await cycles(t, CYCLES, () => {
    const eventfd = EventFd.create();
    eventfd.write(1);
    eventfd.close();
  });
});

t.test('a mapping is released one event-loop turn after close(), without a garbage collection', { skip: noKvm }, async (t) => {
  await turn();
  const before = usage();
  const memory = GuestMemory.create(MiB, { backing: 'memfd' });
  memory.close();
  const rightAfter = usage();
  t.comment(`right after close(): ${rightAfter.guestMappings - before.guestMappings} guest mapping(s), ${rightAfter.fds - before.fds} fd(s) still held`);
  await turn();
  assertBack(t, before, usage());
});

// Each cycle: guest RAM in a slot, a vCPU that runs the hello guest, an ioeventfd, and the
// handles closed in a different order, so every path that drops the last reference is taken.
t.test('mixed: a slot, a running vCPU, an ioeventfd, closed in every order', { skip: noKvm }, async (t) => {
  const kvm = openKvm(t);
  const hello = guestImage('hello');
  const orders = [
    ['vcpu', 'vm', 'memory', 'eventfd'],
    ['memory', 'vm', 'eventfd', 'vcpu'],
    ['vm', 'eventfd', 'memory', 'vcpu'],
    ['eventfd', 'memory', 'vcpu', 'vm'],
  ] as const;
  let printed = 0;
  await cycles(t, 500, (i) => {
    const memory = GuestMemory.create(MiB, { backing: i % 2 ? 'memfd' : 'anonymous' });
    const vm = kvm.createVm();
    vm.setUserMemoryRegion({ slot: 0, guestPhysAddr: 0, memory, flags: { logDirtyPages: i % 3 === 0 } });
    memory.write(LOAD_ADDR, hello);
    const eventfd = EventFd.create();
    vm.registerIoeventfd({ addr: 0x80, len: 1, pio: true }, eventfd);
    const vcpu = vm.createVcpu(0);
    enterRealMode(vcpu, LOAD_ADDR);
    // Every tenth cycle runs the guest; the others only create and tear down.
    if (i % 10 === 0 && runToHalt(vcpu) === HELLO) printed++;
    const handles = { vcpu, vm, memory, eventfd };
    for (const name of orders[(i + 4) % 4]!) handles[name].close();
  });
  t.equal(printed, 50, 'the guest printed its line in every cycle that ran it');
});

t.test('failed calls leave nothing behind', { skip: noKvm }, async (t) => {
  const kvm = openKvm(t);
  const vm = kvm.createVm();
  t.teardown(() => vm.close());
  vm.createVcpu(0).close();
  const memory = GuestMemory.create(MiB);
  t.teardown(() => memory.close());
  vm.setUserMemoryRegion({ slot: 0, guestPhysAddr: 0, memory });
  const codes = new Set<string>();
  const expectKvmError = (fn: () => unknown) => {
    try {
      fn();
    } catch (error) {
      if (!(error instanceof KvmError)) throw error;
      codes.add(error.code);
      return;
    }
    throw new Error('expected a KvmError');
  };
  await cycles(t, CYCLES, () => {
    expectKvmError(() => vm.createVcpu(0));
    expectKvmError(() => vm.setUserMemoryRegion({ slot: 1, guestPhysAddr: 0, memory }));
    expectKvmError(() => Kvm.open('/dev/node-kvm-no-such-device'));
    expectKvmError(() => kvm.createVm(200));
  });
  t.same([...codes].sort(), ['EEXIST', 'EINVAL', 'ENOENT'], 'the calls failed in the kernel, as intended');
});

// Handles dropped without close() are released by the garbage collector (FinalizationRegistry
// for fds, native handles and the mappings GuestMemory holds, the ArrayBuffer finalizer for views). The tap command line has
// no --expose-gc, so the flag is set at run time and a fresh context provides gc().
t.test('handles dropped without close() are released by the garbage collector', { skip: noKvm }, async (t) => {
  v8.setFlagsFromString('--expose-gc');
  const gc = runInNewContext('gc') as () => void;
  const kvm = openKvm(t);
  await turn();
  const before = usage();
  const drop = () => {
    for (let i = 0; i < 100; i++) {
      const memory = GuestMemory.create(MiB, { backing: i % 2 ? 'memfd' : 'anonymous' });
      if (i % 3 === 0) memory.bytes(0, 1); // some with their ArrayBuffer made, some without
      const vm = kvm.createVm();
      vm.setUserMemoryRegion({ slot: 0, guestPhysAddr: 0, memory });
      vm.createVcpu(0);
      EventFd.create();
    }
  };
  drop();
  t.ok(usage().handles >= before.handles + 200, 'the dropped VMs and vCPUs were live');
  for (let attempt = 0; attempt < 20; attempt++) {
    gc();
    await turn();
    const now = usage();
    if (now.handles === before.handles && now.fds === before.fds && now.guestMappings === before.guestMappings && now.vcpuMaps === before.vcpuMaps) break;
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
  assertBack(t, before, usage());
});

t.test('closing a vCPU unmaps its kvm_run page at once, so the kernel frees the VM then', { skip: noKvm }, async (t) => {
  const vcpuMappings = () => readFileSync('/proc/self/maps', 'utf8').split('\n').filter((line) => line.includes('kvm-vcpu')).length;
  const before = vcpuMappings();
  const kvm = Kvm.open();
  const vm = kvm.createVm();
  const vcpu = vm.createVcpu(0);
  t.equal(vcpuMappings(), before + 1, 'the kvm_run page is mapped from the vCPU fd');
  vcpu.close();
  t.equal(vcpuMappings(), before, 'no mapping of the vCPU file is left after close()');
  t.equal(vcpu.kvmRun.bytes.length, 0, 'the kvm_run view is detached');
  vm.close();
  kvm.close();
});
