/*
 * rtc.c - the CMOS real-time clock (MC146818 at ports 0x70/0x71, IRQ 8) as a PC kernel uses it:
 * reads the time in each format register B offers, sets it, takes the periodic interrupt through
 * the IOAPIC, and times register reads. Runs main() at CPL 0 (it takes interrupts: see rt.h).
 *
 * Run: node-kvm run guests/build/rtc.elf (needs the in-kernel irqchip for IRQ 8: not with
 *     --no-irqchip).
 *
 * Parameters at guest-physical 0x5000 (all zero = mode 0):
 *   0x5000 u32 mode: 0 clock, 1 set, 2 periodic, 3 ticks, 4 bench, 5 update
 *   0x5004 u32 rate: register A's rate bits (periodic, ticks)
 *   0x5008 u32 count: interrupts to take (periodic, update); interrupts per line (ticks)
 *   0x500c u32 iterations (bench)
 *   0x5010 u32 ticks: when not 0, first set the clock to 2001-02-03 04:05:06 as mode 1 does
 *
 * Output on COM1, one line each; numbers in hex without "0x" where they are register bytes.
 *   Every mode first: "cmos 10=<v> 14=<v> 15=<v> 16=<v> 17=<v> 18=<v> 30=<v> 31=<v> 34=<v> 35=<v>
 *     5b=<v> 5c=<v> 5d=<v> 5f=<v>"
 * Mode 0, clock: for register B = 02 (BCD, 24 h), 06 (binary, 24 h), 00 (BCD, 12 h), 04 (binary,
 *   12 h), in this order: wait for the next tick of the seconds, then read every time register:
 *   "time <b> <sec> <min> <hour> <weekday> <day> <month> <year> <century>"; consecutive lines are
 *   one second apart. Exit 0x10.
 * Mode 1, set: with SET held, writes 2001-02-03 04:05:06 (Saturday) in BCD, 24 h, and century 20;
 *   clears SET; reads at once ("time 02 ..."), waits for the next tick and reads again. Exit 0x10.
 * Mode 2, periodic: routes GSI 8 to vector 0x28 on this CPU, enables the local APIC, reads
 *   register C, sets the rate and PIE, waits (STI; HLT) for `count` interrupts whose register C
 *   says PF, clears PIE: "periodic <count> interrupts, <spurious> without PF". Exit 0x10.
 * Mode 3, ticks: as mode 2 (binary mode), forever; every `count` interrupts:
 *   "tick <n> <year> <month> <day> <hour> <min> <sec>" (decimal, n from 1): for snapshots and
 *   migrations of a guest with the interrupt armed.
 * Mode 4, bench: the TSC's rate from two ticks of the seconds, then rounds of `iterations` RTC
 *   reads (index write to 0x70, data read from 0x71) and of as many write+read pairs of the POST
 *   port 0x80, the fastest round of each: "bench tsc_hz <hz> rtc <cycles per read> post <cycles
 *   per pair>". Exit 0x10.
 * Mode 5, update: as mode 2 with UIE instead of PIE (and no periodic rate), binary mode: after each
 *   update-ended interrupt, "update <n> <seconds>" (decimal), `count` times. Exit 0x10.
 * A failure prints "rtc BAD: <what>" and exits 0x7f.
 */
#include "rt/rt.h"

const unsigned char rt_run_main_at_cpl0 = 1;

#define CMOS_INDEX 0x70
#define CMOS_DATA 0x71
#define POST_PORT 0x80
#define REG_A 0x0a
#define REG_B 0x0b
#define REG_C 0x0c
#define REG_A_UIP 0x80
#define REG_B_SET 0x80
#define REG_B_PIE 0x40
#define REG_B_UIE 0x10
#define REG_B_DM 0x04
#define REG_B_24H 0x02
#define REG_C_PF 0x40
#define REG_C_UF 0x10
#define DIVIDER_32KHZ 0x20
#define RTC_GSI 8
#define RTC_VECTOR 0x28
#define SUCCESS 0x10
#define FAILURE 0x7f
/* Polls of the seconds before giving up on a tick: several seconds at any exit cost. */
#define TICK_POLLS 20000000UL

struct params {
	uint32_t mode;
	uint32_t rate;
	uint32_t count;
	uint32_t iterations;
	uint32_t set_first;
};

static const uint8_t time_registers[] = { 0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32 };
static const uint8_t memory_bytes[] = { 0x10, 0x14, 0x15, 0x16, 0x17, 0x18, 0x30, 0x31, 0x34, 0x35, 0x5b, 0x5c, 0x5d, 0x5f };

static volatile uint32_t interrupts;
static volatile uint32_t updates;
static volatile uint32_t without_pf;

static uint8_t cmos_read(uint8_t index)
{
	outb(CMOS_INDEX, index);
	return inb(CMOS_DATA);
}

static void cmos_write(uint8_t index, uint8_t value)
{
	outb(CMOS_INDEX, index);
	outb(CMOS_DATA, value);
}

static void put_hex_byte(uint8_t value)
{
	static const char digits[] = "0123456789abcdef";
	putc(digits[value >> 4]);
	putc(digits[value & 0xf]);
}

static __attribute__((noreturn)) void fail(const char *what)
{
	puts("rtc BAD: ");
	puts(what);
	putc('\n');
	debug_exit(FAILURE);
}

/* Returns just after the seconds tick over: UIP seen falling, or the seconds register changing. */
static void wait_for_tick(void)
{
	uint8_t start = cmos_read(0x00);
	for (unsigned long polls = 0; polls < TICK_POLLS; polls++) {
		if (cmos_read(REG_A) & REG_A_UIP) {
			while (cmos_read(REG_A) & REG_A_UIP && polls++ < TICK_POLLS)
				;
			return;
		}
		if (cmos_read(0x00) != start)
			return;
	}
	fail("the seconds never ticked");
}

static void print_time(void)
{
	puts("time ");
	put_hex_byte(cmos_read(REG_B) & 0x7f);
	for (size_t i = 0; i < sizeof time_registers; i++) {
		putc(' ');
		put_hex_byte(cmos_read(time_registers[i]));
	}
	putc('\n');
}

static void set_clock(void)
{
	cmos_write(REG_B, REG_B_SET | REG_B_24H);
	cmos_write(0x00, 0x06);
	cmos_write(0x02, 0x05);
	cmos_write(0x04, 0x04);
	cmos_write(0x06, 0x07);
	cmos_write(0x07, 0x03);
	cmos_write(0x08, 0x02);
	cmos_write(0x09, 0x01);
	cmos_write(0x32, 0x20);
	cmos_write(REG_B, REG_B_24H);
}

static void on_rtc_interrupt(uint8_t vector)
{
	(void)vector;
	uint8_t flags = cmos_read(REG_C);
	if (flags & REG_C_PF)
		interrupts++;
	else
		without_pf++;
	if (flags & REG_C_UF)
		updates++;
}

static void arm_interrupts(uint32_t rate, uint8_t mode_bits)
{
	rt_set_interrupt_handler(RTC_VECTOR, on_rtc_interrupt);
	rt_pic_disable();
	rt_lapic_enable();
	rt_ioapic_route(RTC_GSI, RTC_VECTOR, rt_lapic_id(), 0);
	(void)cmos_read(REG_C); /* nothing pending from before */
	cmos_write(REG_A, DIVIDER_32KHZ | (rate & 0x0f));
	cmos_write(REG_B, mode_bits);
}

/* Waits with interrupts on until `target` interrupts with PF were counted; returns with them off. */
static void wait_for_interrupts(uint32_t target)
{
	rt_cli();
	while (interrupts < target) {
		rt_sti_hlt();
		rt_cli();
	}
}

static void print_tick(uint32_t n)
{
	/* Binary mode: each register is the number itself. */
	uint8_t year = cmos_read(0x09), century = cmos_read(0x32);
	puts("tick ");
	put_dec(n);
	putc(' ');
	put_dec(century * 100u + year);
	static const uint8_t rest[] = { 0x08, 0x07, 0x04, 0x02, 0x00 };
	for (size_t i = 0; i < sizeof rest; i++) {
		putc(' ');
		put_dec(cmos_read(rest[i]));
	}
	putc('\n');
}

/* Cycles per call of `op`, the fastest of BENCH_ROUNDS rounds (the host's noise only adds). */
#define BENCH_ROUNDS 5

static void rtc_op(void)
{
	(void)cmos_read(0x00);
}

static void post_op(void)
{
	outb(POST_PORT, 0);
	(void)inb(POST_PORT);
}

static uint64_t cycles_per(void (*op)(void), uint32_t iterations)
{
	uint64_t best = UINT64_MAX;
	for (int round = 0; round < BENCH_ROUNDS; round++) {
		uint64_t start = rt_rdtsc();
		for (uint32_t i = 0; i < iterations; i++)
			op();
		uint64_t cycles = (rt_rdtsc() - start) / iterations;
		if (cycles < best)
			best = cycles;
	}
	return best;
}

static void bench(uint32_t iterations)
{
	wait_for_tick();
	uint64_t second_start = rt_rdtsc();
	wait_for_tick();
	uint64_t tsc_hz = rt_rdtsc() - second_start;
	uint64_t rtc = cycles_per(rtc_op, iterations);
	uint64_t post = cycles_per(post_op, iterations);
	puts("bench tsc_hz ");
	put_dec(tsc_hz);
	puts(" rtc ");
	put_dec(rtc);
	puts(" post ");
	put_dec(post);
	putc('\n');
}

int main(void)
{
	const struct params *params = (const struct params *)RT_GUEST_PARAMS;
	puts("cmos");
	for (size_t i = 0; i < sizeof memory_bytes; i++) {
		putc(' ');
		put_hex_byte(memory_bytes[i]);
		putc('=');
		put_hex_byte(cmos_read(memory_bytes[i]));
	}
	putc('\n');
	switch (params->mode) {
	case 0: {
		static const uint8_t formats[] = { REG_B_24H, REG_B_DM | REG_B_24H, 0, REG_B_DM };
		for (size_t i = 0; i < sizeof formats; i++) {
			cmos_write(REG_B, formats[i]);
			wait_for_tick();
			print_time();
		}
		return SUCCESS;
	}
	case 1:
		set_clock();
		print_time();
		wait_for_tick();
		print_time();
		return SUCCESS;
	case 2:
		arm_interrupts(params->rate, REG_B_PIE | REG_B_24H);
		wait_for_interrupts(params->count);
		cmos_write(REG_B, REG_B_24H);
		puts("periodic ");
		put_dec(interrupts);
		puts(" interrupts, ");
		put_dec(without_pf);
		puts(" without PF\n");
		return SUCCESS;
	case 3: {
		if (params->set_first)
			set_clock();
		uint32_t every = params->count ? params->count : 1;
		arm_interrupts(params->rate, REG_B_PIE | REG_B_DM | REG_B_24H);
		for (uint32_t n = 1;; n++) {
			wait_for_interrupts(n * every);
			print_tick(n);
		}
	}
	case 5:
		arm_interrupts(0, REG_B_UIE | REG_B_DM | REG_B_24H);
		for (uint32_t n = 1; n <= params->count; n++) {
			rt_cli();
			while (updates < n) {
				rt_sti_hlt();
				rt_cli();
			}
			puts("update ");
			put_dec(n);
			putc(' ');
			put_dec(cmos_read(0x00));
			putc('\n');
		}
		cmos_write(REG_B, REG_B_DM | REG_B_24H);
		return SUCCESS;
	case 4:
		bench(params->iterations ? params->iterations : 10000);
		return SUCCESS;
	default:
		fail("unknown mode");
	}
}
