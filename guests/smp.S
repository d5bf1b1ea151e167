/*
 * smp.S - an ELF32 kernel whose BSP wakes the APs with INIT-SIPI-SIPI; every CPU prints its
 * local APIC id.
 *
 * Run: node-kvm run guests/build/smp.elf --vcpus 4 (needs the in-kernel irqchip: not with
 *     --no-irqchip).
 *
 * Contract with the host:
 *   - Entered on vCPU 0 at _start in 32-bit protected mode (the loader's ELF32 entry state),
 *     with the in-kernel irqchip (local APICs at 0xfee00000, xAPIC mode). The other vCPUs exist
 *     before vCPU 0 runs and wait for INIT/SIPI.
 *   - The CPU count N is CPUID leaf 0BH, subleaf 1, EBX[15:0] (logical processors in the
 *     package, as lib/boot's guestCpuid sets it), or leaf 1 EBX[23:16] where leaf 0BH is absent.
 *   - The BSP software-enables its local APIC, copies the real-mode AP trampoline to 0x8000
 *     (SIPI vector 0x08) with its own GDTR and CS selector, checks in, then sends INIT, STARTUP,
 *     STARTUP to all-excluding-self through the ICR (0xfee00310, 0xfee00300). An AP's trampoline
 *     loads that GDT, enters protected mode and jumps to ap_entry, which takes a stack and
 *     checks in.
 *   - Checking in: under a spinlock (xchg), print "cpu <apic id>\n" (decimal, from the local APIC
 *     ID register) and count the CPU. The BSP checks in first; the APs' order is not fixed.
 *   - The BSP waits until N CPUs checked in, prints "all <N> cpus up\n" and writes 0x20 to the
 *     debug-exit port 0xf4. If they do not within 2^34 TSC ticks (seconds), it prints
 *     "only <k> of <N> cpus up\n" and writes 0x7f. APs halt after checking in.
 */
        .set    LAPIC, 0xfee00000
        .set    LAPIC_ID, LAPIC + 0x20
        .set    LAPIC_SVR, LAPIC + 0xf0
        .set    LAPIC_ICR_LOW, LAPIC + 0x300
        .set    LAPIC_ICR_HIGH, LAPIC + 0x310
        .set    TRAMPOLINE, 0x8000
        .set    ICR_INIT_ALL_BUT_SELF, 0x000c4500       /* shorthand 11, level assert, INIT */
        .set    ICR_SIPI_ALL_BUT_SELF, 0x000c4600 | (TRAMPOLINE >> 12)
        .set    MAX_APS, 255
        .set    AP_STACK_BYTES, 1024

        .code32
        .text
        .globl  _start
_start:
        mov     $stack_top, %esp
        cld
        mov     %ds, %ax
        mov     %ax, data_selector

        /* N from CPUID. */
        xor     %eax, %eax
        cpuid
        cmp     $0xb, %eax
        jb      1f
        mov     $0xb, %eax
        mov     $1, %ecx
        cpuid
        movzwl  %bx, %eax
        test    %eax, %eax
        jnz     2f
1:      mov     $1, %eax
        cpuid
        shr     $16, %ebx
        movzbl  %bl, %eax
        test    %eax, %eax
        jnz     2f
        mov     $1, %eax
2:      mov     %eax, cpu_count

        movl    $0x1ff, LAPIC_SVR               /* APIC software enable, spurious vector 0xff */

        /* The trampoline, with this GDT and CS for the APs' far jump. */
        mov     $trampoline, %esi
        mov     $TRAMPOLINE, %edi
        mov     $(trampoline_end - trampoline), %ecx
        rep movsb
        sgdt    TRAMPOLINE + (trampoline_gdtr - trampoline)
        mov     %cs, %ax
        mov     %ax, TRAMPOLINE + (trampoline_far - trampoline) + 4

        call    check_in
        cmpl    $1, cpu_count
        je      wait_done

        movl    $0, LAPIC_ICR_HIGH
        movl    $ICR_INIT_ALL_BUT_SELF, LAPIC_ICR_LOW
        call    icr_idle
        movl    $ICR_SIPI_ALL_BUT_SELF, LAPIC_ICR_LOW
        call    icr_idle
        movl    $ICR_SIPI_ALL_BUT_SELF, LAPIC_ICR_LOW
        call    icr_idle

        rdtsc
        add     $4, %edx                        /* deadline: now + 2^34 ticks */
        mov     %eax, %esi
        mov     %edx, %edi
