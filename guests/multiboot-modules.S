/*
 * multiboot-modules.S - an ELF32 Multiboot (v1) kernel that reads the boot modules it was given.
 *
 * Run: node-kvm run guests/build/multiboot-modules.elf --initrd 'FILE ARGS,FILE2' (needs modules:
 *     --initrd).
 *
 * Contract with the host (Multiboot Specification 0.6.96, sections 3.1.2 and 3.3):
 *   - Carries a Multiboot header (flags: modules page-aligned, memory information) at the start
 *     of .text. Linked at 1 MiB; entered in 32-bit protected mode, paging off, with
 *     EAX = 0x2BADB002 and EBX = a multiboot_info whose flags bit 3 (mods_count, mods_addr) is set.
 *   - Prints on COM1, unless the command line (flags bit 2) is exactly "quiet":
 *       "modules <mods_count>\n"
 *       then per module i (from 0): "module <i> at 0x<mod_start> <size> bytes fnv 0x<hash>: <string>\n"
 *       mod_start as 8 lowercase hex digits, size = mod_end - mod_start in decimal, hash the
 *       32-bit FNV-1a of the module's bytes, string the module's NUL-terminated string.
 *   - Exits with a 32-bit write to the debug-exit port 0xf4 of a digest of everything it read:
 *       d = mods_count; per module: d = (d ^ fnv(string)) * 16777619; d = (d ^ fnv(bytes)) * 16777619
 *     (fnv = 32-bit FNV-1a; the string without its NUL; products mod 2^32).
 *   - EAX not the magic, flags bit 3 clear, or a module not on a page boundary: prints
 *     "multiboot-modules BAD: <why>\n" and writes 0x7f.
 */
        .set    MB_MAGIC, 0x1badb002
        .set    MB_FLAGS, 0x00000003            /* bit 0: page-aligned modules; bit 1: memory information */
        .set    FNV_BASIS, 0x811c9dc5
        .set    FNV_PRIME, 16777619

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
        mov     $msg_bad_magic, %esi
        cmp     $0x2badb002, %eax
        jne     die
        mov     %ebx, %edi                      /* multiboot_info */
        mov     $msg_no_modules, %esi
        testl   $0x8, (%edi)                    /* flags bit 3: mods_count, mods_addr */
        jz      die

        testl   $0x4, (%edi)                    /* flags bit 2: cmdline; "quiet" prints nothing */
        jz      2f
        mov     16(%edi), %esi
        mov     $str_quiet, %edx
1:      mov     (%esi), %al
        cmp     (%edx), %al
        jne     2f
        inc     %esi
        inc     %edx
        test    %al, %al
        jnz     1b
        movb    $1, quiet

2:      mov     20(%edi), %eax                  /* mods_count */
        mov     %eax, digest
        cmpb    $0, quiet
        jne     3f
        mov     $msg_modules, %esi
        call    puts
        mov     20(%edi), %eax
        call    put_dec
        mov     $'\n', %al
        call    putc

3:      mov     24(%edi), %ebx                  /* mods_addr: mod_start, mod_end, string, reserved */
4:      mov     index, %eax
        cmp     20(%edi), %eax
        jae     done
        mov     $msg_unaligned, %esi
        testl   $0xfff, (%ebx)
        jnz     die

        mov     8(%ebx), %esi                   /* the string, without its NUL */
        call    strlen
        mov     8(%ebx), %esi
        call    fnv
        call    mix
        mov     (%ebx), %esi                    /* the module's bytes */
        mov     4(%ebx), %ecx
        sub     %esi, %ecx
        call    fnv
        mov     %eax, module_hash
        call    mix

        cmpb    $0, quiet
        jne     5f
        call    put_module
5:      add     $16, %ebx
        incl    index
        jmp     4b

done:   mov     digest, %eax
        out     %eax, $0xf4
        jmp     halt

/* "module <i> at 0x<start> <size> bytes fnv 0x<hash>: <string>\n" for the entry at %ebx. */
put_module:
        mov     $msg_module, %esi
        call    puts
        mov     index, %eax
        call    put_dec
        mov     $msg_at, %esi
        call    puts
        mov     (%ebx), %eax
        call    put_hex32
        mov     $' ', %al
        call    putc
        mov     4(%ebx), %eax
        sub     (%ebx), %eax
        call    put_dec
        mov     $msg_bytes, %esi
        call    puts
        mov     module_hash, %eax
        call    put_hex32
        mov     $msg_colon, %esi
        call    puts
        mov     8(%ebx), %esi
        call    puts
        mov     $'\n', %al
        jmp     putc

/* %ecx = the length of the NUL-terminated string at %esi. Clobbers %esi. */
strlen: xor     %ecx, %ecx
1:      cmpb    $0, (%esi,%ecx)
        je      2f
        inc     %ecx
        jmp     1b
2:      ret

/* %eax = FNV-1a of the %ecx bytes at %esi. Clobbers %ecx, %edx, %esi. */
fnv:    mov     $FNV_BASIS, %eax
        test    %ecx, %ecx
        jz      2f
1:      movzbl  (%esi), %edx
        xor     %edx, %eax
        imul    $FNV_PRIME, %eax, %eax
        inc     %esi
        dec     %ecx
        jnz     1b
2:      ret

/* digest = (digest ^ %eax) * FNV_PRIME. Clobbers %eax. */
mix:    xor     digest, %eax
        imul    $FNV_PRIME, %eax, %eax
        mov     %eax, digest
        ret

        .include "serial32.inc"
        .include "halt.inc"

str_quiet:      .asciz "quiet"
msg_modules:    .asciz "modules "
msg_module:     .asciz "module "
msg_at:         .asciz " at 0x"
msg_bytes:      .asciz " bytes fnv 0x"
msg_colon:      .asciz ": "
msg_bad_magic:  .asciz "multiboot-modules BAD: EAX is not 0x2BADB002\n"
msg_no_modules: .asciz "multiboot-modules BAD: flags bit 3 (mods) is clear\n"
msg_unaligned:  .asciz "multiboot-modules BAD: a module is not on a page boundary\n"

        .bss
        .align  16
digest:         .long   0
index:          .long   0
module_hash:    .long   0
quiet:          .byte   0
        .align  16
        .space  1024
stack_top:
