/*
 * multiboot.S - an ELF32 Multiboot (v1) kernel that prints the machine it was given.
 *
 * Run: node-kvm run guests/build/multiboot.elf (no options needed).
 *
 * Contract with the host (Multiboot Specification 0.6.96, section 3.2 machine state):
 *   - Carries a Multiboot header (flags: memory information required) at the start of .text,
 *     within the file's first 8 KiB. Linked at 1 MiB; entered at _start in 32-bit protected
 *     mode, paging off, with EAX = 0x2BADB002 and EBX = the physical address of a
 *     multiboot_info. It sets its own stack.
 *   - Prints on COM1, each line ending in "\n":
 *       "mem <mem_lower> <mem_upper>"              if flags bit 0: KiB, in decimal
 *       "mmap 0x<base> 0x<length> <type>"          per memory map entry, if flags bit 6:
 *                                                  base and length as 16 lowercase hex digits,
 *                                                  type in decimal
 *       "cmdline: <text>"                          if flags bit 2
 *     then writes 0x12 to the debug-exit port 0xf4.
 *   - EAX not the magic: prints "multiboot BAD: EAX is not 0x2BADB002\n" and writes 0x7f.
 */
        .set    MB_MAGIC, 0x1badb002
        .set    MB_FLAGS, 0x00000002            /* bit 1: memory information */

        .section .multiboot, "a"
        .align  4
        .long   MB_MAGIC
        .long   MB_FLAGS
        .long   -(MB_MAGIC + MB_FLAGS)

        .code32
        .text
        .globl  _start
_start:
        mov     $stack_top, %esp
        mov     $msg_bad, %esi
        cmp     $0x2badb002, %eax
        jne     die
        mov     %ebx, %edi                      /* multiboot_info */

        testl   $1, (%edi)                      /* flags bit 0: mem_lower, mem_upper */
        jz      1f
        mov     $msg_mem, %esi
        call    puts
        mov     4(%edi), %eax
        call    put_dec
        mov     $' ', %al
        call    putc
        mov     8(%edi), %eax
        call    put_dec
        mov     $'\n', %al
        call    putc

1:      testl   $0x40, (%edi)                   /* flags bit 6: mmap_length, mmap_addr */
        jz      3f
        mov     48(%edi), %ebx                  /* entry: size, base_addr, length, type */
        mov     44(%edi), %ebp
        add     %ebx, %ebp                      /* end of the map */
2:      cmp     %ebp, %ebx
        jae     3f
        add     $4, %ebx                        /* past size: base_addr, length, type */
        call    put_mmap_entry
        add     -4(%ebx), %ebx                  /* size excludes the size field itself */
        jmp     2b

3:      testl   $0x4, (%edi)                    /* flags bit 2: cmdline */
        jz      4f
        mov     16(%edi), %esi
        call    put_cmdline

4:      mov     $0x12, %al
        out     %al, $0xf4
        jmp     halt

        .include "serial32.inc"
        .include "bootinfo32.inc"
        .include "halt.inc"

msg_mem:     .asciz "mem "
msg_bad:     .asciz "multiboot BAD: EAX is not 0x2BADB002\n"

        .bss
        .align  16
        .space  1024
stack_top:
