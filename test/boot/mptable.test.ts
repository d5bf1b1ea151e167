// The MP tables, read back field by field against the Intel MultiProcessor Specification 1.4:
// the floating pointer (4.1), the configuration table header (4.2.1) and every entry (4.3),
// checksums summing to 0, entry counts for 1, 2 and 4 vCPUs.
import t from 'tap';
import { byteSum } from '../../lib/boot/acpi.js';
import { MP_TABLE_ADDR } from '../../lib/boot/layout.js';
import { buildMpTable, mpEntryCount, mpTableBytes, type MpTable } from '../../lib/boot/mptable.js';

function reader(table: MpTable) {
  const view = new DataView(table.data.buffer, table.data.byteOffset, table.data.byteLength);
  const o = (addr: number) => addr - table.guestPhysAddr;
  return {
    u8: (addr: number) => view.getUint8(o(addr)),
    u16: (addr: number) => view.getUint16(o(addr), true),
    u32: (addr: number) => view.getUint32(o(addr), true),
    ascii: (addr: number, length: number) => String.fromCharCode(...table.data.subarray(o(addr), o(addr) + length)),
    bytes: (addr: number, length: number) => [...table.data.subarray(o(addr), o(addr) + length)],
  };
}

const ENTRY_BYTES: Record<number, number> = { 0: 20, 1: 8, 2: 8, 3: 8, 4: 8 };

t.test('floating pointer: "_MP_", one paragraph, revision 1.4, checksum, the config table after it', async (t) => {
  const table = buildMpTable({ vcpus: 1, irqchip: true }, MP_TABLE_ADDR);
  const r = reader(table);
  const fp = table.floatingPointer;
  t.equal(fp, 0xf0000, 'in the BIOS ROM area the scan covers');
  t.equal(fp % 16, 0, '16-byte aligned');
  t.equal(r.ascii(fp, 4), '_MP_');
  t.equal(r.u32(fp + 4), table.configTable, 'PHYSICAL ADDRESS POINTER');
  t.equal(table.configTable, 0xf0010);
  t.equal(r.u8(fp + 8), 1, 'LENGTH in 16-byte paragraphs');
  t.equal(r.u8(fp + 9), 4, 'SPEC_REV 1.4');
  t.equal(byteSum(new Uint8Array(r.bytes(fp, 16))), 0, 'CHECKSUM: the 16 bytes sum to 0');
  t.same(r.bytes(fp + 11, 5), [0, 0, 0, 0, 0], 'MP FEATURE INFORMATION: a configuration table is present; no IMCR (virtual wire)');
});

for (const vcpus of [1, 2, 4]) {
  t.test(`configuration table with ${vcpus} vCPU${vcpus > 1 ? 's' : ''}`, async (t) => {
    const table = buildMpTable({ vcpus, irqchip: true }, MP_TABLE_ADDR);
    const r = reader(table);
    const c = table.configTable;
    const length = r.u16(c + 4);
    t.equal(r.ascii(c, 4), 'PCMP');
    t.equal(length, 44 + 20 * vcpus + 8 * (1 + 1 + 15 + 2), 'BASE TABLE LENGTH');
    t.equal(table.data.length, 16 + length);
    t.equal(mpTableBytes(vcpus), 16 + length);
    t.equal(r.u8(c + 6), 4, 'SPEC_REV');
    t.equal(byteSum(new Uint8Array(r.bytes(c, length))), 0, 'CHECKSUM: the base table sums to 0');
    t.equal(r.ascii(c + 8, 8), 'NODKVM  ', 'OEM ID');
    t.equal(r.ascii(c + 16, 12), 'PC          ', 'PRODUCT ID');
    t.equal(r.u32(c + 28), 0, 'no OEM table');
    t.equal(r.u16(c + 32), 0, 'OEM table size');
    t.equal(r.u16(c + 34), vcpus + 19, 'ENTRY COUNT');
    t.equal(mpEntryCount(vcpus), vcpus + 19);
    t.equal(r.u32(c + 36), 0xfee00000, 'ADDRESS OF LOCAL APIC');
    t.same(r.bytes(c + 40, 4), [0, 0, 0, 0], 'no extended table');

    const entries: number[][] = [];
    for (let at = c + 44; at < c + length; at += ENTRY_BYTES[r.u8(at)]!) entries.push(r.bytes(at, ENTRY_BYTES[r.u8(at)]!));
    t.equal(entries.length, vcpus + 19, 'the entries fill the table exactly');
    const ioApicId = vcpus;
    for (let id = 0; id < vcpus; id++) {
      t.same(entries[id], [0, id, 0x14, id === 0 ? 3 : 1, 0x00, 0x06, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        `processor ${id}: APIC ID ${id}, version 0x14, enabled${id === 0 ? ', the BSP' : ''}, signature 0x600, features FPU and APIC`);
    }
    t.same(entries[vcpus], [1, 0, ...Buffer.from('ISA   ')], 'bus 0: ISA');
    t.same(entries[vcpus + 1], [2, ioApicId, 0x11, 1, 0x00, 0x00, 0xc0, 0xfe], `IOAPIC: ID ${ioApicId}, version 0x11, usable, at 0xfec00000`);
    const irqs = [0, 1, ...Array.from({ length: 13 }, (_, i) => i + 3)];
    irqs.forEach((irq, i) => {
      const pin = irq === 0 ? 2 : irq;
      const flags = irq === 9 ? 0x0d : 0;
      t.same(entries[vcpus + 2 + i], [3, 0, flags, 0, 0, irq, ioApicId, pin], `ISA IRQ ${irq} -> IOAPIC pin ${pin}${irq === 9 ? ', level, active high' : ''}`);
    });
    t.same(entries[vcpus + 17], [4, 3, 0, 0, 0, 0, 0, 0], 'ExtINT on LINT0 of the BSP');
    t.same(entries[vcpus + 18], [4, 1, 0, 0, 0, 0, 0xff, 1], 'NMI on LINT1 of every processor');
  });
}

t.test('no table without an irqchip; bad bases are refused', async (t) => {
  t.throws(() => buildMpTable({ vcpus: 1, irqchip: false }, MP_TABLE_ADDR), RangeError);
  t.throws(() => buildMpTable({ vcpus: 1, irqchip: true }, MP_TABLE_ADDR + 8), RangeError);
  t.ok(mpTableBytes(255) <= 0x10000 - 0x400, 'with 255 vCPUs it still fits the BIOS area');
});
