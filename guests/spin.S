/*
 * spin.S - a guest that never exits on its own.
 *
 * Run: node-kvm run guests/build/spin.bin --api-socket PATH (no options needed; never ends on its
 *     own).
 *
 * Contract with the host:
 *   - Loaded at guest-physical 0x7c00, entered in real mode at CS:IP 0:0x7c00.
 *   - Executes `cli` (so no injected interrupt can divert it) and then jumps
 *     to itself forever: no I/O, no MMIO, no hlt, no memory writes.
 *   - KVM_RUN only returns when the host kicks the vCPU (signal ->
 *     KVM_EXIT_INTR / -EINTR, or immediate_exit), which is what it tests.
 */
        .code16
        .text
        .globl  _start
_start:
        cli
1:      jmp     1b
