/*
 * hello.S - prints "Hello from node-kvm!\n" on COM1, then halts.
 *
 * Run: node-kvm run guests/build/hello.bin (no options needed).
 *
 * Contract with the host:
 *   - Loaded at guest-physical 0x7c00, entered in real mode with CS=0,
 *     IP=0x7c00 (DS value is irrelevant: the string is read via CS).
 *   - Emits exactly 21 bytes (LF only, no CR) to port 0x3f8, one 1-byte
 *     `out` per byte, so the host sees one KVM_EXIT_IO per byte.
 *   - Then executes `cli; hlt` -> KVM_EXIT_HLT. If ever woken, it halts again.
 *   - Writes no memory (no stack use).
 */
        .code16
        .include "serial16.inc"
        .text
        .globl  _start
_start:
        mov     $msg, %si
        puts_cs
        cli                             /* no interrupts may wake us */
3:      hlt
        jmp     3b                      /* NMI/SMI could still wake us: halt again */

msg:    .ascii  "Hello from node-kvm!\n"
        .byte   0                       /* terminator, not sent */