wait:   mov     cpus_up, %eax
        cmp     cpu_count, %eax
        jae     wait_done
        pause
        rdtsc
        cmp     %edi, %edx
        jb      wait
        ja      timeout
        cmp     %esi, %eax
        jb      wait
timeout:
        call    lock_acquire
        mov     $msg_only, %esi
        call    puts
        mov     cpus_up, %eax
        call    put_dec
        mov     $msg_of, %esi
        call    puts
        mov     cpu_count, %eax
        call    put_dec
        mov     $msg_cpus_up, %esi
        jmp     die

wait_done:
        call    lock_acquire
        mov     $msg_all, %esi
        call    puts
        mov     cpu_count, %eax
        call    put_dec
        mov     $msg_cpus_up, %esi
        call    puts
        mov     $0x20, %al
        out     %al, $0xf4
        jmp     halt

/* Waits until the ICR's delivery status (bit 12) says the IPI was sent. */
icr_idle:
        pause
        testl   $0x1000, LAPIC_ICR_LOW
        jnz     icr_idle
        ret

/* An AP, in protected mode from the trampoline, with CS from the BSP's GDT. */
ap_entry:
        mov     %cs:data_selector, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %ss
        mov     $1, %eax
        lock xadd %eax, ap_stacks_used
        cmp     $MAX_APS, %eax
        jae     halt
        inc     %eax
        imul    $AP_STACK_BYTES, %eax, %esp
        add     $ap_stacks, %esp
        call    check_in
        jmp     halt

/* Prints "cpu <apic id>\n" and counts this CPU, holding the print lock. */
check_in:
        call    lock_acquire
        mov     $msg_cpu, %esi
        call    puts
        mov     LAPIC_ID, %eax
        shr     $24, %eax
        call    put_dec
        mov     $'\n', %al
        call    putc
        lock incl cpus_up
        movl    $0, print_lock                  /* release: x86 stores are not reordered with older ones */
        ret

lock_acquire:
        mov     $1, %eax
        xchg    %eax, print_lock                /* implicitly locked */
        test    %eax, %eax
        jz      2f
1:      pause
        cmpl    $0, print_lock
        jne     1b
        jmp     lock_acquire
2:      ret

        .include "serial32.inc"
        .include "halt.inc"

/* Copied to TRAMPOLINE; an AP starts here in real mode at CS=TRAMPOLINE>>4, IP=0. */
        .code16
trampoline:
        cli
        lgdtl   %cs:(trampoline_gdtr - trampoline)
        mov     %cr0, %eax
        or      $1, %eax
        mov     %eax, %cr0
        ljmpl   *%cs:(trampoline_far - trampoline)
        .align  4
trampoline_gdtr:
        .word   0                               /* limit and base: the BSP's SGDT */
        .long   0
        .align  4
trampoline_far:
        .long   ap_entry
        .word   0                               /* the BSP's CS */
trampoline_end:
        .code32

msg_cpu:     .asciz "cpu "
msg_all:     .asciz "all "
msg_only:    .asciz "only "
msg_of:      .asciz " of "
msg_cpus_up: .asciz " cpus up\n"

        .data
        .align  4
print_lock:     .long 0
cpus_up:        .long 0
cpu_count:      .long 0
ap_stacks_used: .long 0
data_selector:  .word 0

        .bss
        .align  16
        .space  1024
stack_top:
ap_stacks:
        .space  MAX_APS * AP_STACK_BYTES
