/*
 * pc-tables.c - finds the machine's processors and interrupt controllers the way a PC kernel
 * does, from the firmware tables, and starts the other processors with what they said.
 *
 * Run: node-kvm run guests/build/pc-tables.elf --vcpus 2 (needs the in-kernel irqchip: not with
 *     --no-irqchip).
 *
 * Contract with the host (a machine with the in-kernel irqchip, any number of vCPUs):
 *   - ACPI: scans 0xE0000-0xFFFFF on 16-byte boundaries for the RSDP ("RSD PTR ", both
 *     checksums, revision 2), follows it to the XSDT (and checks the RSDT), checks every table
 *     the XSDT lists, the FADT's DSDT (which must define \_S5) and FACS, and walks the MADT:
 *       "acpi: rsdp <addr> xsdt <addr> rsdt <addr> start_info <addr>\n"  (the last: hvm_start_info.rsdp_paddr)
 *       "acpi: FACP APIC\n"                                  (the XSDT's tables, in order)
 *       "acpi: fadt sci <n> pm1a_evt <port> pm1a_cnt <port> pm_tmr <port> _S5 ok facs ok\n"
 *       "madt: lapic <addr> cpus <n> ioapic <id> at <addr> gsi base <n>\n"
 *       "madt: override irq <i> gsi <g> flags <f>\n"         (one per interrupt source override)
 *   - MP: scans 0xF0000-0xFFFFF for the floating pointer ("_MP_", checksum), walks the
 *     configuration table ("PCMP", checksum, entry count):
 *       "mp: fp <addr> table <addr> cpus <n> bsp <apic id> ioapic <id> at <addr> irqs <n>\n"
 *   - Then starts every processor the MADT lists other than itself with INIT, SIPI, SIPI sent
 *     to its APIC ID through the local APIC at the address the MADT gave. Each AP runs a
 *     real-mode trampoline (SIPI vector 0x08, copied to 0x8000) that marks its initial APIC ID
 *     (CPUID 1) in a bitmap, counts itself, and halts:
 *       "smp: <n> cpus up\n"
 *     where n counts the BSP and every AP that checked in, each AP being one the MADT listed.
 *   - With the command line "poweroff": then powers the machine off as an ACPI kernel does, writing
 *     SLP_EN with the \_S5 package's SLP_TYPa to the FADT's PM1a control block:
 *       "acpi: S5 sleep type <n>: powering off\n"
 *   - Exits through debug_exit: 0x10 when every check passed and every listed processor came
 *     up (or the power-off did not happen); 0x11 when a check failed (after a line
 *     "FAIL: <what>\n").
 * main() runs at CPL 3: memory reads and the local APIC's MMIO need nothing more.
 */
#include "rt/rt.h"

#define SUCCESS 0x10
#define FAILURE 0x11
#define TRAMPOLINE 0x8000UL
#define MAX_CPUS 256

/* Local APIC registers (offsets from its base). */
#define LAPIC_ID 0x20
#define LAPIC_SVR 0xf0
#define LAPIC_ICR_LOW 0x300
#define LAPIC_ICR_HIGH 0x310
#define ICR_INIT 0x4500 /* level assert, INIT */
#define ICR_STARTUP (0x4600 | (TRAMPOLINE >> 12))
#define ICR_BUSY (1 << 12)

/*
 * The AP trampoline, copied to TRAMPOLINE: an AP starts at CS = TRAMPOLINE >> 4, IP = 0 in real
 * mode. Kept short: kernel-mode code is emulated on some hosts.
 */
__asm__(
	"	.section .rodata\n"
	"	.code16\n"
	"ap_trampoline:\n"
	"	cli\n"
	"	mov %cs, %ax\n"
	"	mov %ax, %ds\n"
	"	mov $1, %eax\n"
	"	cpuid\n"
	"	shr $24, %ebx\n"
	"	lock btsw %bx, ap_seen - ap_trampoline\n"
	"	lock incw ap_count - ap_trampoline\n"
	"1:	hlt\n"
	"	jmp 1b\n"
	"	.p2align 2\n"
	"ap_count:\n"
	"	.word 0, 0\n"
	"ap_seen:\n"
	"	.space 32\n"
	"ap_trampoline_end:\n"
	"	.code64\n"
	"	.text\n");
extern const char ap_trampoline[], ap_count[], ap_seen[], ap_trampoline_end[];

