/*
 * rt.h - a tiny freestanding runtime for C test guests (ELF64, linked at 1 MiB by rt.ld).
 *
 * crt0.S is entered by the VMM's ELF64 loader in long mode (its identity map of the first 4 GiB,
 * user-accessible 2 MiB pages; interrupts off; RBX = hvm_start_info). At CPL 0 it only loads its
 * own GDT (kernel and user segments, a TSS), an IDT (a #GP handler that performs trapped port I/O,
 * a fatal handler for the other exceptions) and IRETQs to CPL 3, where main() runs: guest
 * user-mode code runs natively on hosts such as kvm_pvm, which emulate kernel-mode code.
 * A guest that defines `const unsigned char rt_run_main_at_cpl0 = 1;` runs main() at CPL 0.
 *
 * Port I/O from CPL 3 raises #GP where the host does not honour IOPL (kvm_pvm); the handler then
 * performs `out %al,%dx`, `out %al,$imm8`, `in %dx,%al` or `in $imm8,%al` at CPL 0 and returns
 * past it. Byte-wide port I/O only: use outb()/inb() below. MMIO needs no help: it exits to KVM
 * from any CPL.
 *
 * main()'s return value goes to debug_exit(). Any other exception prints
 * "rt: exception <vector> error <code> at <rip>" and exits 0x7d.
 */
#ifndef RT_H
#define RT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define RT_COM1 0x3f8
#define RT_DEBUG_EXIT_PORT 0xf4
/* A page the loader never writes: parameters the host leaves for its test guests. */
#define RT_GUEST_PARAMS 0x5000UL
/* Exit code of an unexpected exception. */
#define RT_EXIT_EXCEPTION 0x7d

int main(void);

/* Port I/O, byte-wide: the forms the #GP handler knows. */
static inline void outb(uint16_t port, uint8_t value)
{
	__asm__ volatile("out %0, %1" : : "a"(value), "d"(port) : "memory");
}

static inline uint8_t inb(uint16_t port)
{
	uint8_t value;
	__asm__ volatile("in %1, %0" : "=a"(value) : "d"(port) : "memory");
	return value;
}

/* MMIO: one access of exactly this width (virtio-mmio wants aligned 32-bit accesses). */
static inline uint32_t mmio_read32(uintptr_t addr)
{
	return *(volatile uint32_t *)addr;
}

static inline void mmio_write32(uintptr_t addr, uint32_t value)
{
	*(volatile uint32_t *)addr = value;
}

static inline uint8_t mmio_read8(uintptr_t addr)
{
	return *(volatile uint8_t *)addr;
}

/* Keeps the compiler from moving memory accesses across it (x86 orders them otherwise). */
static inline void compiler_barrier(void)
{
	__asm__ volatile("" : : : "memory");
}

/* Orders earlier stores before later loads (the one reordering x86 does). */
static inline void memory_barrier(void)
{
	__asm__ volatile("mfence" : : : "memory");
}

static inline void cpu_relax(void)
{
	__asm__ volatile("pause" : : : "memory");
}

/*
 * Polling loops are bounded by iteration counts, not by a clock: a guest paused for a snapshot
 * or a migration does not time out on resuming. RT_SPINS_PER_MS iterations of cpu_relax() plus
 * a memory read take about 1 ms on the kvm_pvm Xeon host this was measured on (95 000 per ms);
 * CPUs with a slower PAUSE (Skylake and later, ~140 cycles) take up to 4 times longer.
 */
#define RT_SPINS_PER_MS 100000UL

/* Serial output on COM1, each byte after LSR says the transmitter holding register is empty. */
void putc(char c);
void puts(const char *s);
/* Lowercase hex with "0x", no leading zeros. */
void put_hex(uint64_t value);
void put_dec(uint64_t value);
/* QEMU's isa-debug-exit: the VMM exits with status (code << 1) | 1. Does not return. */
__attribute__((noreturn)) void debug_exit(uint8_t code);

void *memcpy(void *dest, const void *src, size_t n);
void *memset(void *dest, int c, size_t n);
int memcmp(const void *a, const void *b, size_t n);

/* The hvm_start_info the loader passed in RBX (or 0 when RBX held something else). */
extern uint64_t rt_start_info;
/* End of the highest RAM entry of the start info's memory map; 0 when there is none. */
uint64_t rt_ram_end(void);
/* Where the image (text, data, bss) ends, page-aligned; rt.ld keeps it below RT_FREE_RAM. */
extern char rt_image_end[];
/* RAM from here up to rt_ram_end() is the guest's to use as it likes. */
#define RT_FREE_RAM 0x400000UL

#endif
