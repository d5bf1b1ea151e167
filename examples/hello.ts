// Runs the `hello` guest (16-bit real mode) with the raw binding: one memory slot, one vCPU,
// and a loop that prints what the guest writes to COM1 until it halts.
import { readFileSync } from 'node:fs';
import { ExitReason, GuestMemory, IoDirection, Kvm } from 'node-kvm';

const COM1 = 0x3f8;
const LOAD_ADDR = 0x7c00;
const image = readFileSync(new URL('../../guests/build/hello.bin', import.meta.url));

using kvm = Kvm.open();
using vm = kvm.createVm();
using memory = GuestMemory.create(1 << 20); // 1 MiB of guest RAM at guest-physical 0
vm.setUserMemoryRegion({ slot: 0, guestPhysAddr: 0, memory });
memory.write(LOAD_ADDR, image);

using vcpu = vm.createVcpu(0);
const sregs = vcpu.getSregs();
sregs.cs.base = 0n; // real mode: CS:IP = 0000:7c00
sregs.cs.selector = 0;
vcpu.setSregs(sregs);
vcpu.setRegs({ ...vcpu.getRegs(), rip: BigInt(LOAD_ADDR), rflags: 0x2n });

const run = vcpu.kvmRun;
for (;;) {
  const reason = vcpu.run();
  if (reason === ExitReason.Io && run.ioPort === COM1 && run.ioDirection === IoDirection.Out) {
    const offset = run.ioDataOffset;
    process.stdout.write(run.bytes.subarray(offset, offset + run.ioSize * run.ioCount));
  } else if (reason === ExitReason.Hlt) {
    break;
  } else {
    throw new Error(`unexpected exit: ${JSON.stringify(vcpu.exit(), (_, v) => (typeof v === 'bigint' ? `0x${v.toString(16)}` : v))}`);
  }
}
