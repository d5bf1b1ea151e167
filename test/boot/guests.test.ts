// Each loader format booted for real on vCPU 0 (the raw binding, no VMM): the guest's exact
// COM1 output and debug-exit code.
import t, { type Test } from 'tap';
import { HVM_START_MAGIC, memoryMap } from '../../lib/boot/index.js';
import { bootGuest, elfGuest, runGuest, type BootOptions } from '../helpers/boot-runner.js';
import { guestImage, noKvm } from '../helpers/kvm.js';

const MiB = 1 << 20;
const hex16 = (value: bigint) => value.toString(16).padStart(16, '0');
/** The memory map as the multiboot and pvh guests print it. */
const mmapLines = (memoryBytes: number) => memoryMap(memoryBytes).map((e) => `mmap 0x${hex16(e.addr)} 0x${hex16(e.size)} ${e.type}\n`).join('');

function boot(t: Test, image: Uint8Array, options: BootOptions = {}) {
  const guest = bootGuest(image, options);
  t.teardown(() => guest.close());
  return guest;
}

t.test('protected: a 32-bit kernel on the loader GDT', { skip: noKvm }, async (t) => {
  const guest = boot(t, elfGuest('protected'));
  t.same(runGuest(guest.vcpu), { output: 'protected mode OK\n', end: { reason: 'debug-exit', code: 0x10 } });
});

for (const memoryBytes of [64 * MiB, 1536 * MiB]) {
  t.test(`long: a 64-bit kernel reaches the top of ${memoryBytes / MiB} MiB through the identity map`, { skip: noKvm }, async (t) => {
    const guest = boot(t, elfGuest('long'), { memoryBytes });
    t.same(runGuest(guest.vcpu), { output: 'long mode OK\n', end: { reason: 'debug-exit', code: 0x11 } });
    t.equal(Buffer.from(guest.memory.bytes(memoryBytes - 8, 8)).toString('latin1'), 'dom gnol', 'its quadword landed at RAM top - 8');
  });
}

t.test('the identity map as KVM walks it', { skip: noKvm }, async (t) => {
  const memoryBytes = 1536 * MiB;
  const guest = boot(t, elfGuest('long'), { memoryBytes });
  for (const va of [0x100000n, BigInt(memoryBytes - 8), 0xfee00020n]) {
    const translation = guest.vcpu.translate(va);
    t.equal(translation.valid, true, `0x${va.toString(16)} is mapped`);
    t.equal(translation.physicalAddress, va, `0x${va.toString(16)} maps to itself`);
  }
});

t.test('multiboot: the kernel prints the memory map and command line it was given', { skip: noKvm }, async (t) => {
  const memoryBytes = 64 * MiB;
  const guest = boot(t, elfGuest('multiboot'), { memoryBytes, cmdline: 'console=ttyS0 loglevel=7' });
  t.same(runGuest(guest.vcpu), {
    output: `mem 639 ${(memoryBytes - MiB) / 1024}\n${mmapLines(memoryBytes)}cmdline: console=ttyS0 loglevel=7\n`,
    end: { reason: 'debug-exit', code: 0x12 },
  });
});

t.test('multiboot without a command line prints none', { skip: noKvm }, async (t) => {
  const memoryBytes = 32 * MiB;
  const guest = boot(t, elfGuest('multiboot'), { memoryBytes });
  t.same(runGuest(guest.vcpu), { output: `mem 639 ${31 * 1024}\n${mmapLines(memoryBytes)}`, end: { reason: 'debug-exit', code: 0x12 } });
});

t.test('a flat Multiboot kernel (header address fields) starts with the magic in EAX', { skip: noKvm }, async (t) => {
  // At 0x200000: the header (12 bytes + 5 address fields), then: mov %eax,%ecx; mov $0x3f8,%dx;
  // mov $'M',%al; out %al,%dx; mov %cl,%al; out %al,$0xf4; hlt. So the exit code is EAX's low byte.
  const header = Buffer.alloc(32);
  [0x1badb002, 0x10002, -(0x1badb002 + 0x10002) >>> 0, 0x200000, 0x200000, 0, 0, 0x200020].forEach((v, i) => header.writeUInt32LE(v >>> 0, i * 4));
  const code = Buffer.from([0x89, 0xc1, 0x66, 0xba, 0xf8, 0x03, 0xb0, 0x4d, 0xee, 0x88, 0xc8, 0xe6, 0xf4, 0xf4]);
  const guest = boot(t, new Uint8Array(Buffer.concat([header, code])));
  t.equal(guest.plan.format, 'multiboot');
  t.same(runGuest(guest.vcpu), { output: 'M', end: { reason: 'debug-exit', code: 0x02 } }, 'EAX = 0x2BADB002');
});

t.test('pvh: entered at the note, the kernel prints the start info memory map and command line', { skip: noKvm }, async (t) => {
  const memoryBytes = 256 * MiB;
  const guest = boot(t, elfGuest('pvh'), { memoryBytes, cmdline: 'root=/dev/vda rw' });
  t.same(runGuest(guest.vcpu), { output: `${mmapLines(memoryBytes)}cmdline: root=/dev/vda rw\n`, end: { reason: 'debug-exit', code: 0x13 } });
});

t.test('pvh: a start info with a bad magic is refused by the guest', { skip: noKvm }, async (t) => {
  const guest = boot(t, elfGuest('pvh'), { setup: (memory) => new DataView(memory.buffer).setUint32(0x6000, HVM_START_MAGIC + 1, true) });
  t.same(runGuest(guest.vcpu), { output: 'pvh BAD: EBX does not point to an hvm_start_info\n', end: { reason: 'debug-exit', code: 0x7f } });
});

// mov $0x3f8,%dx; mov $'P',%al; out %al,%dx; mov $0x15,%al; out %al,$0xf4; hlt -- the same bytes
// in 32- and 64-bit code.
const flatCode = new Uint8Array([0x66, 0xba, 0xf8, 0x03, 0xb0, 0x50, 0xee, 0xb0, 0x15, 0xe6, 0xf4, 0xf4]);

t.test('a flat binary in protected mode', { skip: noKvm }, async (t) => {
  const guest = boot(t, flatCode, { mode: 'protected', loadAddr: 0x100000 });
  t.same(runGuest(guest.vcpu), { output: 'P', end: { reason: 'debug-exit', code: 0x15 } });
  const sregs = guest.vcpu.getSregs();
  t.equal(sregs.cr0 & 0x80000001n, 1n, 'PE, no paging');
  t.equal(sregs.cs.db, 1, 'a 32-bit code segment');
  t.equal(guest.vcpu.getRegs().rip, 0x100000n + 11n, 'stopped after its out');
});

t.test('a flat binary in long mode at the default load address', { skip: noKvm }, async (t) => {
  const guest = boot(t, flatCode, { mode: 'long' });
  t.same(runGuest(guest.vcpu), { output: 'P', end: { reason: 'debug-exit', code: 0x15 } });
  const sregs = guest.vcpu.getSregs();
  t.equal(sregs.efer & 0x400n, 0x400n, 'EFER.LMA');
  t.equal(sregs.cs.l, 1, 'a 64-bit code segment');
  t.equal(guest.vcpu.getRegs().rip, 0x7c00n + 11n);
});

t.test('hello through the loader: real mode at 0000:7c00', { skip: noKvm }, async (t) => {
  const guest = boot(t, guestImage('hello'), { memoryBytes: MiB });
  t.same(runGuest(guest.vcpu), { output: 'Hello from node-kvm!\n', end: { reason: 'hlt' } });
});
