/*
 * echo.S - a polled serial console: echoes every byte it receives on COM1 until it reads 'q',
 * then writes 0x05 to the debug-exit port. Flat real-mode binary at 0x7c00.
 *
 * Run: printf 'hi q' | node-kvm run guests/build/echo.bin (no options needed; exits 11 after 'q').
 *
 * Contract with the host: prints "echo> " first; each received byte is sent back unchanged, 'q'
 * included, before the exit. Polls the line status register (bit 0, data ready); no interrupts.
 */
        .code16
        .include "serial16.inc"
        .text
        .globl  _start
_start:
        mov     $prompt, %si
        puts_cs
2:      mov     $0x3fd, %dx             /* LSR */
3:      in      %dx, %al
        test    $1, %al                 /* data ready? */
        jz      3b
        mov     $0x3f8, %dx
        in      %dx, %al                /* RBR */
        out     %al, %dx                /* THR: echo */
        cmp     $'q', %al
        jne     2b
        mov     $0x05, %al
        out     %al, $0xf4
        cli
4:      hlt
        jmp     4b

prompt: .asciz  "echo> "
