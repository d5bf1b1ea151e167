/*
 * fwcfg.c - reads QEMU's firmware configuration interface (fw_cfg) the way a kernel written for
 * QEMU does: the selector at port 0x510 (16-bit writes), the data port 0x511 (byte reads), and
 * the DMA address register at 0x514/0x518 (two big-endian 32-bit halves, the low one starting
 * the transfer of a FWCfgDmaAccess in RAM). Runs main() at CPL 0 (rt_run_main_at_cpl0): the
 * runtime's CPL-3 port I/O is byte-wide only.
 *
 * Run: node-kvm run guests/build/fwcfg.elf (no options needed).
 *
 * Contract with the host:
 *   - ELF64 on the runtime in guests/rt (rt.h), entered by the VMM's ELF64 loader.
 *   - Parameters at guest-physical 0x5000 (all zero = mode 0):
 *       0x5000 u32 mode: 0 enumerate, 1 half-read (for snapshot tests)
 *       0x5004 u32 go: mode 1 waits until the host sets it
 *   - Output on COM1, one line each; exit through isa-debug-exit (port 0xf4): 0x10 (process
 *     status 0x21) on success, 0x7f after "fwcfg BAD: <what>".
 *
 * Mode 0, enumerate:
 *     fwcfg signature QEMU                   (key 0x0000, 4 bytes through the data port)
 *     fwcfg id <hex>                         (key 0x0001, u32 LE)
 *     fwcfg dma signature QEMU CFG           (32-bit reads of 0x514 and 0x518)
 *     fwcfg cpus <n> max <n>                 (keys 0x0005 and 0x000f, u16 LE)
 *     fwcfg ram <hex>                        (key 0x0003, u64 LE)
 *     fwcfg file <select hex> <name> size <n>        (key 0x0019, one line per file)
 *     fwcfg e820 <addr hex> <length hex> <type>      (etc/e820 read through DMA, one per entry)
 *     fwcfg cmdline <size> "<text>"          (key 0x0014 u32 LE, key 0x0015 through DMA)
 *     fwcfg dma outside ram: error           (a DMA read into 0xfff00000 sets ERROR)
 *     fwcfg dma write: error                 (a DMA write sets ERROR)
 *     fwcfg done
 *   The DMA transfers must end with control 0 and the item bytes in the buffer.
 * Mode 1, half-read: selects the command line (key 0x0015) through the selector port, reads the
 *   first half (size / 2 bytes, size from key 0x0014) through the data port and prints
 *     fwcfg half "<first half>"
 *     fwcfg waiting
 *   then waits for the go word, and reads on without selecting again: one byte through the data
 *   port, the rest through a DMA read (control READ only, no SELECT):
 *     fwcfg rest "<rest, without the NUL>"
 *   (a failed DMA read prints "fwcfg BAD: ..." instead).
 */
#include "rt/rt.h"

const unsigned char rt_run_main_at_cpl0 = 1;

#define FW_CFG_SELECTOR 0x510
#define FW_CFG_DATA 0x511
#define FW_CFG_DMA_HIGH 0x514
#define FW_CFG_DMA_LOW 0x518

#define FW_CFG_SIGNATURE 0x0000
#define FW_CFG_ID 0x0001
#define FW_CFG_RAM_SIZE 0x0003
#define FW_CFG_NB_CPUS 0x0005
#define FW_CFG_MAX_CPUS 0x000f
#define FW_CFG_CMDLINE_SIZE 0x0014
#define FW_CFG_CMDLINE_DATA 0x0015
#define FW_CFG_FILE_DIR 0x0019

#define DMA_ERROR 0x01
#define DMA_READ 0x02
#define DMA_SELECT 0x08
#define DMA_WRITE 0x10

#define MAX_FILES 32
#define MAX_E820 32
#define CMDLINE_BYTES 4096
/* Above the 48-64 MiB the tests give the guest, below the 4 GiB its page tables map. */
#define OUTSIDE_RAM 0xfff00000UL

#define MODE (*(volatile uint32_t *)RT_GUEST_PARAMS)
#define GO (*(volatile uint32_t *)(RT_GUEST_PARAMS + 4))

struct fw_cfg_file {
	uint32_t size; /* big-endian */
	uint16_t select; /* big-endian */
	uint16_t reserved;
	char name[56];
};

struct fw_cfg_dma_access {
	uint32_t control;
	uint32_t length;
	uint64_t address;
} __attribute__((packed));

struct e820_entry {
	uint64_t address;
	uint64_t length;
	uint32_t type;
} __attribute__((packed));

static volatile struct fw_cfg_dma_access dma __attribute__((aligned(16)));
static struct e820_entry e820[MAX_E820];
static char cmdline[CMDLINE_BYTES];

__attribute__((noreturn)) static void bad(const char *what)
{
	puts("fwcfg BAD: ");
	puts(what);
	putc('\n');
	debug_exit(0x7f);
}

static void select_key(uint16_t key)
{
	outw(FW_CFG_SELECTOR, key);
}

static void read_data(void *buffer, uint32_t length)
{
	uint8_t *bytes = buffer;
	while (length-- > 0)
		*bytes++ = inb(FW_CFG_DATA);
}

static uint64_t read_le(uint16_t key, uint32_t bytes)
{
	uint8_t data[8] = { 0 };
	select_key(key);
	read_data(data, bytes);
	uint64_t value = 0;
	for (int i = (int)bytes - 1; i >= 0; i--)
		value = (value << 8) | data[i];
	return value;
}