struct madt_info {
	uint32_t lapic;
	unsigned cpus;
	uint8_t apic_ids[MAX_CPUS];
	unsigned ioapics;
	uint8_t ioapic_id;
	uint32_t ioapic_addr;
};

static int failed;

static void fail(const char *what)
{
	puts("FAIL: ");
	puts(what);
	putc('\n');
	failed = 1;
}

static uint8_t read8(uint64_t addr) { return *(const volatile uint8_t *)addr; }
static uint16_t read16(uint64_t addr) { return *(const volatile uint16_t *)addr; }
static uint32_t read32(uint64_t addr) { return *(const volatile uint32_t *)addr; }
static uint64_t read64(uint64_t addr) { return *(const volatile uint64_t *)addr; }

static uint8_t sum(uint64_t addr, uint32_t length)
{
	uint8_t total = 0;
	for (uint32_t i = 0; i < length; i++) total += read8(addr + i);
	return total;
}

static bool is(uint64_t addr, const char *signature, unsigned length)
{
	return memcmp((const void *)addr, signature, length) == 0;
}

static void put_signature(uint64_t addr)
{
	for (int i = 0; i < 4; i++) putc((char)read8(addr + i));
}

/* A system description table: its signature, a sane length, and a checksum summing to 0. */
static bool check_table(uint64_t addr, const char *signature)
{
	if (addr == 0 || addr >= 0x100000000UL) { fail("a table pointer is out of range"); return false; }
	if (signature && !is(addr, signature, 4)) { fail(signature); return false; }
	uint32_t length = read32(addr + 4);
	if (length < 36 || length > 0x10000) { fail("a table's length"); return false; }
	if (sum(addr, length) != 0) { put_signature(addr); fail(" checksum"); return false; }
	return true;
}

/* What the FADT and DSDT say about powering off: PM1a control's port and \_S5's SLP_TYPa. */
static uint32_t pm1a_control_port;
static int s5_sleep_type = -1;

/*
 * The DSDT defines \_S5: NameOp, the NameSeg "_S5_", then a package (PackageOp, a one-byte
 * PkgLength, NumElements) whose first element is SLP_TYPa: ZeroOp, OneOp or BytePrefix n.
 */
static bool dsdt_has_s5(uint64_t dsdt)
{
	uint32_t length = read32(dsdt + 4);
	for (uint32_t i = 36; i + 9 <= length; i++) {
		if (read8(dsdt + i) != 0x08 || !is(dsdt + i + 1, "_S5_", 4)) continue;
		uint64_t element = dsdt + i + 5 + 3;
		if (read8(dsdt + i + 5) != 0x12) return false;
		uint8_t op = read8(element);
		s5_sleep_type = op == 0x00 ? 0 : op == 0x01 ? 1 : op == 0x0a ? read8(element + 1) : -1;
		return s5_sleep_type >= 0;
	}
	return false;
}

/* The kernel command line hvm_start_info gave (cmdline_paddr at offset 24), or "". */
static bool cmdline_is(const char *expected)
{
	uint64_t cmdline = rt_start_info ? read64(rt_start_info + 24) : 0;
	size_t i = 0;
	if (cmdline == 0) return false;
	for (; expected[i]; i++)
		if (read8(cmdline + i) != (uint8_t)expected[i]) return false;
	return read8(cmdline + i) == 0;
}

static void walk_fadt(uint64_t fadt)
{
	uint64_t dsdt = read64(fadt + 140);
	if (dsdt == 0) dsdt = read32(fadt + 40);
	uint64_t facs = read32(fadt + 36);
	puts("acpi: fadt sci ");
	put_dec(read16(fadt + 46));
	puts(" pm1a_evt ");
	put_hex(read32(fadt + 56));
	puts(" pm1a_cnt ");
	pm1a_control_port = read32(fadt + 64);
	put_hex(pm1a_control_port);
	puts(" pm_tmr ");
	put_hex(read32(fadt + 76));
	if (check_table(dsdt, "DSDT") && dsdt_has_s5(dsdt)) puts(" _S5 ok");
	else fail("no _S5 in the DSDT");
	if (facs % 64 == 0 && is(facs, "FACS", 4) && read32(facs + 4) == 64) puts(" facs ok");
	else fail("the FACS");
	putc('\n');
}

static void walk_madt(uint64_t madt, struct madt_info *info)
{
	uint32_t length = read32(madt + 4);
	info->lapic = read32(madt + 36);
	for (uint64_t at = madt + 44; at < madt + length;) {
		uint8_t type = read8(at), size = read8(at + 1);
		if (size < 2 || at + size > madt + length) { fail("a MADT entry's length"); return; }
		if (type == 0 && (read32(at + 4) & 1) && info->cpus < MAX_CPUS) {
			info->apic_ids[info->cpus++] = read8(at + 3);
		} else if (type == 1) {
			info->ioapics++;
			info->ioapic_id = read8(at + 2);
			info->ioapic_addr = read32(at + 4);
		}
		at += size;
	}
	puts("madt: lapic ");
	put_hex(info->lapic);
	puts(" cpus ");
	put_dec(info->cpus);
	puts(" ioapic ");
	put_dec(info->ioapic_id);
	puts(" at ");
	put_hex(info->ioapic_addr);
	puts(" gsi base 0\n");
	for (uint64_t at = madt + 44; at < madt + length; at += read8(at + 1)) {
		if (read8(at) != 2) continue;
		puts("madt: override irq ");
		put_dec(read8(at + 3));
		puts(" gsi ");
		put_dec(read32(at + 4));
		puts(" flags ");
		put_hex(read16(at + 8));
		putc('\n');
	}
	if (info->ioapics != 1) fail("not one IOAPIC in the MADT");
}

static bool walk_acpi(struct madt_info *info)
{
	uint64_t rsdp = 0;
	for (uint64_t at = 0xe0000; at < 0x100000; at += 16) {
		if (is(at, "RSD PTR ", 8) && sum(at, 20) == 0) { rsdp = at; break; }
	}
	if (!rsdp) { fail("no RSDP in 0xe0000-0xfffff"); return false; }
	if (read8(rsdp + 15) < 2 || read32(rsdp + 20) != 36 || sum(rsdp, 36) != 0) { fail("the RSDP's revision, length or extended checksum"); return false; }
	uint64_t xsdt = read64(rsdp + 24), rsdt = read32(rsdp + 16);
	puts("acpi: rsdp ");
	put_hex(rsdp);
	puts(" xsdt ");
	put_hex(xsdt);
	puts(" rsdt ");
	put_hex(rsdt);
	/* The loader's hvm_start_info names the RSDP too (rsdp_paddr), as PVH kernels read it. */
	if (rt_start_info) {
		puts(" start_info ");
		put_hex(read64(rt_start_info + 32));
		if (read64(rt_start_info + 32) != rsdp) fail("hvm_start_info.rsdp_paddr is not the RSDP the scan found");
	}
	putc('\n');
	if (!check_table(xsdt, "XSDT") || !check_table(rsdt, "RSDT")) return false;
	uint32_t entries = (read32(xsdt + 4) - 36) / 8;
	if ((read32(rsdt + 4) - 36) / 4 != entries) fail("the RSDT and XSDT list different numbers of tables");
	uint64_t madt = 0, fadt = 0;
	puts("acpi:");
	for (uint32_t i = 0; i < entries; i++) {
		uint64_t table = read64(xsdt + 36 + 8 * i);
		if (read32(rsdt + 36 + 4 * i) != table) fail("the RSDT and XSDT differ");
		putc(' ');
		put_signature(table);
		if (!check_table(table, NULL)) return false;
		if (is(table, "APIC", 4)) madt = table;
		if (is(table, "FACP", 4)) fadt = table;
	}
	putc('\n');
	if (!fadt || !madt) { fail("no FADT or MADT"); return false; }
	walk_fadt(fadt);
	walk_madt(madt, info);
	return true;
}

static bool walk_mp(void)
{
	uint64_t fp = 0;
	for (uint64_t at = 0xf0000; at < 0x100000; at += 16) {
		if (is(at, "_MP_", 4) && read8(at + 8) == 1 && sum(at, 16) == 0) { fp = at; break; }
	}
	if (!fp) { fail("no MP floating pointer in 0xf0000-0xfffff"); return false; }
	uint64_t table = read32(fp + 4);
	if (read8(fp + 9) != 4 || read8(fp + 11) != 0) { fail("the floating pointer's revision or default configuration"); return false; }
	if (!is(table, "PCMP", 4)) { fail("no PCMP at the floating pointer's address"); return false; }
	uint16_t length = read16(table + 4);
	if (sum(table, length) != 0) { fail("the MP configuration table's checksum"); return false; }
	unsigned cpus = 0, bsp = 0xff, ioapic_id = 0, irqs = 0, entries = 0;
	uint32_t ioapic_addr = 0;
	uint64_t at = table + 44;
	while (at < table + length) {
		uint8_t type = read8(at);
		entries++;
		if (type == 0) {
			if (read8(at + 3) & 1) cpus++;
			if (read8(at + 3) & 2) bsp = read8(at + 1);
			at += 20;
		} else if (type <= 4) {
			if (type == 2) { ioapic_id = read8(at + 1); ioapic_addr = read32(at + 4); }
			if (type == 3) irqs++;
			at += 8;
		} else {
			fail("an MP entry of unknown type");
			return false;
		}
	}
	if (at != table + length || entries != read16(table + 34)) fail("the MP entries do not fill the table, or their count is wrong");
	puts("mp: fp ");
	put_hex(fp);
	puts(" table ");
	put_hex(table);
	puts(" cpus ");
	put_dec(cpus);
	puts(" bsp ");
	put_dec(bsp);
	puts(" ioapic ");
	put_dec(ioapic_id);
	puts(" at ");
	put_hex(ioapic_addr);
	puts(" irqs ");
	put_dec(irqs);
	putc('\n');
	return true;
}

static void lapic_write(uint32_t base, uint32_t reg, uint32_t value)
{
	mmio_write32(base + reg, value);
}

static void icr_send(uint32_t lapic, uint8_t apic_id, uint32_t command)
{
	lapic_write(lapic, LAPIC_ICR_HIGH, (uint32_t)apic_id << 24);
	lapic_write(lapic, LAPIC_ICR_LOW, command);
	for (unsigned long spins = 0; mmio_read32(lapic + LAPIC_ICR_LOW) & ICR_BUSY; spins++) {
		if (spins > 1000) { fail("the ICR stays busy"); return; }
		cpu_relax();
	}
}

/* INIT, STARTUP, STARTUP to every processor of the MADT but this one; counts who checked in. */
static unsigned start_aps(const struct madt_info *info)
{
	uint32_t lapic = info->lapic;
	size_t size = (size_t)(ap_trampoline_end - ap_trampoline);
	volatile uint16_t *count = (volatile uint16_t *)(TRAMPOLINE + (size_t)(ap_count - ap_trampoline));
	volatile uint8_t *seen = (volatile uint8_t *)(TRAMPOLINE + (size_t)(ap_seen - ap_trampoline));
	memcpy((void *)TRAMPOLINE, ap_trampoline, size);
	lapic_write(lapic, LAPIC_SVR, 0x1ff); /* software enable, spurious vector 0xff */
	uint8_t self = (uint8_t)(mmio_read32(lapic + LAPIC_ID) >> 24);
	unsigned aps = 0;
	for (unsigned i = 0; i < info->cpus; i++) {
		if (info->apic_ids[i] == self) continue;
		aps++;
		icr_send(lapic, info->apic_ids[i], ICR_INIT);
		icr_send(lapic, info->apic_ids[i], ICR_STARTUP);
		icr_send(lapic, info->apic_ids[i], ICR_STARTUP);
	}
	/* A second SIPI to an AP already running is ignored; a count may not exceed aps. */
	for (unsigned long spins = 0; *count < aps && spins < 2000 * RT_SPINS_PER_MS; spins++) cpu_relax();
	compiler_barrier();
	unsigned up = 1;
	for (unsigned i = 0; i < info->cpus; i++) {
		uint8_t id = info->apic_ids[i];
		if (id != self && (seen[id / 8] & (1 << (id % 8)))) up++;
	}
	if (*count != aps || up != aps + 1) fail("not every AP the MADT listed checked in, once");
	return up;
}

int main(void)
{
	static struct madt_info madt;
	if (!walk_acpi(&madt)) return FAILURE;
	if (!walk_mp()) return FAILURE;
	if (madt.cpus == 0 || madt.lapic == 0) return FAILURE;
	unsigned up = start_aps(&madt);
	puts("smp: ");
	put_dec(up);
	puts(" cpus up\n");
	if (!failed && cmdline_is("poweroff")) {
		puts("acpi: S5 sleep type ");
		put_dec((uint64_t)s5_sleep_type);
		puts(": powering off\n");
		/* PM1a_CNT's high byte: SLP_EN (bit 13) and SLP_TYP (bits 10-12). */
		outb((uint16_t)(pm1a_control_port + 1), (uint8_t)((s5_sleep_type << 2) | 0x20));
	}
	return failed ? FAILURE : SUCCESS;
}
