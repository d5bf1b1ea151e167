/*
 * portscan.S - a hostile guest: reads every port of 0x1000..0x1fff, where no device is.
 *
 * Run: node-kvm run guests/build/portscan.bin (no options needed).
 *
 * Contract with the host:
 *   - Flat real-mode binary at 0x7c00, entered at CS:IP 0:0x7c00.
 *   - Exactly 4096 one-byte port reads, one per port 0x1000..0x1fff (each an unknown port),
 *     then writes 0x21 to the debug-exit port 0xf4: status (0x21 << 1) | 1.
 *   - BL counts reads that did not return 0xff (a port with nothing behind it reads all-ones);
 *     it is in EBX at the exit.
 */
        .code16
        .text
        .globl  _start
_start:
        xor     %bx, %bx
        mov     $0x1000, %dx
1:      in      %dx, %al
        cmp     $0xff, %al
        je      2f
        inc     %bl
2:      inc     %dx
        cmp     $0x2000, %dx
        jne     1b
        mov     $0x21, %al
        out     %al, $0xf4
3:      hlt
        jmp     3b
