// The ACPI tables, read back field by field against ACPI 6.3 (chapter 5.2): the RSDP and its two
// checksums, the XSDT/RSDT lists, the FADT's PM blocks and pointers, the FACS, the DSDT's AML,
// the MADT's entries for 1, 2 and 4 vCPUs. And where a boot plan puts them.
import t from 'tap';
import { planBoot, type BootPlan } from '../../lib/boot/index.js';
import { ACPI_TABLES_ADDR, MP_TABLE_ADDR } from '../../lib/boot/layout.js';
import { DSDT_AML, FADT_BYTES, acpiTablesBytes, buildAcpiTables, byteSum, type AcpiTables } from '../../lib/boot/acpi.js';
import { BOOT_PROTOCOL_ACPI_RSDP } from '../../lib/boot/bzimage.js';
import { elfGuest } from '../helpers/boot-runner.js';
import { guestImage } from '../helpers/kvm.js';

const MiB = 1 << 20;

/** Reads the tables as a guest would: by guest-physical address. */
function reader(tables: AcpiTables) {
  const view = new DataView(tables.data.buffer, tables.data.byteOffset, tables.data.byteLength);
  const o = (addr: number) => addr - tables.guestPhysAddr;
  return {
    u8: (addr: number) => view.getUint8(o(addr)),
    u16: (addr: number) => view.getUint16(o(addr), true),
    u32: (addr: number) => view.getUint32(o(addr), true),
    u64: (addr: number) => view.getBigUint64(o(addr), true),
    ascii: (addr: number, length: number) => String.fromCharCode(...tables.data.subarray(o(addr), o(addr) + length)),
    bytes: (addr: number, length: number) => tables.data.subarray(o(addr), o(addr) + length),
  };
}

function checkHeader(t: Tap.Test, tables: AcpiTables, addr: number, signature: string, length: number, revision: number): void {
  const r = reader(tables);
  t.equal(r.ascii(addr, 4), signature, `${signature}: signature`);
  t.equal(r.u32(addr + 4), length, `${signature}: length`);
  t.equal(r.u8(addr + 8), revision, `${signature}: revision`);
  t.equal(byteSum(r.bytes(addr, length)), 0, `${signature}: the checksum makes the table sum to 0`);
  t.equal(r.ascii(addr + 10, 6), 'NODKVM', `${signature}: OEM ID`);
  t.equal(r.ascii(addr + 16, 8), 'NODKVMPC', `${signature}: OEM table ID`);
  t.equal(r.ascii(addr + 28, 4), 'NKVM', `${signature}: creator ID`);
}

t.test('RSDP: revision 2, both checksums, the RSDT and the XSDT', async (t) => {
  const tables = buildAcpiTables({ vcpus: 1, irqchip: true }, ACPI_TABLES_ADDR);
  const r = reader(tables);
  t.equal(tables.rsdp, 0xe0000, 'first, at the start of the BIOS area');
  t.equal(tables.rsdp % 16, 0, 'on a 16-byte boundary, as the scan looks');
  t.equal(r.ascii(tables.rsdp, 8), 'RSD PTR ');
  t.equal(byteSum(r.bytes(tables.rsdp, 20)), 0, 'the ACPI 1.0 checksum covers the first 20 bytes');
  t.equal(byteSum(r.bytes(tables.rsdp, 36)), 0, 'the extended checksum covers all 36');
  t.equal(r.ascii(tables.rsdp + 9, 6), 'NODKVM');
  t.equal(r.u8(tables.rsdp + 15), 2, 'revision 2: ACPI 2.0 and later');
  t.equal(r.u32(tables.rsdp + 16), tables.rsdt);
  t.equal(r.u32(tables.rsdp + 20), 36, 'length');
  t.equal(r.u64(tables.rsdp + 24), BigInt(tables.xsdt));
  t.same([...r.bytes(tables.rsdp + 33, 3)], [0, 0, 0], 'reserved');
});

t.test('XSDT and RSDT list the FADT and the MADT', async (t) => {
  const tables = buildAcpiTables({ vcpus: 2, irqchip: true }, ACPI_TABLES_ADDR);
  const r = reader(tables);
  checkHeader(t, tables, tables.xsdt, 'XSDT', 36 + 16, 1);
  checkHeader(t, tables, tables.rsdt, 'RSDT', 36 + 8, 1);
  t.same([r.u64(tables.xsdt + 36), r.u64(tables.xsdt + 44)], [BigInt(tables.fadt), BigInt(tables.madt)]);
  t.same([r.u32(tables.rsdt + 36), r.u32(tables.rsdt + 40)], [tables.fadt, tables.madt]);
});

