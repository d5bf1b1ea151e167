/*
 * count.S - writes the bytes 0, 1, 2, ... 255, 0, 1, ... to COM1 without end, one `out` each:
 * every exit is a port write, so a pause almost always lands on one.
 *
 * Contract with the host: flat real-mode binary at 0x7c00. Byte n of the output is n & 0xff,
 * whatever pauses, snapshots, migrations or reboots happen in between (a reboot starts again
 * at 0). Does not poll the line status register; writes no memory.
 */
        .code16
        .text
        .globl  _start
_start:
        xor     %al, %al
        mov     $0x3f8, %dx
1:      out     %al, %dx
        inc     %al
        jmp     1b
