/*
 * wild.S - a hostile guest: accesses ports and MMIO addresses where nothing is, then reports.
 *
 * Run: node-kvm run guests/build/wild.bin --memory 1M (needs exactly --memory 1M; exits 103).
 *
 * Contract with the host:
 *   - Flat real-mode binary at 0x7c00, entered at CS:IP 0:0x7c00, with exactly 1 MiB of RAM,
 *     so that 0x100000 (0xffff:0x0010) is not memory but unclaimed MMIO.
 *   - Writes to ports 0x2f0 and 0x1234, reads port 0x2345, writes and reads MMIO 0x100000.
 *   - Both reads must return all-ones (0xff). Prints "wild ok\n" on COM1 if they did, else
 *     "wild bad\n", then writes 0x33 to the debug-exit port 0xf4.
 */
        .code16
        .include "serial16.inc"
        .text
        .globl  _start
_start:
        xor     %bx, %bx                /* BL counts reads that were not 0xff */
        mov     $0x5a, %al
        mov     $0x2f0, %dx
        out     %al, %dx                /* unknown port writes */
        mov     $0x1234, %dx
        out     %al, %dx
        mov     $0x2345, %dx
        in      %dx, %al                /* unknown port read: expect 0xff */
        cmp     $0xff, %al
        je      1f
        inc     %bl
1:      mov     $0xffff, %ax
        mov     %ax, %es
        movb    $0x77, %es:0x10         /* unknown MMIO write at 0x100000 */
        mov     %es:0x10, %al           /* unknown MMIO read: expect 0xff */
        cmp     $0xff, %al
        je      2f
        inc     %bl
2:      mov     $ok, %si
        test    %bl, %bl
        jz      3f
        mov     $bad, %si
3:      puts_cs
        mov     $0x33, %al
        out     %al, $0xf4              /* debug exit: status (0x33 << 1) | 1 */
        cli
6:      hlt
        jmp     6b

ok:     .asciz  "wild ok\n"
bad:    .asciz  "wild bad\n"
