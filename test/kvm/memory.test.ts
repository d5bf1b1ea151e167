// GuestMemory (mmap'd guest RAM exposed as an ArrayBuffer) and how VM memory slots use it:
// KVM_SET_USER_MEMORY_REGION validation, readonly slots, deleting and re-adding slots.
import { fstatSync, readFileSync, readSync } from 'node:fs';
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import t from 'tap';
import { ExitReason, GuestMemory, Kvm } from '../../lib/index.js';
import { enterRealMode, guestImage, LOAD_ADDR, noKvm, runToHalt } from '../helpers/kvm.js';
import { childExecArgv } from '../helpers/spawn.js';
import { PAGE_BYTES, runTouch, touchMachine, touchValue, writeTouchTable } from '../helpers/touch.js';

const MiB = 1 << 20;
// napi runs the finalizer of a detached external ArrayBuffer on a later turn of the event loop;
// that is when the view's reference to the mapping goes.
const nextTurn = () => new Promise<void>((resolve) => setImmediate(resolve));

const isZeroFilled = (buffer: ArrayBuffer) => Buffer.from(buffer).equals(Buffer.alloc(buffer.byteLength));

t.test('create maps zero-filled anonymous memory of the requested size', async (t) => {
  for (const size of [PAGE_BYTES, MiB, 64 * MiB]) {
    const memory = GuestMemory.create(size);
    t.teardown(() => memory.close());
    t.equal(memory.size, size);
    t.equal(memory.buffer.byteLength, size, `buffer of ${size} bytes`);
    t.equal(memory.fd, -1, 'anonymous memory has no fd');
    t.ok(isZeroFilled(memory.buffer), `${size} bytes zero-filled`);
  }
});

t.test('memfd backing exposes the same bytes through its fd', async (t) => {
  const memory = GuestMemory.create(2 * PAGE_BYTES, { backing: 'memfd', hugepages: true, mergeable: true });
  t.teardown(() => memory.close());
  t.ok(memory.fd >= 0, `fd ${memory.fd}`);
  t.equal(fstatSync(memory.fd).size, 2 * PAGE_BYTES, 'the memfd has the memory size');
  memory.write(PAGE_BYTES + 8, Uint8Array.of(0xde, 0xad, 0xbe, 0xef));
  const viaFd = Buffer.alloc(4);
  t.equal(readSync(memory.fd, viaFd, 0, 4, PAGE_BYTES + 8), 4);
  t.same([...viaFd], [0xde, 0xad, 0xbe, 0xef], 'a write through the buffer is in the file');
});

t.test('create validates size and options', async (t) => {
  for (const size of [0, 4095, -4096, 1.5, 4097, NaN, Infinity]) {
    t.throws(() => GuestMemory.create(size), RangeError, `size ${size}`);
  }
  t.throws(() => GuestMemory.create('4096' as unknown as number), TypeError, "size '4096'");
  t.throws(() => GuestMemory.create(4096n as unknown as number), TypeError, 'size 4096n');
  t.throws(() => GuestMemory.create(4096, { backing: 'bogus' as 'memfd' }), RangeError, "backing 'bogus'");
  t.throws(() => GuestMemory.create(4096, null as unknown as object), TypeError, 'options null');
});

t.test('bytes() and write() stay inside the memory', async (t) => {
  const memory = GuestMemory.create(2 * PAGE_BYTES);
  t.teardown(() => memory.close());
  const size = memory.size;
  t.equal(memory.bytes().length, size, 'the whole memory by default');
  t.equal(memory.bytes(size - 4).length, 4, 'the rest from an offset');
  t.equal(memory.bytes(size, 0).length, 0, 'an empty view at the end');
  const view = memory.bytes(100, 3);
  view.set([7, 8, 9]);
  t.same([...new Uint8Array(memory.buffer, 100, 3)], [7, 8, 9], 'a view, not a copy');
  memory.write(size - 2, Uint8Array.of(1, 2));
  t.same([...memory.bytes(size - 2, 2)], [1, 2]);
  t.throws(() => memory.bytes(size - 1, 2), RangeError, 'one byte past the end');
  t.throws(() => memory.bytes(size + 1, 0), RangeError, 'offset past the end');
  t.throws(() => memory.bytes(-1), RangeError);
  t.throws(() => memory.bytes(1.5), RangeError);
  t.throws(() => memory.bytes('0' as unknown as number), TypeError);
  t.throws(() => memory.write(size - 2, new Uint8Array(3)), RangeError);
  t.throws(() => memory.write(0, [1, 2] as unknown as Uint8Array), TypeError);
  t.same([...memory.bytes(size - 4, 4)], [0, 0, 1, 2], 'rejected writes wrote nothing');
});

t.test('close() detaches every view at once and is idempotent', async (t) => {
  const memory = GuestMemory.create(PAGE_BYTES);
  const view = memory.bytes(0, 16);
  const words = new Uint32Array(memory.buffer);
  memory.close();
  t.equal(memory.closed, true);
  t.equal(memory.buffer.byteLength, 0, 'the buffer is detached');
  t.equal(view.length, 0, 'views made before close() are empty');
  t.equal(words.length, 0);
  t.equal(words[0], undefined, 'reading a detached view touches no memory');
  t.throws(() => memory.bytes(), { name: 'KvmError', code: 'EBADF' });
  t.throws(() => memory.write(0, Uint8Array.of(1)), { name: 'KvmError', code: 'EBADF' });
  t.throws(() => memory.handle, { name: 'KvmError', code: 'EBADF' });
  t.doesNotThrow(() => memory.close(), 'closing twice is fine');
  t.doesNotThrow(() => memory[Symbol.dispose](), 'and so is dispose');
});

t.test('stats() counts a mapping until its last view is gone', async (t) => {
  await nextTurn();
  const before = GuestMemory.stats();
  const memory = GuestMemory.create(MiB);
  t.same(GuestMemory.stats(), { mappings: before.mappings + 1, bytes: before.bytes + MiB });
  const second = GuestMemory.attach(memory.handle);
  t.equal(GuestMemory.stats().mappings, before.mappings + 1, 'a second view is the same mapping');
  memory.close();
  await nextTurn();
  t.equal(GuestMemory.stats().mappings, before.mappings + 1, 'the attached view still holds it');
  second.close();
  await nextTurn();
  t.same(GuestMemory.stats(), before, 'released once both views are closed');
});

t.test('a VM memory slot keeps the mapping alive after close()', { skip: noKvm }, async (t) => {
  await nextTurn();
  const before = GuestMemory.stats().mappings;
  const kvm = Kvm.open();
  const vm = kvm.createVm();
  const memory = GuestMemory.create(MiB);
  vm.setUserMemoryRegion({ slot: 0, guestPhysAddr: 0, memory });
  memory.write(LOAD_ADDR, guestImage('hello'));
  memory.close();
  await nextTurn();
  t.equal(GuestMemory.stats().mappings, before + 1, 'the slot holds the mapping');
  const vcpu = vm.createVcpu(0);
  enterRealMode(vcpu, LOAD_ADDR);
  t.equal(runToHalt(vcpu), 'Hello from node-kvm!\n', 'the guest runs from the closed object\'s memory');
  vcpu.close();
  vm.close();
  kvm.close();
  await nextTurn();
  t.equal(GuestMemory.stats().mappings, before, 'released with the VM and its vCPU');
});

t.test('guest RAM becomes an ArrayBuffer only when JavaScript first reads it, and the mapping lives until close()', async (t) => {
  // V8 counts a large external ArrayBuffer as memory pressure (and collects garbage for it at
  // once): a machine that never reads its RAM from JavaScript must not make one.
  const external = () => process.memoryUsage().external;
  const size = 64 * MiB;
  await nextTurn();
  const before = { external: external(), mappings: GuestMemory.stats().mappings };
  const memory = GuestMemory.create(size, { backing: 'memfd' });
  t.ok(external() - before.external < size / 2, 'no ArrayBuffer yet');
  t.equal(GuestMemory.stats().mappings, before.mappings + 1, 'the mapping is held natively meanwhile');
  const buffer = memory.buffer;
  t.equal(buffer.byteLength, size);
  t.ok(external() - before.external >= size, 'made by the first use');
  t.equal(memory.buffer, buffer, 'and the same one after');
  memory.write(4096, Uint8Array.of(7));
  t.equal(readSync(memory.fd, Buffer.alloc(1), 0, 1, 4096), 1);
  memory.close();
  t.equal(buffer.byteLength, 0, 'detached by close()');
  t.equal(memory.buffer.byteLength, 0, 'an empty buffer after close()');
  await nextTurn();
  t.same(GuestMemory.stats().mappings, before.mappings, 'unmapped');

  // Closed without ever having made its ArrayBuffer: the native reference goes all the same.
  const unread = GuestMemory.create(size);
  const handle = unread.handle;
  t.equal(GuestMemory.stats().mappings, before.mappings + 1);
  unread.close();
  await nextTurn();
  t.equal(GuestMemory.stats().mappings, before.mappings, 'released by close()');
  t.throws(() => GuestMemory.attach(handle), { name: 'KvmError', code: 'EBADF' });
  t.throws(() => unread.bytes(), { name: 'KvmError', code: 'EBADF' });
});

t.test('a large mapping leaves the address space on a thread of its own: uncounted and its fd closed at once, unmapped once unmapsSettled() resolves', async (t) => {
  const size = 64 * MiB;
  // A memfd mapping of this process, by the memfd's inode (the fifth field of a maps line).
  const mapped = (inode: number) => readFileSync('/proc/self/maps', 'utf8').split('\n')
    .some((line) => line.includes('memfd:node-kvm-guest-ram') && line.split(/\s+/)[4] === String(inode));
  await nextTurn();
  await GuestMemory.unmapsSettled();
  const before = GuestMemory.stats();
  for (const withView of [false, true]) {
    const memory = GuestMemory.create(size, { backing: 'memfd' });
    memory.fill(0, size, 0x5a); // every page populated: what makes an unmap slow
    const fd = memory.fd;
    const inode = fstatSync(fd).ino;
    t.ok(mapped(inode), 'mapped while open');
    const view = withView ? new Uint8Array(memory.buffer) : null;
    t.equal(view?.[size - 1] ?? 0x5a, 0x5a);
    memory.close();
    // A view's reference goes with its detached ArrayBuffer's finalizer, on the next turn.
    if (withView) await nextTurn();
    const when = withView ? 'once the view is gone' : 'after close()';
    t.throws(() => fstatSync(fd), { code: 'EBADF' }, `its fd is closed ${when}`);
    t.same(GuestMemory.stats(), before, `no longer counted ${when}`);
    await GuestMemory.unmapsSettled();
    t.notOk(mapped(inode), 'gone from the address space once unmapsSettled() resolves');
  }
  await t.resolves(GuestMemory.unmapsSettled(), 'unmapsSettled() with nothing queued resolves');
});

t.test('the unmapper keeps the addon loaded: threads that alone loaded it leave large memory open and end', async (t) => {
  // A process of its own, whose main thread never loads the addon (Node unloads it with the last
  // thread that did); the unmapper's thread crashed in the unloaded code before.
  const fixture = fileURLToPath(new URL('../fixtures/addon-in-threads-only.ts', import.meta.url));
  const child = spawn(process.execPath, [...childExecArgv, fixture], { stdio: ['ignore', 'pipe', 'pipe'] });
  let output = '';
  child.stdout.on('data', (chunk: Buffer) => (output += chunk.toString()));
  child.stderr.on('data', (chunk: Buffer) => (output += chunk.toString()));
  const [code, signal] = await new Promise<[number | null, string | null]>((resolve) => child.on('close', (c, s) => resolve([c, s])));
  t.same({ code, signal }, { code: 0, signal: null }, `exits cleanly (${output.trim() || 'no output'})`);
  t.match(output, /both threads ended/);
});

t.test('write() and fill() reach guest RAM without making its ArrayBuffer, inside its bounds only', async (t) => {
  const size = 64 * MiB;
  await nextTurn();
  const external = process.memoryUsage().external;
  const memory = GuestMemory.create(size, { backing: 'memfd' });
  t.teardown(() => memory.close());
  memory.write(size - 3, Uint8Array.of(1, 2, 3));
  memory.fill(4096, 8192, 0xab);
  memory.fill(8192, 2); // zero by default
  t.ok(process.memoryUsage().external - external < size / 2, 'still no ArrayBuffer');
  const read = (offset: number, length: number) => {
    const out = Buffer.alloc(length);
    readSync(memory.fd, out, 0, length, offset);
    return [...out];
  };
  t.same(read(size - 4, 4), [0, 1, 2, 3]);
  t.same(read(4095, 3), [0, 0xab, 0xab]);
  t.same(read(8191, 4), [0xab, 0, 0, 0xab]);
  t.same(read(4096 + 8192 - 1, 2), [0xab, 0]);
  // A view of the same memory as the source (memmove, not memcpy).
  memory.write(4090, memory.bytes(4094, 8));
  t.same([...memory.bytes(4090, 8)], [0, 0, 0xab, 0xab, 0xab, 0xab, 0xab, 0xab]);
  t.throws(() => memory.write(size - 2, Uint8Array.of(1, 2, 3)), RangeError);
  t.throws(() => memory.write(-1, Uint8Array.of(1)), RangeError);
  t.throws(() => memory.write(0, [1, 2] as unknown as Uint8Array), TypeError);
  t.throws(() => memory.fill(size, 1), RangeError);
  t.throws(() => memory.fill(0, size + 1), RangeError);
  t.throws(() => memory.fill(0, 1, 256), RangeError);
  t.throws(() => memory.fill(0, 1, 1.5), RangeError);
  t.same(read(size - 4, 4), [0, 1, 2, 3], 'nothing written by a refused call');
  memory.close();
  t.throws(() => memory.write(0, Uint8Array.of(1)), { name: 'KvmError', code: 'EBADF' });
  t.throws(() => memory.fill(0, 1), { name: 'KvmError', code: 'EBADF' });
});

t.test('closing an attached view leaves the creator\'s mapping alone', async (t) => {
  await nextTurn();
  const before = GuestMemory.stats().mappings;
  const memory = GuestMemory.create(PAGE_BYTES);
  const view = GuestMemory.attach(memory.handle);
  view.close();
  view.close();
  await nextTurn();
  t.equal(GuestMemory.stats().mappings, before + 1, 'the creator still holds it');
  const again = GuestMemory.attach(memory.handle);
  again.write(0, Uint8Array.of(0x42));
  t.equal(memory.bytes(0, 1)[0], 0x42);
  again.close();
  memory.close();
  await nextTurn();
  t.equal(GuestMemory.stats().mappings, before);
});

t.test('attach() gives another view of the same bytes', async (t) => {
  const memory = GuestMemory.create(2 * PAGE_BYTES, { backing: 'memfd' });
  const other = GuestMemory.attach(memory.handle);
  t.teardown(() => {
    memory.close();
    other.close();
  });
  t.equal(other.size, memory.size);
  t.equal(other.fd, memory.fd, 'the same memfd');
  t.not(other.buffer, memory.buffer, 'a distinct ArrayBuffer');
  memory.write(PAGE_BYTES, Uint8Array.of(0x11, 0x22));
  t.same([...other.bytes(PAGE_BYTES, 2)], [0x11, 0x22], 'written via one, read via the other');
  other.write(5, Uint8Array.of(0x33));
  t.equal(memory.bytes(5, 1)[0], 0x33, 'and back');
  other.close();
  t.equal(memory.buffer.byteLength, memory.size, 'closing one view leaves the other intact');
  t.same([...memory.bytes(PAGE_BYTES, 2)], [0x11, 0x22]);
});

t.test('attach() fails with EBADF once every reference is gone', async (t) => {
  const memory = GuestMemory.create(PAGE_BYTES);
  const handle = memory.handle;
  memory.close();
  await nextTurn();
  t.throws(() => GuestMemory.attach(handle), { name: 'KvmError', code: 'EBADF' });
  t.throws(() => GuestMemory.attach({ guestMemory: 0x7fffffff }), { name: 'KvmError', code: 'EBADF' }, 'an id never issued');
});

t.test('attach() validates its handle', async (t) => {
  t.throws(() => GuestMemory.attach({} as never), TypeError);
  t.throws(() => GuestMemory.attach(null as never), TypeError);
  t.throws(() => GuestMemory.attach({ guestMemory: '1' } as never), TypeError);
  t.throws(() => GuestMemory.attach({ guestMemory: -1 }), RangeError);
  t.throws(() => GuestMemory.attach({ guestMemory: 1.5 }), RangeError);
});

t.test('setUserMemoryRegion validates alignment and bounds before the ioctl', { skip: noKvm }, async (t) => {
  const kvm = Kvm.open();
  const vm = kvm.createVm();
  const memory = GuestMemory.create(MiB);
  t.teardown(() => {
    vm.close();
    memory.close();
    kvm.close();
  });
  const region = { slot: 0, guestPhysAddr: 0, memory };
  t.throws(() => vm.setUserMemoryRegion({ ...region, guestPhysAddr: 0x1001 }), RangeError, 'guestPhysAddr not page-aligned');
  t.throws(() => vm.setUserMemoryRegion({ ...region, guestPhysAddr: 0x800n }), RangeError, 'bigint guestPhysAddr not page-aligned');
  t.throws(() => vm.setUserMemoryRegion({ ...region, offset: 100 }), RangeError, 'offset not page-aligned');
  t.throws(() => vm.setUserMemoryRegion({ ...region, size: 4095 }), RangeError, 'size not a page multiple');
  t.throws(() => vm.setUserMemoryRegion({ ...region, size: 0 }), RangeError, 'size 0 (deleting is deleteUserMemoryRegion)');
  t.throws(() => vm.setUserMemoryRegion({ ...region, offset: MiB - PAGE_BYTES, size: 2 * PAGE_BYTES }), RangeError, 'offset + size past the memory');
  t.throws(() => vm.setUserMemoryRegion({ ...region, offset: MiB + PAGE_BYTES }), RangeError, 'offset past the memory');
  t.throws(() => vm.setUserMemoryRegion({ ...region, guestPhysAddr: 1n << 64n }), RangeError, 'guestPhysAddr beyond 64 bits');
  t.throws(() => vm.setUserMemoryRegion({ ...region, guestPhysAddr: (1n << 52n) - 4096n }), RangeError, 'past the guest physical address space');
  t.throws(() => vm.setUserMemoryRegion({ ...region, memory: {} as GuestMemory }), TypeError, 'memory not a GuestMemory');
  t.throws(() => vm.setUserMemoryRegion({ ...region, slot: -1 }), RangeError);
  t.throws(() => vm.setUserMemoryRegion(null as never), TypeError);
  const closed = GuestMemory.create(PAGE_BYTES);
  closed.close();
  t.throws(() => vm.setUserMemoryRegion({ ...region, memory: closed }), { name: 'KvmError', code: 'EBADF' }, 'closed memory');
  t.doesNotThrow(() => vm.setUserMemoryRegion({ ...region, offset: PAGE_BYTES, size: MiB - PAGE_BYTES }), 'the last page-aligned range fits');
});

t.test('overlapping slots fail with EEXIST', { skip: noKvm }, async (t) => {
  const kvm = Kvm.open();
  const vm = kvm.createVm();
  const low = GuestMemory.create(MiB);
  const high = GuestMemory.create(MiB);
  t.teardown(() => {
    vm.close();
    low.close();
    high.close();
    kvm.close();
  });
  vm.setUserMemoryRegion({ slot: 0, guestPhysAddr: 0, memory: low });
  t.throws(() => vm.setUserMemoryRegion({ slot: 1, guestPhysAddr: 0x80000, memory: high }), {
    name: 'KvmError', code: 'EEXIST', errno: -17, syscall: 'ioctl(KVM_SET_USER_MEMORY_REGION)',
  });
  t.doesNotThrow(() => vm.setUserMemoryRegion({ slot: 1, guestPhysAddr: MiB, memory: high }), 'adjacent is fine');
});

t.test('a guest write to a readonly slot exits as MMIO', { skip: noKvm }, async (t) => {
  const machine = touchMachine({ logFlags: { readonly: true } });
  t.teardown(() => machine.close());
  const target = machine.logBase + 2 * PAGE_BYTES;
  writeTouchTable(machine.memory, [target]);
  const writes: unknown[] = [];
  const result = runTouch(machine.vcpu, (reason) => {
    if (reason !== ExitReason.Mmio) return false;
    const exit = machine.vcpu.exit();
    if (exit.reason === 'mmio') writes.push({ ...exit, data: [...exit.data] });
    return true;
  });
  t.same(writes, [{ reason: 'mmio', addr: BigInt(target), isWrite: true, len: 2, data: [0x00, 0xa5] }], 'the u16 0xa500, little-endian');
  t.same(result, { doneMarkers: 1 }, 'the guest carried on after the exit');
  t.equal(new DataView(machine.memory.buffer).getUint16(target, true), 0, 'the readonly page is unchanged');
});

t.test('a deleted slot can be mapped again', { skip: noKvm }, async (t) => {
  const machine = touchMachine({ logFlags: {} });
  t.teardown(() => machine.close());
  const { vm, memory, logBase } = machine;
  const target = logBase + 3 * PAGE_BYTES;
  writeTouchTable(memory, [target]);
  vm.deleteUserMemoryRegion(1);
  const unmapped: bigint[] = [];
  runTouch(machine.vcpu, (reason) => {
    if (reason !== ExitReason.Mmio) return false;
    unmapped.push(machine.vcpu.kvmRun.mmioPhysAddr);
    return true;
  });
  t.same(unmapped, [BigInt(target)], 'with the slot gone, the store is an MMIO exit');
  t.equal(new DataView(memory.buffer).getUint16(target, true), 0);
  vm.setUserMemoryRegion({ slot: 1, guestPhysAddr: logBase, memory, offset: logBase, size: memory.size - logBase });
  enterRealMode(machine.vcpu, LOAD_ADDR);
  t.same(runTouch(machine.vcpu), { doneMarkers: 1 }, 'no MMIO exit once the slot is back');
  t.equal(new DataView(memory.buffer).getUint16(target, true), touchValue(0));
  t.throws(() => vm.deleteUserMemoryRegion(7), { name: 'KvmError', code: 'EINVAL' }, 'deleting a slot that was never added');
});
