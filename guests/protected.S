/*
 * protected.S - an ELF32 kernel entered in 32-bit protected mode.
 *
 * Run: node-kvm run guests/build/protected.elf (no options needed).
 *
 * Contract with the host (the loader's ELF32 entry state, lib/boot):
 *   - Linked at 1 MiB; its PT_LOAD segments are loaded at their physical addresses (.bss
 *     zero-filled), and it is entered at _start with CR0.PE=1, paging off, flat 4 GiB 32-bit
 *     segments loaded from the loader's GDT in guest RAM, interrupts off. It sets its own stack.
 *   - Checks: CR0.PE=1 and CR0.PG=0; the GDT descriptor that CS was loaded from (read through
 *     SGDT) is a present 32-bit code segment (D=1); reloading CS (far jump) and DS/ES/SS from
 *     that GDT works.
 *   - Prints "protected mode OK\n" on COM1 (one 1-byte `out` per byte), then writes 0x10 to the
 *     debug-exit port 0xf4. A failed check prints "protected mode BAD: <check>\n" and writes 0x7f.
 *   - Then `cli; hlt` forever.
 */
        .code32
        .text
        .globl  _start
_start:
        mov     $stack_top, %esp
        mov     %cr0, %eax
        mov     $msg_pe, %esi
        test    $1, %eax                /* CR0.PE */
        jz      die
        mov     $msg_pg, %esi
        test    $0x80000000, %eax       /* CR0.PG */
        jnz     die

        /* The descriptor CS came from: GDT base + (CS & ~7), as the loader wrote it to RAM. */
        sgdt    gdtr
        mov     $msg_cs, %esi
        xor     %eax, %eax
        mov     %cs, %ax
        and     $0xfff8, %eax
        movzwl  gdtr, %ecx              /* the whole descriptor within the GDT limit */
        lea     7(%eax), %edx
        cmp     %ecx, %edx
        ja      die
        add     gdtr+2, %eax
        mov     4(%eax), %edx           /* high dword: access byte in 15:8, D/B in bit 22 */
        test    $0x8000, %edx           /* present */
        jz      die
        test    $0x0800, %edx           /* type bit 3: code */
        jz      die
        test    $0x1000, %edx           /* S: code/data, not system */
        jz      die
        test    $0x400000, %edx         /* D: 32-bit default operand size */
        jz      die

        /* Reload CS and the data segments from the same GDT. */
        mov     %cs, %ax
        mov     %ax, far_ptr+4
        ljmp    *far_ptr
reloaded:
        mov     %ds, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %ss

        mov     $msg_ok, %esi
        call    puts
        mov     $0x10, %al
        out     %al, $0xf4
        jmp     halt

        .include "serial32.inc"
        .include "halt.inc"

msg_ok:  .asciz "protected mode OK\n"
msg_pe:  .asciz "protected mode BAD: CR0.PE is clear\n"
msg_pg:  .asciz "protected mode BAD: CR0.PG is set\n"
msg_cs:  .asciz "protected mode BAD: CS is not a 32-bit code segment of the GDT\n"

        .data
        .align  4
far_ptr: .long  reloaded
        .word   0
gdtr:   .word   0
        .long   0

        .bss
        .align  16
        .space  1024
stack_top:
