/*
 * inspect.S - an ELF64 kernel for exit statistics, exit traces and register and memory
 * inspection: a known number of exits of each kind, known registers, a known string.
 *
 * Run: node-kvm run guests/build/inspect.elf (or inspect-spin.elf, which never ends) --api-socket
 *     PATH, then node-kvm regs, x or stats.
 *
 * Contract with the host:
 *   - Entered at _start in long mode on the loader's identity map (the first 4 GiB).
 *   - RBX = 0x1122334455667788; R12 = the address of `marker`, 16 bytes "node-kvm inspect".
 *   - Exits, in this order: 2 one-byte reads of port 0x3fd (COM1's line status); a 4-byte MMIO
 *     write of 0x12345678 to 0xc0000000 (no device there), then a 4-byte read of it; 3 one-byte
 *     writes to port 0x80 of 3, 2, 1.
 *   - Then `cli; hlt` (one KVM_EXIT_HLT without the in-kernel irqchip), or, built with SPIN
 *     (inspect-spin.elf), a jump to itself at `spin` forever: no more exits.
 */
        .code64
        .text
        .globl  _start, marker
_start:
        movabs  $0x1122334455667788, %rbx
        lea     marker(%rip), %r12
        mov     $0x3fd, %dx
        in      %dx, %al
        in      %dx, %al
        mov     $0xc0000000, %edi
        movl    $0x12345678, (%rdi)
        mov     (%rdi), %eax
        mov     $3, %ecx
1:      mov     %cl, %al
        out     %al, $0x80
        dec     %ecx
        jnz     1b
.ifdef SPIN
        .globl  spin
spin:   jmp     spin
.else
        cli
2:      hlt
        jmp     2b
.endif

        .data
marker: .ascii  "node-kvm inspect"
