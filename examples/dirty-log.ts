// Dirty logging with the raw binding: a memory slot with KVM_MEM_LOG_DIRTY_PAGES, a guest that
// writes one byte into two pages, and KVM_GET_DIRTY_LOG telling which pages were written.
import { ExitReason, GuestMemory, Kvm } from 'node-kvm';

const PAGE_SIZE = 4096;
// 16-bit code: write a byte at 0x10000 (page 16) and at 0x30000 (page 48), then halt.
// mov ax, 0x1000; mov ds, ax; mov byte [0], 1; mov ax, 0x3000; mov ds, ax; mov byte [0], 1; hlt
const code = Uint8Array.of(0xb8, 0x00, 0x10, 0x8e, 0xd8, 0xc6, 0x06, 0x00, 0x00, 0x01, 0xb8, 0x00, 0x30, 0x8e, 0xd8, 0xc6, 0x06, 0x00, 0x00, 0x01, 0xf4);

using kvm = Kvm.open();
using vm = kvm.createVm();
using memory = GuestMemory.create(256 * 1024);
memory.write(0x1000, code); // written before logging starts: not in the log
vm.setUserMemoryRegion({ slot: 0, guestPhysAddr: 0, memory, flags: { logDirtyPages: true } });
using vcpu = vm.createVcpu(0);
vcpu.setSregs({ ...vcpu.getSregs(), cs: { ...vcpu.getSregs().cs, base: 0n, selector: 0 } });
vcpu.setRegs({ ...vcpu.getRegs(), rip: 0x1000n, rflags: 0x2n });
const reason = vcpu.run();
if (reason !== ExitReason.Hlt) throw new Error(`expected HLT, got ${vcpu.exit().reason}`);

/** The pages whose bit is set in a KVM dirty bitmap (one bit per page, little-endian). */
function dirtyPages(bitmap: Uint8Array): number[] {
  const pages: number[] = [];
  bitmap.forEach((byte, index) => {
    for (let bit = 0; bit < 8; bit++) if (byte & (1 << bit)) pages.push(index * 8 + bit);
  });
  return pages;
}

// Reading the log also clears it (without manual protect): a second read finds nothing new.
console.log(`dirty pages: ${dirtyPages(vm.getDirtyLog(0)).join(', ')} (of ${memory.size / PAGE_SIZE})`);
console.log(`then: ${dirtyPages(vm.getDirtyLog(0)).length} dirty`);
