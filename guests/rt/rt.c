/*
 * rt.c - the C part of the runtime (see rt.h): serial output, debug exit, the string functions
 * the compiler may call, the memory map, the exception report, and external interrupts.
 */
#include "rt.h"

/* 16550 line status register and its "transmitter holding register empty" bit. */
#define UART_LSR 5
#define UART_LSR_THRE 0x20
/* Give up waiting for THRE after this many polls and send anyway: output must not hang. */
#define UART_THRE_POLLS 1000

#define HVM_START_MAGIC 0x336ec578u
#define E820_RAM 1

void putc(char c)
{
	for (int polls = 0; polls < UART_THRE_POLLS; polls++) {
		if (inb(RT_COM1 + UART_LSR) & UART_LSR_THRE)
			break;
	}
	outb(RT_COM1, (uint8_t)c);
}

void puts(const char *s)
{
	while (*s)
		putc(*s++);
}

void put_hex(uint64_t value)
{
	static const char digits[] = "0123456789abcdef";
	int shift = 60;
	puts("0x");
	while (shift > 0 && (value >> shift) == 0)
		shift -= 4;
	for (; shift >= 0; shift -= 4)
		putc(digits[(value >> shift) & 0xf]);
}

void put_dec(uint64_t value)
{
	char text[20];
	int length = 0;
	do {
		text[length++] = (char)('0' + value % 10);
		value /= 10;
	} while (value != 0);
	while (length > 0)
		putc(text[--length]);
}

void debug_exit(uint8_t code)
{
	outb(RT_DEBUG_EXIT_PORT, code);
	/* The VMM stops here; should it not, spin (HLT is not allowed at CPL 3). */
	for (;;)
		cpu_relax();
}

/* String instructions: fast natively at CPL 3, and never turned back into calls to themselves. */
void *memcpy(void *dest, const void *src, size_t n)
{
	void *d = dest;
	__asm__ volatile("rep movsb" : "+D"(d), "+S"(src), "+c"(n) : : "memory");
	return dest;
}

void *memset(void *dest, int c, size_t n)
{
	void *d = dest;
	__asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
	return dest;
}

int memcmp(const void *a, const void *b, size_t n)
{
	const uint8_t *x = a, *y = b;
	for (size_t i = 0; i < n; i++) {
		if (x[i] != y[i])
			return x[i] < y[i] ? -1 : 1;
	}
	return 0;
}

/* hvm_start_info (Xen's arch-x86/hvm/start_info.h): magic at 0, memmap_paddr at 40,
 * memmap_entries at 48; each hvm_memmap_table_entry is {u64 addr, u64 size, u32 type, u32}. */
struct hvm_memmap_entry {
	uint64_t addr;
	uint64_t size;
	uint32_t type;
	uint32_t reserved;
};

uint64_t rt_ram_end(void)
{
	const uint8_t *info = (const uint8_t *)rt_start_info;
	if (info == NULL || *(const uint32_t *)info != HVM_START_MAGIC)
		return 0;
	const struct hvm_memmap_entry *map = (const void *)*(const uint64_t *)(info + 40);
	uint32_t entries = *(const uint32_t *)(info + 48);
	uint64_t end = 0;
	for (uint32_t i = 0; i < entries; i++) {
		if (map[i].type == E820_RAM && map[i].addr + map[i].size > end)
			end = map[i].addr + map[i].size;
	}
	return end;
}

/* Called by crt0 at the CPL main() runs at. */
void rt_main(void)
{
	debug_exit((uint8_t)main());
}

/* Called by crt0 at CPL 0 for any exception but a port access it could perform. */
void rt_exception(uint64_t vector, uint64_t error_code, uint64_t rip)
{
	puts("rt: exception ");
	put_dec(vector);
	puts(" error ");
	put_hex(error_code);
	puts(" at ");
	put_hex(rip);
	putc('\n');
	outb(RT_DEBUG_EXIT_PORT, RT_EXIT_EXCEPTION);
}

/* A 64-bit interrupt gate (Intel SDM vol. 3, 6.14.1). */
struct idt_gate {
	uint16_t offset_low;
	uint16_t selector;
	uint16_t flags;
	uint16_t offset_mid;
	uint32_t offset_high;
	uint32_t reserved;
};

#define KERNEL_CS 0x08
#define GATE_PRESENT_INTERRUPT_DPL0 0x8e00
#define FIRST_EXTERNAL_VECTOR 32
#define INTERRUPT_STUB_BYTES 16
/* Local APIC registers (Intel SDM vol. 3, table 11-1) and the IOAPIC's indirect window. */
#define LAPIC_ID 0x20
#define LAPIC_TPR 0x80
#define LAPIC_EOI 0xb0
#define LAPIC_SVR 0xf0
#define LAPIC_SVR_ENABLE 0x100
#define IOAPIC_REGSEL 0x00
#define IOAPIC_WINDOW 0x10
#define IOAPIC_REDIRECTION_TABLE 0x10

extern struct idt_gate rt_idt[256];
extern char rt_interrupt_stubs[];
static rt_interrupt_handler interrupt_handlers[256];

void rt_set_interrupt_handler(uint8_t vector, rt_interrupt_handler handler)
{
	if (vector < FIRST_EXTERNAL_VECTOR)
		return;
	interrupt_handlers[vector] = handler;
	uint64_t stub = (uint64_t)rt_interrupt_stubs + (uint64_t)(vector - FIRST_EXTERNAL_VECTOR) * INTERRUPT_STUB_BYTES;
	struct idt_gate *gate = &rt_idt[vector];
	gate->offset_low = (uint16_t)stub;
	gate->selector = KERNEL_CS;
	gate->offset_mid = (uint16_t)(stub >> 16);
	gate->offset_high = (uint32_t)(stub >> 32);
	gate->reserved = 0;
	compiler_barrier();
	gate->flags = GATE_PRESENT_INTERRUPT_DPL0;
}

/* Called by crt0's interrupt stubs at CPL 0, interrupts off. */
void rt_interrupt(uint64_t vector)
{
	rt_interrupt_handler handler = interrupt_handlers[vector & 0xff];
	if (handler)
		handler((uint8_t)vector);
	if (vector != RT_SPURIOUS_VECTOR)
		mmio_write32(RT_LAPIC_BASE + LAPIC_EOI, 0);
}

#define PIC_MASTER_IMR 0x21
#define PIC_SLAVE_IMR 0xa1

void rt_pic_disable(void)
{
	outb(PIC_MASTER_IMR, 0xff);
	outb(PIC_SLAVE_IMR, 0xff);
}

void rt_lapic_enable(void)
{
	mmio_write32(RT_LAPIC_BASE + LAPIC_TPR, 0);
	mmio_write32(RT_LAPIC_BASE + LAPIC_SVR, LAPIC_SVR_ENABLE | RT_SPURIOUS_VECTOR);
}

uint8_t rt_lapic_id(void)
{
	return (uint8_t)(mmio_read32(RT_LAPIC_BASE + LAPIC_ID) >> 24);
}

void rt_ioapic_route(uint8_t gsi, uint8_t vector, uint8_t apic_id, uint32_t flags)
{
	uint32_t entry = IOAPIC_REDIRECTION_TABLE + 2u * gsi;
	/* Masked while the halves disagree, then the low half with the vector and flags. */
	mmio_write32(RT_IOAPIC_BASE + IOAPIC_REGSEL, entry);
	mmio_write32(RT_IOAPIC_BASE + IOAPIC_WINDOW, RT_IOAPIC_MASKED);
	mmio_write32(RT_IOAPIC_BASE + IOAPIC_REGSEL, entry + 1);
	mmio_write32(RT_IOAPIC_BASE + IOAPIC_WINDOW, (uint32_t)apic_id << 24);
	mmio_write32(RT_IOAPIC_BASE + IOAPIC_REGSEL, entry);
	mmio_write32(RT_IOAPIC_BASE + IOAPIC_WINDOW, vector | flags);
}
