/*
 * bzimage.S - a tiny kernel in the Linux bzImage format (Documentation/x86/boot.rst), booted as
 * QEMU's -kernel/-initrd/-append boot Linux.
 *
 * Run: node-kvm run --kernel guests/build/bzimage.bin [--initrd FILE] [--append TEXT] (no options
 *     needed).
 *
 * The file: a boot sector carrying the setup header at 0x1f1 (protocol 2.15, LOADED_HIGH,
 * XLF_KERNEL_64, relocatable with Linux's x86-64 alignment and preferred address), one setup
 * sector, then the protected-mode kernel at (setup_sects + 1) * 512, whose offset 0 is the 32-bit
 * entry and offset 0x200 the 64-bit entry. It is position-independent and uses [load address,
 * load address + init_size) only, its stack at the top.
 *
 * Contract with the host (boot.rst, 64-bit boot protocol):
 *   - Entered at offset 0x200 in long mode on an identity map covering the zero page, the command
 *     line and the initrd, interrupts off, CS = __BOOT_CS (0x10), DS = ES = SS = __BOOT_DS
 *     (0x18), RSI = the zero page (struct boot_params).
 *   - Prints on COM1, each line ending in "\n":
 *       "bzimage entry 64"
 *       "e820 0x<addr> 0x<size> <type>"      per e820_table entry (e820_entries at 0x1e8, table
 *                                            at 0x2d0): 16 lowercase hex digits, type in decimal
 *       "cmdline \"<text>\""                 the string at cmd_line_ptr (+ ext_cmd_line_ptr << 32)
 *       "initrd 0x<addr> <size>"             ramdisk_image, ramdisk_size (+ their ext_ fields):
 *                                            address in 16 hex digits, size in decimal; or
 *       "initrd none"                        where ramdisk_image is 0 (then nothing below)
 *       "initrd head \"<bytes>\""            its first 6 bytes (fewer if it is shorter)
 *       "initrd last <byte>"                 its last byte, in decimal
 *       "initrd sum <n>"                     the sum of its bytes mod 2^32, in decimal
 *       "bzimage OK"
 *     then writes 0x10 to the debug-exit port 0xf4.
 *   - A failed check (EFER.LMA, IF, the selectors, "HdrS" at zero page 0x202, type_of_loader set,
 *     cmd_line_ptr not 0) prints "bzimage BAD: <what>\n" and writes 0x7f.
 *
 * At the 32-bit entry (offset 0, boot.rst's 32-bit boot protocol: protected mode, paging off,
 * the same selectors, ESI = the zero page, EBX = EBP = EDI = 0) it checks that state and the
 * zero page, prints "bzimage entry 32\n", the "cmdline" line as above and "bzimage OK\n", and
 * writes 0x10; a failed check prints "bzimage BAD: <what>\n" and writes 0x7f.
 */
        .set    SETUP_SECTS, 1
        .set    INIT_SIZE, 0x10000
        .set    HDRS, 0x53726448
        /* boot_params offsets (zero-page.rst, boot.rst) */
        .set    BP_EXT_RAMDISK_IMAGE, 0x0c0
        .set    BP_EXT_RAMDISK_SIZE, 0x0c4
        .set    BP_EXT_CMD_LINE_PTR, 0x0c8
        .set    BP_E820_ENTRIES, 0x1e8
        .set    BP_HEADER, 0x202
        .set    BP_TYPE_OF_LOADER, 0x210
        .set    BP_CODE32_START, 0x214
        .set    BP_RAMDISK_IMAGE, 0x218
        .set    BP_RAMDISK_SIZE, 0x21c
        .set    BP_CMD_LINE_PTR, 0x228
        .set    BP_E820_TABLE, 0x2d0

        .text
        .code64
        .globl  _start
_start:
/* ---- sector 0: the boot sector, with the setup header from 0x1f1 ---- */
        .ascii  "node-kvm bzImage test kernel: boot it with a Linux boot protocol loader\0"

        .org    0x1f1
        .byte   SETUP_SECTS                     /* setup_sects */
        .word   0                               /* root_flags */
        .long   (pm_end - pm_start + 15) / 16   /* syssize, in 16-byte paragraphs */
        .word   0                               /* ram_size */
        .word   0xffff                          /* vid_mode: normal */
        .word   0                               /* root_dev */
        .word   0xaa55                          /* boot_flag */
        .byte   0xeb, header_end - header       /* jump: its offset is the header's length */
header: .ascii  "HdrS"
        .word   0x020f                          /* version 2.15 */
        .long   0                               /* realmode_swtch */
        .word   0x1000                          /* start_sys_seg */
        .word   kernel_version - _start - 0x200 /* kernel_version */
        .byte   0                               /* type_of_loader */
        .byte   0x01                            /* loadflags: LOADED_HIGH */
        .word   0x8000                          /* setup_move_size */
        .long   0x100000                        /* code32_start */
        .long   0                               /* ramdisk_image */
        .long   0                               /* ramdisk_size */
        .long   0                               /* bootsect_kludge */
        .word   0                               /* heap_end_ptr */
        .byte   0                               /* ext_loader_ver */
        .byte   0                               /* ext_loader_type */
        .long   0                               /* cmd_line_ptr */
        .long   0x7fffffff                      /* initrd_addr_max */
        .long   0x200000                        /* kernel_alignment */
        .byte   1                               /* relocatable_kernel */
        .byte   21                              /* min_alignment: 2 MiB */
        .word   0x0001                          /* xloadflags: XLF_KERNEL_64 */
        .long   255                             /* cmdline_size */
        .long   0                               /* hardware_subarch */
        .quad   0                               /* hardware_subarch_data */
        .long   0                               /* payload_offset */
        .long   0                               /* payload_length */
        .quad   0                               /* setup_data */
        .quad   0x1000000                       /* pref_address */
        .long   INIT_SIZE                       /* init_size */
        .long   0                               /* handover_offset */
        .long   0                               /* kernel_info_offset */
header_end:

/* ---- sector 1: the setup code a real-mode loader would run (none here) ---- */
        .org    0x300
kernel_version:
        .asciz  "0.1 (node-kvm bzimage guest)"

/* ---- the protected-mode kernel, loaded at code32_start ---- */
        .org    (SETUP_SECTS + 1) * 512
pm_start:
        .code32
startup_32:
        jmp     entry32

        .org    pm_start + 0x200
        .code64
startup_64:
        lea     pm_start + INIT_SIZE(%rip), %rsp
        mov     %rsi, %r15                      /* the zero page */
        lea     msg_entry64(%rip), %rsi
        call    puts

        lea     msg_bad_if(%rip), %rsi
        pushfq
        pop     %rax
        test    $0x200, %eax                    /* RFLAGS.IF */
        jnz     die
        lea     msg_bad_lma(%rip), %rsi
        mov     $0xc0000080, %ecx               /* IA32_EFER */
        rdmsr
        test    $0x400, %eax                    /* LMA */
        jz      die
        lea     msg_bad_selectors(%rip), %rsi
        mov     %cs, %ax
        cmp     $0x10, %ax
        jne     die
        mov     %ds, %ax
        cmp     $0x18, %ax
        jne     die
        mov     %es, %ax
        cmp     $0x18, %ax
        jne     die
        mov     %ss, %ax
        cmp     $0x18, %ax
        jne     die
        lea     msg_bad_hdrs(%rip), %rsi
        cmpl    $HDRS, BP_HEADER(%r15)
        jne     die
        lea     msg_bad_loader(%rip), %rsi
        cmpb    $0, BP_TYPE_OF_LOADER(%r15)
        je      die

        /* The E820 map. */
        movzbl  BP_E820_ENTRIES(%r15), %r12d
        lea     BP_E820_TABLE(%r15), %rbx
1:      test    %r12d, %r12d
        jz      2f
        lea     msg_e820(%rip), %rsi
        call    puts
        mov     (%rbx), %rax
        call    put_hex64
        lea     msg_0x(%rip), %rsi
        call    puts
        mov     8(%rbx), %rax
        call    put_hex64
        mov     $' ', %al
        call    putc
        mov     16(%rbx), %eax
        call    put_dec
        call    newline
        add     $20, %rbx
        dec     %r12d
        jmp     1b

        /* The command line. */
2:      mov     BP_CMD_LINE_PTR(%r15), %eax
        mov     BP_EXT_CMD_LINE_PTR(%r15), %ecx
        shl     $32, %rcx
        or      %rcx, %rax
        lea     msg_bad_cmdline(%rip), %rsi
        test    %rax, %rax
        jz      die
        mov     %rax, %rbx
        lea     msg_cmdline(%rip), %rsi
        call    puts
        mov     %rbx, %rsi
        call    puts
        call    quote_newline

        /* The initrd. */
        mov     BP_RAMDISK_IMAGE(%r15), %eax
        mov     BP_EXT_RAMDISK_IMAGE(%r15), %ecx
        shl     $32, %rcx
        or      %rax, %rcx
        mov     %rcx, %rbx                      /* address */
        mov     BP_RAMDISK_SIZE(%r15), %eax
        mov     BP_EXT_RAMDISK_SIZE(%r15), %ecx
        shl     $32, %rcx
        or      %rax, %rcx
        mov     %rcx, %r13                      /* size */
        test    %rbx, %rbx
        jnz     3f
        lea     msg_initrd_none(%rip), %rsi
        call    puts
        jmp     ok64

3:      lea     msg_initrd(%rip), %rsi
        call    puts
        mov     %rbx, %rax
        call    put_hex64
        mov     $' ', %al
        call    putc
        mov     %r13, %rax
        call    put_dec
        call    newline

        lea     msg_initrd_head(%rip), %rsi
        call    puts
        mov     %r13, %r12
        cmp     $6, %r12
        jbe     4f
        mov     $6, %r12
4:      mov     %rbx, %r14
5:      test    %r12, %r12
        jz      6f
        mov     (%r14), %al
        call    putc
        inc     %r14
        dec     %r12
        jmp     5b
6:      call    quote_newline

        lea     msg_initrd_last(%rip), %rsi
        call    puts
        test    %r13, %r13
        jz      7f
        movzbl  -1(%rbx,%r13), %eax
        call    put_dec
7:      call    newline

        /* Sum of its bytes, a quadword at a time where it can: eight byte lanes at once. */
        lea     msg_initrd_sum(%rip), %rsi
        call    puts
        xor     %r8d, %r8d                      /* the sum */
        mov     %rbx, %r14
        mov     %r13, %r12
        mov     $0x00ff00ff00ff00ff, %r10
8:      cmp     $8, %r12
        jb      9f
        mov     (%r14), %rax
        mov     %rax, %rdx
        and     %r10, %rax                      /* bytes 0, 2, 4, 6 as 16-bit lanes */
        shr     $8, %rdx
        and     %r10, %rdx                      /* bytes 1, 3, 5, 7 */
        add     %rdx, %rax                      /* four 16-bit lanes, each <= 510 */
        mov     %rax, %rdx
        shr     $32, %rdx
        add     %edx, %eax                      /* two lanes, each <= 1020 */
        mov     %eax, %edx
        shr     $16, %edx
        add     %edx, %eax
        movzwl  %ax, %eax                       /* <= 2040 */
        add     %eax, %r8d
        add     $8, %r14
        sub     $8, %r12
        jmp     8b
9:      test    %r12, %r12
        jz      10f
        movzbl  (%r14), %eax
        add     %eax, %r8d
        inc     %r14
        dec     %r12
        jmp     9b
10:     mov     %r8d, %eax
        call    put_dec
        call    newline

ok64:   lea     msg_ok(%rip), %rsi
        call    puts
        mov     $0x10, %al
        out     %al, $0xf4
        jmp     halt

newline:
        mov     $'\n', %al
        jmp     putc
quote_newline:
        mov     $'"', %al
        call    putc
        jmp     newline

        .include "serial64.inc"
        .include "halt.inc"

