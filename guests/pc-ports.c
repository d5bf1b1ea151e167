/*
 * pc-ports.c - the ACPI PM block and the quiet PC ports as a kernel uses them. main() runs at CPL 0
 * (rt_run_main_at_cpl0): the PM timer is read with 32-bit `inl`, which CPL 3 cannot do here (rt.h).
 *
 * Run: node-kvm run guests/build/pc-ports.elf (no options needed).
 *
 * Contract with the host:
 *   - ELF64 linked at 1 MiB on the runtime in guests/rt (rt.h).
 *   - Ports: PM1a event block 0x600, PM1a control 0x604, PM timer 0x608 (24 bits at 3.579545 MHz),
 *     ELCR 0x4d0/0x4d1, PCI configuration 0xcf8/0xcfc, POST code 0x80.
 *   - Parameters at guest-physical 0x5000 (all zero = defaults):
 *       0x5000 u32 mode: 0 measure, 1 power off, 2 count, 3 bench, 4 probe
 *       0x5004 u32 ticks (measure: PM timer ticks to count, default 71591, about 20 ms;
 *                  count: ticks per line, default 65536; bench: reads, default 10000)
 *   - Output on COM1, one line each; main() returns 0 (debug-exit code 0, process status 1)
 *     except where a mode says otherwise.
 *
 * Mode 0, measure: reads the timer until `ticks` have passed, counting the ticks from the
 *   differences of consecutive reads (mod 2^24) and the TSC over the same reads, then prints
 *     pm <ticks counted> tsc <TSC cycles> reads <n> wraps <w> back <b> high <h>
 *   w: reads lower than the one before (the 24-bit wrap); b: reads that went back (a difference
 *   of 2^23 or more mod 2^24); h: reads with any of bits 24-31 set. Then
 *     bytes <inb 0x60b> <inw 0x60a> sci <PM1_CNT & 1>
 * Mode 1, power off: prints "sci <PM1_CNT & 1>", writes SLP_EN with SLP_TYP 5 (not _S5) to
 *   PM1a control, prints "still running", writes 0x2000 (SLP_EN, _S5 = 0): the machine ends.
 *   Should it go on, prints "power-off returned" and returns 0x7f.
 * Mode 2, count: reads the timer forever; after each `ticks` counted prints
 *     tick <k> <counter>
 *   (decimal k from 1, counter in hex), and "BAD back <previous> <read>" whenever a read went back.
 * Mode 3, bench: `ticks` reads of the PM timer (inl 0x608), then as many of the POST code port
 *   (inb 0x80), each run timed by the TSC:
 *     bench pm <TSC cycles> post <TSC cycles> reads <n>
 * Mode 4, probe: the accesses a PC kernel makes on every boot, then what it read:
 *     elcr <0x4d0> <0x4d1> after writing 0xff to both, then <0x4d0> <0x4d1> after 0x20 and 0x0e
 *     cf8 <after outl 0x80000000> <after outb 0x01 to 0xcfb>
 *     cfc <inl 0xcfc> <inw 0xcfe> <inb 0xcff>
 *     post <inb 0x80> after outb 0x55, outw 0x1234 and outl 0x12345678 to 0x80
 */
#include "rt/rt.h"

const unsigned char rt_run_main_at_cpl0 = 1;

#define PM1A_CNT 0x604
#define PM_TMR 0x608
#define SLP_EN 0x2000
#define SLP_TYP_SHIFT 10
#define ELCR1 0x4d0
#define ELCR2 0x4d1
#define PCI_CONFIG_ADDRESS 0xcf8
#define PCI_CONFIG_DATA 0xcfc
#define POST_CODE 0x80
#define COUNTER_MASK 0xffffffu
#define HALF_COUNTER 0x800000u

struct params {
	uint32_t mode;
	uint32_t ticks;
};

static void put_field(const char *name, uint64_t value)
{
	puts(name);
	put_dec(value);
}

static void put_hex_field(const char *name, uint64_t value)
{
	puts(name);
	put_hex(value);
}

static void measure(uint32_t ticks)
{
	uint64_t counted = 0, reads = 0, wraps = 0, back = 0, high = 0;
	uint32_t previous = inl(PM_TMR);
	uint64_t tsc_start = rt_rdtsc();
	while (counted < ticks) {
		uint32_t now = inl(PM_TMR);
		uint32_t delta = (now - previous) & COUNTER_MASK;
		reads++;
		if (now > COUNTER_MASK)
			high++;
		if (delta >= HALF_COUNTER)
			back++;
		else
			counted += delta;
		if (now < previous)
			wraps++;
		previous = now;
	}
	uint64_t tsc_cycles = rt_rdtsc() - tsc_start;
	put_field("pm ", counted);
	put_field(" tsc ", tsc_cycles);
	put_field(" reads ", reads);
	put_field(" wraps ", wraps);
	put_field(" back ", back);
	put_field(" high ", high);
	put_hex_field("\nbytes ", inb(PM_TMR + 3));
	put_hex_field(" ", inw(PM_TMR + 2));
	put_field(" sci ", inw(PM1A_CNT) & 1);
	putc('\n');
}

static int power_off(void)
{
	put_field("sci ", inw(PM1A_CNT) & 1);
	putc('\n');
	outw(PM1A_CNT, SLP_EN | (5 << SLP_TYP_SHIFT));
	puts("still running\n");
	outw(PM1A_CNT, SLP_EN);
	puts("power-off returned\n");
	return 0x7f;
}

static void count(uint32_t ticks)
{
	uint64_t counted = 0, line = 0;
	uint32_t previous = inl(PM_TMR);
	for (;;) {
		uint32_t now = inl(PM_TMR);
		uint32_t delta = (now - previous) & COUNTER_MASK;
		if (delta >= HALF_COUNTER) {
			put_hex_field("BAD back ", previous);
			put_hex_field(" ", now);
			putc('\n');
		} else {
			counted += delta;
		}
		previous = now;
		if (counted >= (line + 1) * ticks) {
			line++;
			put_field("tick ", line);
			put_hex_field(" ", now);
			putc('\n');
		}
	}
}

static void bench(uint32_t reads)
{
	uint64_t start = rt_rdtsc();
	for (uint32_t i = 0; i < reads; i++)
		(void)inl(PM_TMR);
	uint64_t pm = rt_rdtsc() - start;
	start = rt_rdtsc();
	for (uint32_t i = 0; i < reads; i++)
		(void)inb(POST_CODE);
	uint64_t post = rt_rdtsc() - start;
	put_field("bench pm ", pm);
	put_field(" post ", post);
	put_field(" reads ", reads);
	putc('\n');
}

static void probe(void)
{
	outb(ELCR1, 0xff);
	outb(ELCR2, 0xff);
	put_hex_field("elcr ", inb(ELCR1));
	put_hex_field(" ", inb(ELCR2));
	outb(ELCR1, 0x20);
	outb(ELCR2, 0x0e);
	put_hex_field(" ", inb(ELCR1));
	put_hex_field(" ", inb(ELCR2));

	/* Linux's pci_check_type1(): a byte to 0xcfb, then CONFIG_ADDRESS must read back a dword. */
	outl(PCI_CONFIG_ADDRESS, 0x80000000);
	put_hex_field("\ncf8 ", inl(PCI_CONFIG_ADDRESS));
	outb(PCI_CONFIG_ADDRESS + 3, 0x01);
	put_hex_field(" ", inl(PCI_CONFIG_ADDRESS));
	put_hex_field("\ncfc ", inl(PCI_CONFIG_DATA));
	put_hex_field(" ", inw(PCI_CONFIG_DATA + 2));
	put_hex_field(" ", inb(PCI_CONFIG_DATA + 3));

	outb(POST_CODE, 0x55);
	outw(POST_CODE, 0x1234);
	outl(POST_CODE, 0x12345678);
	put_hex_field("\npost ", inb(POST_CODE));
	putc('\n');
}

int main(void)
{
	const volatile struct params *params = (const volatile struct params *)RT_GUEST_PARAMS;
	uint32_t mode = params->mode;
	uint32_t ticks = params->ticks;
	switch (mode) {
	case 0:
		measure(ticks ? ticks : 71591);
		return 0;
	case 1:
		return power_off();
	case 2:
		count(ticks ? ticks : 65536);
		return 0;
	case 3:
		bench(ticks ? ticks : 10000);
		return 0;
	case 4:
		probe();
		return 0;
	default:
		puts("pc-ports: unknown mode\n");
		return 0x7e;
	}
}
