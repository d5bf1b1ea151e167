/*
 * dirtier.S - keeps rewriting a range of guest RAM with a pattern it can check, for migration
 * and dirty-logging tests. Built twice: `dirtier` runs its loop at CPL 0; `dirtier-user`
 * (assembled with --defsym USER_MODE=1) runs it at CPL 3, where guest code runs natively on
 * hosts like kvm_pvm.
 *
 * Run: node-kvm run guests/build/dirtier.elf, or dirtier-user.elf (no options needed; runs until
 *     stopped: for migrate and snapshot).
 *
 * Contract with the host:
 *   - ELF64 linked at 1 MiB, entered in long mode (the loader's identity map, which is
 *     user-accessible) with RBX = hvm_start_info.
 *   - Parameters, read once at start from guest-physical GUEST_PARAMS (0x5000, a page the
 *     loader never writes; zero unless the host writes them before the vCPU first runs):
 *       0x5000 u32  passes: stop after this many passes; 0 = run forever
 *       0x5004 u32  range bytes, from 2 MiB (rounded down to 8); 0 = the default:
 *                   1 MiB for dirtier, 16 MiB for dirtier-user
 *   - Pass p (p = 1, 2, ...) walks the quadwords at A = 2 MiB, 2 MiB + 8, ... up to the end of
 *     the range. From pass 2 on it first checks that A holds ((p - 1) << 40) | A, then it writes
 *     (p << 40) | A. So a page that loses a write (a migration that missed it) is caught on the
 *     next pass.
 *   - Output on COM1: "pass <p> ok\n" after each pass (p in decimal). On a mismatch
 *     "pass <p> BAD at 0x<A, 16 hex digits>\n" and debug-exit 0x7f. After pass <passes>
 *     (when not 0) debug-exit 0x00. A range beyond the end of RAM (by the start info's memory
 *     map) prints "dirtier BAD: range beyond RAM\n" and exits 0x7e before any pass.
 *   - dirtier-user: the kernel part loads its own GDT (0x08 kernel code, 0x10 kernel data, 0x18
 *     user data, 0x20 user code, 0x28 64-bit TSS) and an IDT with a #GP handler, then IRETQs to
 *     CPL 3 with RFLAGS.IOPL = 3 and IF = 0. The passes, the output and the exit run at CPL 3
 *     with plain `out`. A host that runs ring-3 guest code natively without honouring IOPL
 *     (kvm_pvm) raises #GP on such an `out` instead: the handler then performs that `out`
 *     (only `out %al,%dx` and `out %al,$0xf4`) at CPL 0 and returns past it; any other #GP
 *     prints "dirtier BAD: unexpected #GP\n" and exits 0x7d. After its exit ring 3 spins
 *     (HLT is not allowed at CPL 3). dirtier halts after its exit.
 */
        .set    GUEST_PARAMS, 0x5000
        .set    RANGE_START, 0x200000
        .ifdef  USER_MODE
        .set    DEFAULT_RANGE, 0x1000000
        .else
        .set    DEFAULT_RANGE, 0x100000
        .endif
        .include "cpl3.inc"

        .code64
        .text
        .globl  _start
_start:
        lea     stack_top(%rip), %rsp
        mov     GUEST_PARAMS, %eax
        mov     %eax, pass_limit(%rip)
        mov     GUEST_PARAMS+4, %eax
        and     $~7, %eax
        jnz     1f
        mov     $DEFAULT_RANGE, %eax
1:      mov     $RANGE_START, %r10
        add     %rax, %r10
        mov     %r10, range_end(%rip)

        /* Where the start info is there, the range must end within RAM. */
        cmpl    $0x336ec578, (%rbx)
        jne     3f
        mov     40(%rbx), %r8                   /* memmap_paddr */
        mov     48(%rbx), %ecx                  /* memmap_entries */
2:      test    %ecx, %ecx
        jz      range_bad
        cmpl    $1, 16(%r8)                     /* a RAM entry holding the whole range? */
        jne     4f
        cmpq    $RANGE_START, (%r8)
        ja      4f
        mov     (%r8), %rax
        add     8(%r8), %rax
        cmp     %r10, %rax
        jae     3f
4:      add     $24, %r8
        dec     %ecx
        jmp     2b

3:
        .ifdef  USER_MODE
        jmp     enter_user
        .endif

passes:
        mov     $1, %r12d                       /* p */
pass:   mov     %r12, %r8
        shl     $40, %r8                        /* p << 40 */
        lea     -1(%r12), %r9
        shl     $40, %r9                        /* (p - 1) << 40 */
        mov     $RANGE_START, %rsi
        mov     range_end(%rip), %rdi
        cmp     $1, %r12
        jne     check