/*
 * The 32-bit entry. Position-independent too: code32_start in the zero page says where the
 * kernel is, and every address is made from it (%ebp).
 */
        .code32
entry32:
        mov     %ebx, %ecx
        or      %edi, %ecx
        or      %ebp, %ecx                      /* EBX, EBP, EDI must be 0 */
        mov     BP_CODE32_START(%esi), %ebp
        lea     INIT_SIZE(%ebp), %esp
        mov     %esi, %edi                      /* the zero page */
        lea     msg_entry32 - pm_start(%ebp), %esi
        call    puts32

        lea     msg_bad_regs32 - pm_start(%ebp), %esi
        test    %ecx, %ecx
        jnz     die32
        lea     msg_bad_if - pm_start(%ebp), %esi
        pushf
        pop     %eax
        test    $0x200, %eax
        jnz     die32
        lea     msg_bad_cr0 - pm_start(%ebp), %esi
        mov     %cr0, %eax
        and     $0x80000001, %eax               /* PG, PE */
        cmp     $1, %eax
        jne     die32
        lea     msg_bad_selectors - pm_start(%ebp), %esi
        mov     %cs, %ax
        cmp     $0x10, %ax
        jne     die32
        mov     %ds, %ax
        cmp     $0x18, %ax
        jne     die32
        mov     %es, %ax
        cmp     $0x18, %ax
        jne     die32
        mov     %ss, %ax
        cmp     $0x18, %ax
        jne     die32
        lea     msg_bad_hdrs - pm_start(%ebp), %esi
        cmpl    $HDRS, BP_HEADER(%edi)
        jne     die32
        lea     msg_bad_loader - pm_start(%ebp), %esi
        cmpb    $0, BP_TYPE_OF_LOADER(%edi)
        je      die32
        lea     msg_bad_cmdline - pm_start(%ebp), %esi
        mov     BP_CMD_LINE_PTR(%edi), %ebx
        test    %ebx, %ebx
        jz      die32

        lea     msg_cmdline - pm_start(%ebp), %esi
        call    puts32
        mov     %ebx, %esi
        call    puts32
        lea     msg_quote_newline - pm_start(%ebp), %esi
        call    puts32
        lea     msg_ok - pm_start(%ebp), %esi
        call    puts32
        mov     $0x10, %al
        out     %al, $0xf4
        jmp     halt

puts32: mov     $0x3f8, %dx
1:      lodsb
        test    %al, %al
        jz      2f
        out     %al, %dx
        jmp     1b
2:      ret

die32:  call    puts32
        mov     $0x7f, %al
        out     %al, $0xf4
        jmp     halt

msg_entry64:       .asciz "bzimage entry 64\n"
msg_entry32:       .asciz "bzimage entry 32\n"
msg_e820:          .asciz "e820 0x"
msg_0x:            .asciz " 0x"
msg_cmdline:       .asciz "cmdline \""
msg_quote_newline: .asciz "\"\n"
msg_initrd:        .asciz "initrd 0x"
msg_initrd_none:   .asciz "initrd none\n"
msg_initrd_head:   .asciz "initrd head \""
msg_initrd_last:   .asciz "initrd last "
msg_initrd_sum:    .asciz "initrd sum "
msg_ok:            .asciz "bzimage OK\n"
msg_bad_if:        .asciz "bzimage BAD: interrupts are enabled\n"
msg_bad_lma:       .asciz "bzimage BAD: EFER.LMA is clear\n"
msg_bad_cr0:       .asciz "bzimage BAD: CR0 is not protected mode without paging\n"
msg_bad_regs32:    .asciz "bzimage BAD: EBX, EBP or EDI is not 0\n"
msg_bad_selectors: .asciz "bzimage BAD: CS is not 0x10 or DS, ES, SS not 0x18\n"
msg_bad_hdrs:      .asciz "bzimage BAD: RSI does not point to a zero page with HdrS at 0x202\n"
msg_bad_loader:    .asciz "bzimage BAD: type_of_loader is 0\n"
msg_bad_cmdline:   .asciz "bzimage BAD: cmd_line_ptr is 0\n"
pm_end:
