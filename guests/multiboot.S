/*
 * multiboot.S - an ELF32 Multiboot (v1) kernel that prints the machine it was given.
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
        cmp     $0x2badb002, %eax
        jne     bad_magic
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
        mov     $msg_mmap, %esi
        call    puts
        mov     8(%ebx), %eax                   /* base_addr high */
        call    put_hex32
        mov     4(%ebx), %eax                   /* base_addr low */
        call    put_hex32
        mov     $msg_0x, %esi
        call    puts
        mov     16(%ebx), %eax                  /* length high */
        call    put_hex32
        mov     12(%ebx), %eax
        call    put_hex32
        mov     $' ', %al
        call    putc
        mov     20(%ebx), %eax                  /* type */
        call    put_dec
        mov     $'\n', %al
        call    putc
        mov     (%ebx), %eax                    /* size excludes the size field itself */
        lea     4(%ebx,%eax), %ebx
        jmp     2b

3:      testl   $0x4, (%edi)                    /* flags bit 2: cmdline */
        jz      4f
        mov     $msg_cmdline, %esi
        call    puts
        mov     16(%edi), %esi
        call    puts
        mov     $'\n', %al
        call    putc

4:      mov     $0x12, %al
        out     %al, $0xf4
        jmp     halt

bad_magic:
        mov     $msg_bad, %esi
        call    puts
        mov     $0x7f, %al
        out     %al, $0xf4
halt:   cli
        hlt
        jmp     halt

/* putc: %al on COM1. Clobbers %edx. */
putc:   mov     $0x3f8, %dx
        out     %al, %dx
        ret

/* puts: the NUL-terminated string at %esi. Clobbers %eax, %edx, %esi. */
puts:   lodsb
        test    %al, %al
        jz      1f
        call    putc
        jmp     puts
1:      ret

/* put_hex32: %eax as 8 lowercase hex digits. Clobbers %eax, %ecx, %edx. */
put_hex32:
        push    %ebx
        mov     %eax, %ebx
        mov     $8, %ecx
1:      rol     $4, %ebx
        mov     %ebx, %eax
        and     $0xf, %eax
        mov     hex_digits(%eax), %al
        call    putc
        dec     %ecx
        jnz     1b
        pop     %ebx
        ret

/* put_dec: %eax in decimal. Clobbers %eax, %ecx, %edx. */
put_dec:
        push    %ebx
        mov     $10, %ebx
        xor     %ecx, %ecx
1:      xor     %edx, %edx
        div     %ebx
        push    %edx
        inc     %ecx
        test    %eax, %eax
        jnz     1b
2:      pop     %eax
        add     $'0', %al
        call    putc
        dec     %ecx
        jnz     2b
        pop     %ebx
        ret

hex_digits:  .ascii "0123456789abcdef"
msg_mem:     .asciz "mem "
msg_mmap:    .asciz "mmap 0x"
msg_0x:      .asciz " 0x"
msg_cmdline: .asciz "cmdline: "
msg_bad:     .asciz "multiboot BAD: EAX is not 0x2BADB002\n"

        .bss
        .align  16
        .space  1024
stack_top:
