/*
 * triple.S - triple-faults on purpose: loads an interrupt descriptor table with no present gates, then raises an
 * exception that cannot be delivered (nor can the double fault that follows).
 *
 * Run: node-kvm run guests/build/triple.bin --mode protected (needs --mode protected; exits 1 with
 *     a register dump).
 *
 * Contract with the host: a flat binary of 32-bit code, loaded at 0x7c00 and entered in
 * protected mode (node-kvm run --mode protected); sets EAX=0x1111, EBX=0x2222 first so that the
 * host's register dump can be checked; never reaches the HLT after UD2.
 */
        .code32
        .text
        .globl  _start
_start:
        mov     $0x1111, %eax
        mov     $0x2222, %ebx
        lidt    empty_idt
        ud2                             /* gate 6 is not present: #NP, then #DF (also absent), shutdown */
        cli
1:      hlt
        jmp     1b

        .p2align 2
empty_idt:
        .word   0x7ff                   /* 256 gates, none present */
        .long   0x1000                  /* base: zeroed guest RAM */
