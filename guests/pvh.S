/*
 * pvh.S - an ELF64 file with a PVH entry point (XEN_ELFNOTE_PHYS32_ENTRY), as Firecracker and
 * QEMU microvm boot Linux.
 *
 * Run: node-kvm run guests/build/pvh.elf (no options needed).
 *
 * Contract with the host (Xen's docs/misc/pvh.pandoc):
 *   - The note "Xen", type 18, holds the 8-byte physical address of pvh_start (as Linux emits
 *     it). The host enters pvh_start in 32-bit protected mode, paging off, flat segments,
 *     interrupts off, EBX = the address of a struct hvm_start_info. It sets its own stack.
 *   - e_entry (_start) is 64-bit code that must NOT run: it prints
 *     "pvh BAD: entered at e_entry, not at the PVH entry point\n" and writes 0x7f.
 *   - Prints on COM1, each line ending in "\n":
 *       "mmap 0x<addr> 0x<size> <type>"   per hvm_memmap_table_entry (version >= 1): addr and
 *                                         size as 16 lowercase hex digits, type in decimal
 *       "cmdline: <text>"                 if cmdline_paddr is not 0
 *     then writes 0x13 to the debug-exit port 0xf4.
 *   - A bad magic prints "pvh BAD: EBX does not point to an hvm_start_info\n" and writes 0x7f.
 */
        .section .note.Xen, "a", @note
        .align  4
        .long   4                               /* namesz: "Xen\0" */
        .long   8                               /* descsz */
        .long   18                              /* XEN_ELFNOTE_PHYS32_ENTRY */
        .asciz  "Xen"
        .align  4
        .quad   pvh_start

        .text
        .code64
        .globl  _start
_start:
        lea     msg_wrong_entry(%rip), %rsi
        mov     $0x3f8, %dx
1:      lodsb
        test    %al, %al
        jz      2f
        out     %al, %dx
        jmp     1b
2:      mov     $0x7f, %al
        out     %al, $0xf4
3:      cli
        hlt
        jmp     3b

        .code32
pvh_start:
        mov     $stack_top, %esp
        mov     $msg_bad, %esi
        cmpl    $0x336ec578, (%ebx)             /* hvm_start_info.magic */
        jne     die
        mov     %ebx, %edi

        cmpl    $1, 4(%edi)                     /* version 1 has the memmap */
        jb      3f
        mov     40(%edi), %ebx                  /* memmap_paddr (below 4 GiB here) */
        mov     48(%edi), %ebp                  /* memmap_entries */
2:      test    %ebp, %ebp
        jz      3f
        call    put_mmap_entry
        add     $24, %ebx
        dec     %ebp
        jmp     2b

3:      mov     24(%edi), %esi                  /* cmdline_paddr */
        test    %esi, %esi
        jz      4f
        call    put_cmdline

4:      mov     $0x13, %al
        out     %al, $0xf4
        jmp     halt

        .include "serial32.inc"
        .include "bootinfo32.inc"
        .include "halt.inc"

msg_bad:         .asciz "pvh BAD: EBX does not point to an hvm_start_info\n"
msg_wrong_entry: .asciz "pvh BAD: entered at e_entry, not at the PVH entry point\n"

        .bss
        .align  16
        .space  1024
stack_top:
