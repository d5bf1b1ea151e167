/*
 * echo-irq.S - an interrupt-driven serial console: the UART's receive interrupt (IRQ 4 through the
 * in-kernel 8259 PIC, vector 0x0c) echoes every byte; 'q' ends the guest with debug-exit 0x06.
 *
 * Run: printf 'hi q' | node-kvm run guests/build/echo-irq.bin (needs the in-kernel irqchip: not
 *     with --no-irqchip; exits 13).
 *
 * Contract with the host: flat real-mode binary at 0x7c00, run with the in-kernel irqchip. Prints
 * "irq> " first, then sleeps in HLT between interrupts; each received byte is sent back
 * unchanged, 'q' included, before the exit. Uses the stack at 0:0x7c00 (below the code).
 */
        .code16
        .include "serial16.inc"
        .text
        .globl  _start
_start:
        cli
        xor     %ax, %ax
        mov     %ax, %ds
        mov     %ax, %ss
        mov     $0x7c00, %sp
        movw    $on_irq4, 0x0c * 4      /* real-mode vector 0x0c: offset, then segment 0 */
        movw    $0, 0x0c * 4 + 2
        /* 8259 master: ICW1 (edge, cascade, ICW4), ICW2 base 0x08, ICW3 slave on 2, ICW4 8086. */
        mov     $0x11, %al
        out     %al, $0x20
        mov     $0x08, %al
        out     %al, $0x21
        mov     $0x04, %al
        out     %al, $0x21
        mov     $0x01, %al
        out     %al, $0x21
        mov     $0xef, %al              /* OCW1: only IRQ 4 unmasked */
        out     %al, $0x21
        mov     $prompt, %si
        puts_cs
        mov     $0x3fc, %dx             /* MCR: OUT2 gates the UART's interrupt on a PC */
        mov     $0x08, %al
        out     %al, %dx
        mov     $0x3f9, %dx             /* IER: received data available */
        mov     $0x01, %al
        out     %al, %dx
        sti
3:      hlt
        jmp     3b

on_irq4:
        push    %ax
        push    %dx
        mov     $0x3fa, %dx             /* IIR: acknowledge */
        in      %dx, %al
4:      mov     $0x3fd, %dx             /* LSR: drain everything received */
        in      %dx, %al
        test    $1, %al
        jz      5f
        mov     $0x3f8, %dx
        in      %dx, %al
        out     %al, %dx                /* echo */
        cmp     $'q', %al
        jne     4b
        mov     $0x06, %al
        out     %al, $0xf4
        jmp     4b
5:      mov     $0x20, %al              /* non-specific EOI to the master PIC */
        out     %al, $0x20
        pop     %dx
        pop     %ax
        iret

prompt: .asciz  "irq> "
