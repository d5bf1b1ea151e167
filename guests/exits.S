/*
 * exits.S - benchmark guest: N port-I/O exits, then halt.
 *
 * Run: for bench:exits and the library (ECX set by the host); node-kvm run guests/build/exits.bin
 *     does a million exits.
 *
 * Contract with the host:
 *   - Loaded at guest-physical 0x7c00, entered in real mode at CS:IP 0:0x7c00.
 *   - ECX (full 32 bits) = iteration count, set by the host via KVM_SET_REGS.
 *     ECX == 0 means the default of 1000000.
 *   - Each iteration does exactly one 1-byte `out %al, $0x80`, i.e. exactly
 *     ECX KVM_EXIT_IO exits for port 0x80. AL = low byte of the remaining
 *     count (so the data is not constant). The counter lives in EAX, so at
 *     the final hlt EAX = 0 and ECX still holds the count actually used.
 *   - Then `cli; hlt` -> KVM_EXIT_HLT. Writes no memory.
 *
 * The loop is 3 instructions on purpose: guest kernel-mode code is emulated
 * on some hosts (e.g. kvm_pvm), so every extra instruction costs time that
 * would pollute the per-exit measurement.
 */
        .code16
        .text
        .globl  _start
_start:
        test    %ecx, %ecx
        jnz     1f
        mov     $1000000, %ecx          /* host left ECX at 0: use the default */
1:      mov     %ecx, %eax              /* count in EAX: then AL is the counter's low byte for free */
2:      out     %al, $0x80              /* the exit being measured */
        dec     %eax                    /* 32-bit: counts above 65535 work */
        jnz     2b
        cli
3:      hlt
        jmp     3b                      /* halt again if ever woken */
