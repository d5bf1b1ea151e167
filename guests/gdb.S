/*
 * gdb.S - an ELF64 kernel for the GDB stub's tests, linked with its symbols so that gdb can
 * `break` at them.
 *
 * Run: node-kvm run guests/build/gdb.elf --gdb tcp::1234 --gdb-wait, then gdb guests/build/gdb.elf.
 *
 * Contract with the host:
 *   - Entered at _start in long mode (the loader's ELF64 entry state). It sets its own stack.
 *   - count_loop: adds 1 to %rbx five times (%ecx counts down): `inc %rbx` (3 bytes), `dec %ecx`
 *     (2 bytes), `jnz count_loop` (2 bytes); after_loop follows it.
 *   - after_loop: prints "rbx=<rbx in decimal> msg=<the NUL-terminated string at message>\n"
 *     on COM1 (message is "hello" unless changed), then writes the byte at exit_code (0x21) to the
 *     debug-exit port 0xf4.
 */
        .code64
        .text
        .globl  _start, count_loop, after_loop, message, exit_code
_start:
        lea     stack_top(%rip), %rsp
        xor     %ebx, %ebx
        mov     $5, %ecx
count_loop:
        inc     %rbx
        dec     %ecx
        jnz     count_loop
after_loop:
        lea     msg_rbx(%rip), %rsi
        call    puts
        mov     %rbx, %rax
        call    put_dec
        lea     msg_msg(%rip), %rsi
        call    puts
        lea     message(%rip), %rsi
        call    puts
        mov     $'\n', %al
        call    putc
        mov     exit_code(%rip), %al
        out     %al, $0xf4
        jmp     halt

        .include "serial64.inc"
        .include "halt.inc"

msg_rbx:   .asciz "rbx="
msg_msg:   .asciz " msg="

        .data
message:   .asciz "hello"
exit_code: .byte 0x21

        .bss
        .align  16
        .space  1024
stack_top:
