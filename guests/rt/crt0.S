/*
 * crt0.S - entry of the C guests (see rt.h): the CPL 0 part of the runtime, kept small because
 * kernel-mode guest code is emulated on hosts like kvm_pvm.
 *
 * Entered by the ELF64 loader in long mode with RBX = hvm_start_info, interrupts off. Loads a GDT
 * (0x08 kernel code, 0x10 kernel data, 0x18 user data, 0x20 user code, 0x28 64-bit TSS), an IDT
 * for vectors 0-31, and IRETQs to user_start at CPL 3 with RFLAGS.IOPL = 3, IF = 0 (or calls it at
 * CPL 0 when the guest sets rt_run_main_at_cpl0). The IDT has room for all 256 vectors: the gates
 * of vectors 32-255 stay not-present until rt_set_interrupt_handler() (rt.c) points one at its
 * stub in rt_interrupt_stubs, so a guest that takes no interrupts pays nothing for them at boot.
 */
        .include "cpl3.inc"
        .set    KERNEL_CS, 0x08
        .set    USER_DS, 0x18 | 3
        .set    USER_CS, 0x20 | 3
        .set    GP_VECTOR, 13
        .set    VECTORS, 32
        .set    IDT_VECTORS, 256

        .code64
        .text
        .globl  _start
_start:
        lea     kernel_stack_top(%rip), %rsp
        mov     %rbx, rt_start_info(%rip)

        /* Exceptions from CPL 3 run on the kernel stack. */
        LOAD_CPL3_SEGMENTS kernel_stack_top

        /* IDT: vector v -> exception_stubs + 16 * v (#GP -> gp_handler); 64-bit interrupt gates. */
        lea     idt(%rip), %rdi
        lea     exception_stubs(%rip), %rax
        xor     %ecx, %ecx
2:      mov     %rax, %rdx
        cmp     $GP_VECTOR, %ecx
        jne     3f
        lea     gp_handler(%rip), %rdx
3:      mov     %dx, (%rdi)
        movw    $KERNEL_CS, 2(%rdi)
        movw    $0x8e00, 4(%rdi)                /* present, DPL 0, interrupt gate */
        shr     $16, %rdx
        mov     %dx, 6(%rdi)
        shr     $16, %rdx
        mov     %edx, 8(%rdi)
        add     $16, %rdi
        add     $16, %rax
        inc     %ecx
        cmp     $VECTORS, %ecx
        jne     2b
        lidt    idtr(%rip)

        cmpb    $0, rt_run_main_at_cpl0(%rip)
        jne     user_start
        push    $USER_DS                        /* SS */
        lea     user_stack_top(%rip), %rax
        push    %rax                            /* RSP */
        push    $0x3002                         /* RFLAGS: IOPL 3, IF 0 */
        push    $USER_CS
        lea     user_start(%rip), %rax
        push    %rax
        iretq

user_start:
        call    rt_main
1:      pause                                   /* HLT is not allowed at CPL 3 */
        jmp     1b

/*
 * #GP: a port access from CPL 3 that the host refused. Perform it here and return past it.
 * Stack: error code, RIP, CS, RFLAGS, RSP, SS. Only RSI (saved) and RDX (saved where the
 * instruction does not name it) are used: `in` leaves its result in the interrupted AL, and
 * IRETQ restores the interrupted RFLAGS.
 */
gp_handler:
        push    %rsi
        mov     16(%rsp), %rsi                  /* faulting RIP */
        cmpb    $0xee, (%rsi)                   /* out %al, %dx */
        je      out_dx
        cmpb    $0xec, (%rsi)                   /* in %dx, %al */
        je      in_dx
        cmpb    $0xe6, (%rsi)                   /* out %al, $imm8 */
        je      out_imm
        cmpb    $0xe4, (%rsi)                   /* in $imm8, %al */
        je      in_imm
        pop     %rsi
        push    $GP_VECTOR
        jmp     exception_fatal
out_dx: out     %al, %dx
        jmp     1f
in_dx:  in      %dx, %al
1:      incq    16(%rsp)
        jmp     3f
out_imm:
        push    %rdx
        movzbl  1(%rsi), %edx
        out     %al, %dx
        jmp     2f
in_imm: push    %rdx
        movzbl  1(%rsi), %edx
        in      %dx, %al
2:      pop     %rdx
        addq    $2, 16(%rsp)
3:      pop     %rsi
        add     $8, %rsp                        /* error code */
        iretq

/* Vectors that push no error code get a 0, so every frame looks alike; then the vector. */
        .p2align 4
exception_stubs:
        .irp    vector, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        .p2align 4
        .if     \vector == 8 || (\vector >= 10 && \vector <= 14) || \vector == 17 || \vector == 21 || \vector == 29 || \vector == 30
        .else
        push    $0
        .endif
        push    $\vector
        jmp     exception_fatal
        .endr

/*
 * External interrupts: the stub of vector v (32..255) is at rt_interrupt_stubs + 16 * (v - 32).
 * It pushes v; interrupt_common saves the registers a C call may clobber and calls
 * rt_interrupt(v), which runs the handler and signals the end of interrupt (rt.c).
 */
        .p2align 4
        .globl  rt_interrupt_stubs
rt_interrupt_stubs:
        .set    vector, VECTORS
        .rept   IDT_VECTORS - VECTORS
        .p2align 4
        push    $vector
        jmp     interrupt_common
        .set    vector, vector + 1
        .endr

interrupt_common:
        push    %rax
        push    %rcx
        push    %rdx
        push    %rsi
        push    %rdi
        push    %r8
        push    %r9
        push    %r10
        push    %r11
        push    %rbp
        mov     %rsp, %rbp
        mov     80(%rsp), %rdi                  /* the vector */
        and     $~15, %rsp                      /* the C ABI's alignment */
        call    rt_interrupt
        mov     %rbp, %rsp
        pop     %rbp
        pop     %r11
        pop     %r10
        pop     %r9
        pop     %r8
        pop     %rdi
        pop     %rsi
        pop     %rdx
        pop     %rcx
        pop     %rax
        add     $8, %rsp                        /* the vector */
        iretq

/* Stack: vector, error code, RIP, ... -> rt_exception(vector, error code, rip); never returns. */
exception_fatal:
        pop     %rdi
        pop     %rsi
        mov     (%rsp), %rdx
        and     $~15, %rsp
        call    rt_exception
1:      cli
        hlt
        jmp     1b

        .data
        .weak   rt_run_main_at_cpl0
rt_run_main_at_cpl0:
        .byte   0
        .globl  rt_start_info
        .align  8
rt_start_info:
        .quad   0
        CPL3_TABLES
        .align  16
        .globl  rt_idt
rt_idt:
idt:    .space  IDT_VECTORS * 16
idtr:   .word   IDT_VECTORS * 16 - 1
        .quad   idt

        .bss
        .align  16
        .space  4096
kernel_stack_top:
        .space  65536
user_stack_top:
        .section .note.GNU-stack, "", @progbits
