// The pc-tables guest (guests/pc-tables.c) on machines with the in-kernel irqchip and 1, 2 and 4
// vCPUs: it finds the RSDP by the BIOS-area scan, walks RSDP -> XSDT -> MADT (every checksum
// checked), finds the MP floating pointer and walks the configuration table, then starts every
// processor the MADT lists with INIT-SIPI-SIPI through the local APIC address the MADT gave,
// and each of them checks in.
import path from 'node:path';
import t from 'tap';
import { noKvm, repoRoot } from '../helpers/kvm.js';
import { runToExit } from '../helpers/machine.js';
import { sharedPool } from '../helpers/pool.js';

const MiB = 1 << 20;
const image = path.join(repoRoot, 'guests', 'build', 'pc-tables.elf');
const SUCCESS = 0x10;
const pool = noKvm ? undefined : sharedPool(4);

for (const vcpus of [1, 2, 4]) {
  t.test(`${vcpus} vCPU${vcpus > 1 ? 's' : ''}: the ACPI and MP tables list exactly them, and all come up`, { skip: noKvm }, async (t) => {
    const logs: string[] = [];
    const { exit, output } = await runToExit({ image, memoryBytes: 16 * MiB, vcpus, irqchip: true, pool }, logs);
    t.same(exit, { reason: 'debug-exit', code: SUCCESS, vcpu: 0 }, output);
    t.equal(output, [
      'acpi: rsdp 0xe0000 xsdt 0xe0030 rsdt 0xe0070 start_info 0xe0000',
      'acpi: FACP APIC',
      'acpi: fadt sci 9 pm1a_evt 0x600 pm1a_cnt 0x604 pm_tmr 0x608 _S5 ok facs ok',
      `madt: lapic 0xfee00000 cpus ${vcpus} ioapic ${vcpus} at 0xfec00000 gsi base 0`,
      'madt: override irq 0 gsi 2 flags 0x0',
      'madt: override irq 9 gsi 9 flags 0xd',
      `mp: fp 0xf0000 table 0xf0010 cpus ${vcpus} bsp 0 ioapic ${vcpus} at 0xfec00000 irqs 15`,
      `smp: ${vcpus} cpus up`,
      '',
    ].join('\n'));
    t.same(logs, [], 'nothing the VMM did not know');
  });
}

t.test('powering off as an ACPI kernel does: SLP_EN with \\_S5\'s sleep type to the FADT\'s PM1a control block', { skip: noKvm }, async (t) => {
  const { exit, output } = await runToExit({ image, memoryBytes: 16 * MiB, vcpus: 2, cmdline: 'poweroff', pool });
  t.same({ reason: exit.reason, vcpu: exit.vcpu }, { reason: 'poweroff', vcpu: 0 }, output);
  t.match(output, /^smp: 2 cpus up\nacpi: S5 sleep type 0: powering off\n$/m);
});

t.test('without the in-kernel irqchip there are no tables to find', { skip: noKvm }, async (t) => {
  const { exit, output } = await runToExit({ image, memoryBytes: 16 * MiB, vcpus: 1, irqchip: false, pool });
  t.same(exit, { reason: 'debug-exit', code: 0x11, vcpu: 0 }, output);
  t.equal(output, 'FAIL: no RSDP in 0xe0000-0xfffff\n');
});