write:  mov     %rsi, %rax
        or      %r8, %rax
        mov     %rax, (%rsi)
        add     $8, %rsi
        cmp     %rdi, %rsi
        jb      write
        jmp     pass_done
check:  mov     %rsi, %rax
        or      %r9, %rax
        cmp     %rax, (%rsi)
        jne     bad
        xor     %r9, %rax
        or      %r8, %rax
        mov     %rax, (%rsi)
        add     $8, %rsi
        cmp     %rdi, %rsi
        jb      check
pass_done:
        call    put_pass
        lea     msg_ok(%rip), %rsi
        call    puts
        mov     pass_limit(%rip), %eax
        test    %eax, %eax
        jz      1f
        cmp     %rax, %r12
        jae     done
1:      inc     %r12
        jmp     pass

done:   xor     %al, %al
        out     %al, $0xf4
        jmp     stop

bad:    push    %rsi
        call    put_pass
        lea     msg_bad(%rip), %rsi
        call    puts
        pop     %rax
        call    put_hex64
        mov     $'\n', %al
        call    putc
        mov     $0x7f, %al
        out     %al, $0xf4
        jmp     stop

range_bad:
        lea     msg_range(%rip), %rsi
        call    puts
        mov     $0x7e, %al
        out     %al, $0xf4

stop:
        .ifdef  USER_MODE
1:      pause
        jmp     1b
        .else
1:      cli
        hlt
        jmp     1b
        .endif

        .ifdef  USER_MODE
/* Own GDT with user segments and a TSS, an IDT for #GP, then IRETQ to `passes` at CPL 3. */
enter_user:
        LOAD_CPL3_SEGMENTS stack_top            /* #GP from CPL 3 runs on stack_top */
        lea     gp_handler(%rip), %rax          /* IDT entry 13: 64-bit interrupt gate, CS 0x08 */
        lea     idt+13*16(%rip), %rdx
        mov     %ax, (%rdx)
        movw    $0x08, 2(%rdx)
        movw    $0x8e00, 4(%rdx)
        shr     $16, %rax
        mov     %ax, 6(%rdx)
        shr     $16, %rax
        mov     %eax, 8(%rdx)
        lidt    idtr(%rip)
        push    $0x1b                           /* SS: user data | RPL 3 */
        lea     user_stack_top(%rip), %rax
        push    %rax
        push    $0x3002                         /* RFLAGS: IOPL 3, IF 0 */
        push    $0x23                           /* CS: user code | RPL 3 */
        lea     passes(%rip), %rax
        push    %rax
        iretq

/* #GP from ring 3: perform the `out` it stands for, then continue after it. */
gp_handler:
        push    %rsi
        mov     16(%rsp), %rsi                  /* faulting RIP (after the saved RSI and error code) */
        cmpb    $0xee, (%rsi)                   /* out %al, %dx */
        jne     1f
        out     %al, %dx
        incq    16(%rsp)
        jmp     2f
1:      cmpw    $0xf4e6, (%rsi)                 /* out %al, $0xf4 */
        jne     gp_bad
        out     %al, $0xf4
        addq    $2, 16(%rsp)
2:      pop     %rsi
        add     $8, %rsp                        /* error code */
        iretq
gp_bad: lea     msg_gp(%rip), %rsi
        call    puts
        mov     $0x7d, %al
        out     %al, $0xf4
1:      cli
        hlt
        jmp     1b
        .endif

/* put_pass: "pass <p>", p = %r12 in decimal. Clobbers %rax, %rcx, %rdx, %rsi. */
put_pass:
        lea     msg_pass(%rip), %rsi
        call    puts
        mov     %r12, %rax
        jmp     put_dec

        .include "serial64.inc"

msg_pass:   .asciz "pass "
msg_ok:     .asciz " ok\n"
msg_bad:    .asciz " BAD at 0x"
msg_range:  .asciz "dirtier BAD: range beyond RAM\n"
msg_gp:     .asciz "dirtier BAD: unexpected #GP\n"

        .data
        .align  8
pass_limit: .long 0
        .long   0
range_end:  .quad 0
        .ifdef  USER_MODE
        CPL3_TABLES
        .align  16
idt:    .space  14*16                           /* up to #GP; other vectors are beyond the limit */
idtr:   .word   14*16 - 1
        .quad   idt
        .endif

        .bss
        .align  16
        .space  1024
stack_top:
        .ifdef  USER_MODE
        .space  1024
user_stack_top:
        .endif