/* One DMA transfer; returns the control word the device wrote back. */
static uint32_t dma_transfer(uint32_t control, uint64_t address, uint32_t length)
{
	dma.control = __builtin_bswap32(control);
	dma.length = __builtin_bswap32(length);
	dma.address = __builtin_bswap64(address);
	uint64_t descriptor = (uint64_t)(uintptr_t)&dma;
	outl(FW_CFG_DMA_HIGH, __builtin_bswap32((uint32_t)(descriptor >> 32)));
	outl(FW_CFG_DMA_LOW, __builtin_bswap32((uint32_t)descriptor));
	return __builtin_bswap32(dma.control);
}

static void put_quoted(const char *text, uint32_t length)
{
	putc('"');
	for (uint32_t i = 0; i < length && text[i]; i++)
		putc(text[i]);
	putc('"');
}

static void enumerate(void)
{
	char signature[5] = { 0 };
	select_key(FW_CFG_SIGNATURE);
	read_data(signature, 4);
	puts("fwcfg signature ");
	puts(signature);
	puts("\nfwcfg id ");
	uint32_t id = (uint32_t)read_le(FW_CFG_ID, 4);
	put_hex(id);
	putc('\n');
	if (!(id & 2))
		bad("no DMA interface");

	/* The register holds "QEMU CFG" big-endian: its first byte at 0x514. */
	uint32_t dma_signature[3] = { inl(FW_CFG_DMA_HIGH), inl(FW_CFG_DMA_LOW), 0 };
	puts("fwcfg dma signature ");
	puts((const char *)dma_signature);
	puts("\nfwcfg cpus ");
	put_dec(read_le(FW_CFG_NB_CPUS, 2));
	puts(" max ");
	put_dec(read_le(FW_CFG_MAX_CPUS, 2));
	puts("\nfwcfg ram ");
	put_hex(read_le(FW_CFG_RAM_SIZE, 8));
	putc('\n');

	uint32_t count_be;
	select_key(FW_CFG_FILE_DIR);
	read_data(&count_be, 4);
	uint32_t count = __builtin_bswap32(count_be);
	if (count > MAX_FILES)
		bad("too many files");
	uint16_t e820_select = 0;
	uint32_t e820_size = 0;
	for (uint32_t i = 0; i < count; i++) {
		struct fw_cfg_file file;
		read_data(&file, sizeof file);
		file.name[sizeof file.name - 1] = 0;
		uint16_t select = __builtin_bswap16(file.select);
		uint32_t size = __builtin_bswap32(file.size);
		puts("fwcfg file ");
		put_hex(select);
		putc(' ');
		puts(file.name);
		puts(" size ");
		put_dec(size);
		putc('\n');
		if (memcmp(file.name, "etc/e820", 9) == 0) {
			e820_select = select;
			e820_size = size;
		}
	}
	if (e820_select == 0)
		bad("no etc/e820");
	if (e820_size > sizeof e820 || e820_size % sizeof e820[0] != 0)
		bad("etc/e820 has an odd size");
	if (dma_transfer(((uint32_t)e820_select << 16) | DMA_SELECT | DMA_READ, (uintptr_t)e820, e820_size) != 0)
		bad("DMA read of etc/e820 failed");
	for (uint32_t i = 0; i < e820_size / sizeof e820[0]; i++) {
		puts("fwcfg e820 ");
		put_hex(e820[i].address);
		putc(' ');
		put_hex(e820[i].length);
		putc(' ');
		put_dec(e820[i].type);
		putc('\n');
	}

	uint32_t cmdline_size = (uint32_t)read_le(FW_CFG_CMDLINE_SIZE, 4);
	if (cmdline_size > CMDLINE_BYTES)
		bad("command line too long");
	if (dma_transfer(((uint32_t)FW_CFG_CMDLINE_DATA << 16) | DMA_SELECT | DMA_READ, (uintptr_t)cmdline, cmdline_size) != 0)
		bad("DMA read of the command line failed");
	puts("fwcfg cmdline ");
	put_dec(cmdline_size);
	putc(' ');
	put_quoted(cmdline, cmdline_size);
	putc('\n');

	uint32_t control = dma_transfer(((uint32_t)FW_CFG_SIGNATURE << 16) | DMA_SELECT | DMA_READ, OUTSIDE_RAM, 4);
	puts(control == DMA_ERROR ? "fwcfg dma outside ram: error\n" : "fwcfg dma outside ram: no error\n");
	control = dma_transfer(((uint32_t)FW_CFG_SIGNATURE << 16) | DMA_SELECT | DMA_WRITE, (uintptr_t)cmdline, 4);
	puts(control == DMA_ERROR ? "fwcfg dma write: error\n" : "fwcfg dma write: no error\n");
	puts("fwcfg done\n");
}

static void half_read(void)
{
	uint32_t size = (uint32_t)read_le(FW_CFG_CMDLINE_SIZE, 4);
	if (size > CMDLINE_BYTES)
		bad("command line too long");
	uint32_t half = size / 2;
	select_key(FW_CFG_CMDLINE_DATA);
	read_data(cmdline, half);
	puts("fwcfg half ");
	put_quoted(cmdline, half);
	puts("\nfwcfg waiting\n");
	/* Bounded, not timed: a paused or migrated guest must not time out (rt.h). */
	for (uint64_t spins = 0; GO == 0; spins++) {
		if (spins > 60000 * RT_SPINS_PER_MS)
			bad("never told to go on");
		cpu_relax();
	}
	if (size > half) {
		read_data(cmdline + half, 1);
		if (dma_transfer(DMA_READ, (uintptr_t)(cmdline + half + 1), size - half - 1) != 0)
			bad("DMA read of the rest of the command line failed");
	}
	puts("fwcfg rest ");
	put_quoted(cmdline + half, size - half);
	putc('\n');
}

int main(void)
{
	if (MODE == 1)
		half_read();
	else
		enumerate();
	return 0x10;
}
