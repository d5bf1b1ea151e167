// A guest in twenty lines, with the raw binding only: eight bytes of 16-bit code that print "Hi"
// on COM1 and halt, one memory slot, one vCPU, and the run loop.
import { ExitReason, GuestMemory, Kvm } from 'node-kvm';

// mov dx, 0x3f8; mov al, 'H'; out dx, al; mov al, 'i'; out dx, al; hlt
const code = Uint8Array.of(0xba, 0xf8, 0x03, 0xb0, 0x48, 0xee, 0xb0, 0x69, 0xee, 0xf4);

using kvm = Kvm.open();
using vm = kvm.createVm();
using memory = GuestMemory.create(0x10000); // 64 KiB of guest RAM at guest-physical 0
vm.setUserMemoryRegion({ slot: 0, guestPhysAddr: 0, memory });
memory.write(0x1000, code);
using vcpu = vm.createVcpu(0);
vcpu.setSregs({ ...vcpu.getSregs(), cs: { ...vcpu.getSregs().cs, base: 0n, selector: 0 } });
vcpu.setRegs({ ...vcpu.getRegs(), rip: 0x1000n, rflags: 0x2n });

let output = '';
while (vcpu.run() === ExitReason.Io) output += String.fromCharCode(vcpu.kvmRun.bytes[vcpu.kvmRun.ioDataOffset]!);
console.log(`the guest wrote ${JSON.stringify(output)}, then exited: ${vcpu.exit().reason}`);
