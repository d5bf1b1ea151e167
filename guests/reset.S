/*
 * reset.S - asks the i8042 keyboard controller to reset the CPU (command 0xFE on port 0x64), as
 * PC firmware and Linux's reboot=k do. Flat real-mode binary at 0x7c00.
 *
 * Run: node-kvm run guests/build/reset.bin (no options needed).
 */
        .code16
        .text
        .globl  _start
_start:
        mov     $0xfe, %al
        out     %al, $0x64
        cli
1:      hlt
        jmp     1b
