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
 *
 * External interrupts (vectors 32-255): rt_set_interrupt_handler(vector, fn) points the vector's
 * gate at a stub that calls fn(vector) at CPL 0 with interrupts off, then writes the local APIC's
 * EOI register (for every vector but RT_SPURIOUS_VECTOR, which the local APIC does not want
 * acknowledged). A vector with no handler raises #NP (a fatal exception) when it fires. A guest
 * that takes interrupts runs main() at CPL 0 (rt_run_main_at_cpl0): STI and HLT are CPL 0
 * instructions (at CPL 3 under kvm_pvm they fault), and main() at CPL 3 runs with IF = 0. Enable
 * the local APIC (rt_lapic_enable), mask the PICs (rt_pic_disable), route the interrupt
 * (rt_ioapic_route for an IOAPIC pin), and
 * wait with rt_sti_hlt(), which takes no interrupt between the STI and the HLT, so a check of
 * what a handler counts, made with interrupts off, cannot miss the interrupt it waits for. Code
 * at CPL 0 is emulated on kvm_pvm: keep handlers and the loop around them short.
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

/*
 * 16- and 32-bit port I/O: at CPL 0 only (a guest that sets rt_run_main_at_cpl0), since the #GP
 * handler that lets CPL 3 code do port I/O knows the byte-wide forms alone.
 */
static inline uint16_t inw(uint16_t port)
{
	uint16_t value;
	__asm__ volatile("in %1, %0" : "=a"(value) : "d"(port) : "memory");
	return value;
}

static inline uint32_t inl(uint16_t port)
{
	uint32_t value;
	__asm__ volatile("in %1, %0" : "=a"(value) : "d"(port) : "memory");
	return value;
}

static inline void outw(uint16_t port, uint16_t value)
{
	__asm__ volatile("out %0, %1" : : "a"(value), "d"(port) : "memory");
}

static inline void outl(uint16_t port, uint32_t value)
{
	__asm__ volatile("out %0, %1" : : "a"(value), "d"(port) : "memory");
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

/* External interrupts (see the top of this file). */
#define RT_LAPIC_BASE 0xfee00000UL
#define RT_IOAPIC_BASE 0xfec00000UL
/* The spurious-interrupt vector rt_lapic_enable() programs. */
#define RT_SPURIOUS_VECTOR 0xff
/* IOAPIC redirection entry bits (82093AA data sheet, 3.2.4) for rt_ioapic_route()'s flags. */
#define RT_IOAPIC_ACTIVE_LOW (1u << 13)
#define RT_IOAPIC_LEVEL (1u << 15)
#define RT_IOAPIC_MASKED (1u << 16)

typedef void (*rt_interrupt_handler)(uint8_t vector);
/* Sets the handler of `vector` (32-255) and makes its gate present. */
void rt_set_interrupt_handler(uint8_t vector, rt_interrupt_handler handler);
/* Masks every input of both 8259 PICs. A guest that takes ISA interrupts through the IOAPIC does
 * this first (as Linux does): the PIC sees the same lines, and KVM's BSP takes its output through
 * LINT0 (ExtINT) with the vector base of an uninitialised PIC, 0. */
void rt_pic_disable(void);
/* Software-enables this CPU's local APIC (spurious vector RT_SPURIOUS_VECTOR) and accepts every priority. */
void rt_lapic_enable(void);
/* This CPU's local APIC id. */
uint8_t rt_lapic_id(void);
/* Routes IOAPIC pin `gsi` to `vector` on the CPU with local APIC id `apic_id` (fixed delivery, physical
 * destination); `flags` adds RT_IOAPIC_* bits (0: edge-triggered, active high, unmasked). */
void rt_ioapic_route(uint8_t gsi, uint8_t vector, uint8_t apic_id, uint32_t flags);

/* CPL 0 only (see above). */
static inline void rt_sti(void)
{
	__asm__ volatile("sti" : : : "memory");
}

static inline void rt_cli(void)
{
	__asm__ volatile("cli" : : : "memory");
}

/* Enables interrupts and waits for one; returns with interrupts enabled (rt_cli() to check state). */
static inline void rt_sti_hlt(void)
{
	__asm__ volatile("sti; hlt" : : : "memory");
}

static inline uint64_t rt_rdtsc(void)
{
	uint32_t low, high;
	__asm__ volatile("rdtsc" : "=a"(low), "=d"(high));
	return ((uint64_t)high << 32) | low;
}

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