t.test('FADT: revision 6, the PIIX4 PM blocks at 0x600, SCI 9, no SMI_CMD, FACS and DSDT', async (t) => {
  const tables = buildAcpiTables({ vcpus: 1, irqchip: true }, ACPI_TABLES_ADDR);
  const r = reader(tables);
  const f = tables.fadt;
  checkHeader(t, tables, f, 'FACP', 276, 6);
  t.equal(FADT_BYTES, 276);
  t.equal(r.u32(f + 36), tables.facs, 'FIRMWARE_CTRL');
  t.equal(r.u32(f + 40), tables.dsdt, 'DSDT');
  t.equal(r.u16(f + 46), 9, 'SCI_INT');
  t.equal(r.u32(f + 48), 0, 'SMI_CMD: none, ACPI mode is always on');
  t.same([r.u8(f + 52), r.u8(f + 53)], [0, 0], 'ACPI_ENABLE, ACPI_DISABLE');
  t.equal(r.u32(f + 56), 0x600, 'PM1a_EVT_BLK');
  t.equal(r.u32(f + 60), 0, 'PM1b_EVT_BLK');
  t.equal(r.u32(f + 64), 0x604, 'PM1a_CNT_BLK');
  t.equal(r.u32(f + 68), 0, 'PM1b_CNT_BLK');
  t.equal(r.u32(f + 72), 0, 'PM2_CNT_BLK');
  t.equal(r.u32(f + 76), 0x608, 'PM_TMR_BLK');
  t.equal(r.u32(f + 80), 0, 'GPE0_BLK');
  t.same([r.u8(f + 88), r.u8(f + 89), r.u8(f + 90), r.u8(f + 91), r.u8(f + 92)], [4, 2, 0, 4, 0], 'PM1_EVT_LEN, PM1_CNT_LEN, PM2_CNT_LEN, PM_TMR_LEN, GPE0_BLK_LEN');
  t.same([r.u16(f + 96), r.u16(f + 98)], [0x0fff, 0x0fff], 'no C2, no C3');
  t.equal(r.u8(f + 108), 0x32, 'CENTURY: the RTC\'s CMOS register 0x32');
  t.equal(r.u16(f + 109), 0x3, 'IAPC_BOOT_ARCH: LEGACY_DEVICES, 8042');
  const flags = r.u32(f + 112);
  t.equal(flags, 0x25, 'Flags: WBINVD, PROC_C1, SLP_BUTTON');
  t.equal(flags & (1 << 8), 0, 'TMR_VAL_EXT clear: a 24-bit PM timer');
  t.equal(flags & (1 << 10), 0, 'no RESET_REG_SUP');
  t.equal(flags & (1 << 20), 0, 'not HW_REDUCED_ACPI');
  t.same([...r.bytes(f + 116, 13)], new Array(13).fill(0), 'RESET_REG and RESET_VALUE empty');
  t.equal(r.u8(f + 131), 3, 'FADT minor version');
  t.equal(r.u64(f + 132), 0n, 'X_FIRMWARE_CTRL zero, as FIRMWARE_CTRL is not');
  t.equal(r.u64(f + 140), BigInt(tables.dsdt), 'X_DSDT');
  const gas = (at: number) => ({ space: r.u8(at), bitWidth: r.u8(at + 1), bitOffset: r.u8(at + 2), access: r.u8(at + 3), address: r.u64(at + 4) });
  t.same(gas(f + 148), { space: 1, bitWidth: 32, bitOffset: 0, access: 2, address: 0x600n }, 'X_PM1a_EVT_BLK');
  t.same(gas(f + 160), { space: 0, bitWidth: 0, bitOffset: 0, access: 0, address: 0n }, 'X_PM1b_EVT_BLK');
  t.same(gas(f + 172), { space: 1, bitWidth: 16, bitOffset: 0, access: 2, address: 0x604n }, 'X_PM1a_CNT_BLK');
  t.same(gas(f + 208), { space: 1, bitWidth: 32, bitOffset: 0, access: 3, address: 0x608n }, 'X_PM_TMR_BLK');
  t.same([...r.bytes(f + 220, 56)], new Array(56).fill(0), 'no GPE blocks, sleep registers or hypervisor vendor');
});

t.test('FACS: 64 bytes, 64-byte aligned, version 2', async (t) => {
  const tables = buildAcpiTables({ vcpus: 1, irqchip: true }, ACPI_TABLES_ADDR);
  const r = reader(tables);
  t.equal(tables.facs % 64, 0);
  t.equal(r.ascii(tables.facs, 4), 'FACS');
  t.equal(r.u32(tables.facs + 4), 64);
  t.equal(r.u32(tables.facs + 8), 0, 'hardware signature');
  t.equal(r.u32(tables.facs + 12), 0, 'no waking vector');
  t.equal(r.u8(tables.facs + 32), 2, 'version');
});

t.test('DSDT: Name (_S5, Package () { 0, 0, 0, 0 }) in AML', async (t) => {
  const tables = buildAcpiTables({ vcpus: 1, irqchip: true }, ACPI_TABLES_ADDR);
  const r = reader(tables);
  checkHeader(t, tables, tables.dsdt, 'DSDT', 36 + 12, 2);
  t.same([...r.bytes(tables.dsdt + 36, 12)], [
    0x08, 0x5f, 0x53, 0x35, 0x5f, // NameOp '_S5_'
    0x12, 0x06, 0x04, // PackageOp, PkgLength 6, NumElements 4
    0x00, 0x00, 0x00, 0x00, // ZeroOp x4
  ]);
  t.same([...DSDT_AML], [...r.bytes(tables.dsdt + 36, 12)]);
});

for (const vcpus of [1, 2, 4]) {
  t.test(`MADT with ${vcpus} vCPU${vcpus > 1 ? 's' : ''}: a local APIC each, the IOAPIC, two overrides, LINT1 NMI`, async (t) => {
    const tables = buildAcpiTables({ vcpus, irqchip: true }, ACPI_TABLES_ADDR);
    const r = reader(tables);
    const m = tables.madt;
    const length = 44 + 8 * vcpus + 12 + 10 + 10 + 6;
    checkHeader(t, tables, m, 'APIC', length, 5);
    t.equal(r.u32(m + 36), 0xfee00000, 'local APIC address');
    t.equal(r.u32(m + 40), 1, 'PCAT_COMPAT');
    const entries: number[][] = [];
    for (let at = m + 44; at < m + length; at += r.u8(at + 1)) entries.push([...r.bytes(at, r.u8(at + 1))]);
    t.equal(entries.length, vcpus + 4, 'entries');
    for (let id = 0; id < vcpus; id++) t.same(entries[id], [0, 8, id, id, 1, 0, 0, 0], `processor local APIC ${id}: UID and APIC ID ${id}, enabled`);
    t.same(entries[vcpus], [1, 12, vcpus, 0, 0x00, 0x00, 0xc0, 0xfe, 0, 0, 0, 0], `IOAPIC: ID ${vcpus}, at 0xfec00000, GSI base 0`);
    t.same(entries[vcpus + 1], [2, 10, 0, 0, 2, 0, 0, 0, 0, 0], 'ISA IRQ 0 -> GSI 2, conforming');
    t.same(entries[vcpus + 2], [2, 10, 0, 9, 9, 0, 0, 0, 0x0d, 0], 'ISA IRQ 9 -> GSI 9, active high, level-triggered');
    t.same(entries[vcpus + 3], [4, 6, 0xff, 0, 0, 1], 'local APIC NMI: every processor, LINT1');
  });
}

t.test('the tables lie one after another, each aligned, and their size follows the vCPU count', async (t) => {
  const tables = buildAcpiTables({ vcpus: 4, irqchip: true }, ACPI_TABLES_ADDR);
  const order = [tables.rsdp, tables.xsdt, tables.rsdt, tables.fadt, tables.facs, tables.dsdt, tables.madt];
  t.same([...order].sort((a, b) => a - b), order);
  t.ok(order.every((addr) => addr % 16 === 0));
  t.equal(tables.data.length, acpiTablesBytes(4));
  t.equal(acpiTablesBytes(5) - acpiTablesBytes(4), 8, 'one more local APIC entry');
  t.ok(acpiTablesBytes(255) < MP_TABLE_ADDR - ACPI_TABLES_ADDR, 'even with 255 vCPUs they end before the MP tables');
});

t.test('no tables without an irqchip, and bad platforms or bases are refused', async (t) => {
  t.throws(() => buildAcpiTables({ vcpus: 1, irqchip: false }, ACPI_TABLES_ADDR), RangeError);
  t.throws(() => buildAcpiTables({ vcpus: 0, irqchip: true }, ACPI_TABLES_ADDR), RangeError);
  t.throws(() => buildAcpiTables({ vcpus: 256, irqchip: true }, ACPI_TABLES_ADDR), RangeError);
  t.throws(() => buildAcpiTables({ vcpus: 1, irqchip: true }, 0xe0008), RangeError);
});

/** The plan's write named `what`. */
const writeOf = (plan: BootPlan, what: string) => plan.writes.find((w) => w.what === what) as { guestPhysAddr: number; data: Uint8Array } | undefined;

t.test('a boot plan with the irqchip writes the tables in the BIOS area, for every format', async (t) => {
  const plans: [string, BootPlan][] = [
    ['flat', planBoot(guestImage('hello'), { memoryBytes: 2 * MiB, vcpus: 2, irqchip: true })],
    ['elf32', planBoot(elfGuest('protected'), { memoryBytes: 4 * MiB, vcpus: 2, irqchip: true })],
    ['elf64', planBoot(elfGuest('long'), { memoryBytes: 4 * MiB, vcpus: 2, irqchip: true })],
    ['multiboot', planBoot(elfGuest('multiboot'), { memoryBytes: 4 * MiB, vcpus: 2, irqchip: true })],
    ['pvh', planBoot(elfGuest('pvh'), { memoryBytes: 4 * MiB, vcpus: 2, irqchip: true })],
    ['bzimage', planBoot(guestImage('bzimage'), { memoryBytes: 64 * MiB, vcpus: 2, irqchip: true })],
  ];
  const expected = buildAcpiTables({ vcpus: 2, irqchip: true }, ACPI_TABLES_ADDR);
  for (const [format, plan] of plans) {
    t.equal(plan.format, format);
    const acpi = writeOf(plan, 'ACPI tables');
    t.equal(acpi?.guestPhysAddr, ACPI_TABLES_ADDR, `${format}: ACPI tables at 0xe0000`);
    t.same(acpi?.data, expected.data, `${format}: the tables of this machine`);
    t.equal(writeOf(plan, 'MP tables')?.guestPhysAddr, MP_TABLE_ADDR, `${format}: MP tables at 0xf0000`);
  }
  const without = planBoot(elfGuest('pvh'), { memoryBytes: 4 * MiB, vcpus: 2 });
  t.equal(writeOf(without, 'ACPI tables'), undefined, 'none without the irqchip');
  t.equal(writeOf(without, 'MP tables'), undefined);
  t.throws(() => planBoot(elfGuest('pvh'), { memoryBytes: 4 * MiB, vcpus: 1, irqchip: 1 as unknown as boolean }), TypeError);
});

t.test('PVH: hvm_start_info.rsdp_paddr points at the RSDP', async (t) => {
  const plan = planBoot(elfGuest('pvh'), { memoryBytes: 4 * MiB, vcpus: 1, irqchip: true });
  const info = writeOf(plan, 'boot info')!;
  const view = new DataView(info.data.buffer, info.data.byteOffset);
  const at = Number(plan.bsp.regs.rbx) - info.guestPhysAddr;
  t.equal(view.getBigUint64(at + 32, true), BigInt(ACPI_TABLES_ADDR));
  const plain = planBoot(elfGuest('pvh'), { memoryBytes: 4 * MiB, vcpus: 1 });
  const plainInfo = writeOf(plain, 'boot info')!;
  t.equal(new DataView(plainInfo.data.buffer).getBigUint64(Number(plain.bsp.regs.rbx) - plainInfo.guestPhysAddr + 32, true), 0n, 'no RSDP without the tables');
});

t.test('bzImage: boot_params.acpi_rsdp_addr (0x070) points at the RSDP from protocol 2.14', async (t) => {
  const image = guestImage('bzimage');
  const version = new DataView(image.buffer, image.byteOffset).getUint16(0x206, true);
  const plan = planBoot(image, { memoryBytes: 64 * MiB, vcpus: 1, irqchip: true });
  const zeroPage = writeOf(plan, 'zero page')!;
  const rsdp = new DataView(zeroPage.data.buffer, zeroPage.data.byteOffset).getBigUint64(0x070, true);
  t.ok(version >= BOOT_PROTOCOL_ACPI_RSDP, 'the guest speaks protocol 2.14 or later');
  t.equal(rsdp, BigInt(ACPI_TABLES_ADDR));
});

t.test('an image loaded over the BIOS area collides with the tables', async (t) => {
  t.throws(() => planBoot(new Uint8Array(16), { memoryBytes: 2 * MiB, vcpus: 1, irqchip: true, mode: 'protected', loadAddr: 0xe0010 }),
    { name: 'BootImageError', message: /overlaps the ACPI tables|the ACPI tables .* overlaps/ });
  t.doesNotThrow(() => planBoot(new Uint8Array(16), { memoryBytes: 2 * MiB, vcpus: 1, mode: 'protected', loadAddr: 0xe0010 }), 'without the irqchip there are no tables');
  const small = planBoot(guestImage('hello'), { memoryBytes: 512 * 1024, vcpus: 1, irqchip: true });
  t.equal(writeOf(small, 'ACPI tables'), undefined, 'RAM below 1 MiB does not reach the BIOS area: no tables');
});
