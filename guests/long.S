/*
 * long.S - an ELF64 kernel entered in 64-bit long mode.
 *
 * Run: node-kvm run guests/build/long.elf (no options needed).
 *
 * Contract with the host (the loader's ELF64 entry state, lib/boot):
 *   - Linked at 1 MiB, entered at _start in long mode on the loader's identity-mapped page
 *     tables, interrupts off, RBX = address of an hvm_start_info (magic 0x336ec578) whose memory
 *     map describes guest RAM. It sets its own stack.
 *   - Checks: EFER.LMA=1 (RDMSR 0xc0000080); the start info's magic; then writes the quadword
 *     0x6c6f6e67206d6f64 ("dom gnol" as bytes) at (end of the highest RAM entry) - 8 and reads
 *     it back through the identity map. The host can check guest RAM there.
 *   - Prints "long mode OK\n" on COM1 and writes 0x11 to the debug-exit port 0xf4. A failed check
 *     prints "long mode BAD: <check>\n" and writes 0x7f.
 */
        .code64
        .text
        .globl  _start
_start:
        lea     stack_top(%rip), %rsp
        mov     $0xc0000080, %ecx       /* IA32_EFER */
        rdmsr
        lea     msg_lma(%rip), %rsi
        test    $0x400, %eax            /* LMA */
        jz      die

        lea     msg_magic(%rip), %rsi
        cmpl    $0x336ec578, (%rbx)     /* hvm_start_info.magic */
        jne     die
        /* Highest end of a RAM (type 1) entry of the memmap. */
        mov     40(%rbx), %r8           /* memmap_paddr */
        mov     48(%rbx), %ecx          /* memmap_entries */
        xor     %r9, %r9
1:      test    %ecx, %ecx
        jz      2f
        cmpl    $1, 16(%r8)
        jne     3f
        mov     (%r8), %rax
        add     8(%r8), %rax
        cmp     %r9, %rax
        cmova   %rax, %r9
3:      add     $24, %r8
        dec     %ecx
        jmp     1b
2:      lea     msg_top(%rip), %rsi
        test    %r9, %r9
        jz      die
        mov     $0x6c6f6e67206d6f64, %rax
        mov     %rax, -8(%r9)
        cmp     -8(%r9), %rax
        jne     die

        lea     msg_ok(%rip), %rsi
        call    puts
        mov     $0x11, %al
        out     %al, $0xf4
        jmp     halt

        .include "serial64.inc"
        .include "halt.inc"

msg_ok:    .asciz "long mode OK\n"
msg_lma:   .asciz "long mode BAD: EFER.LMA is clear\n"
msg_magic: .asciz "long mode BAD: RBX does not point to an hvm_start_info\n"
msg_top:   .asciz "long mode BAD: the memory map has no RAM, or the top of RAM did not read back\n"

        .bss
        .align  16
        .space  1024
stack_top:
