// The PC's addresses are named twice, below the VMM: in lib/boot for the firmware tables that
// describe them, and in lib/devices for the devices that answer there (neither floor may import
// the other). The VMM wires both into one machine, so they must agree.
import t from 'tap';
import { Platform } from '../../lib/boot/platform.js';
import { ACPI_PM_BASE, PM1A_CNT_PORT, PM1A_EVT_PORT, PM_TMR_PORT, SLP_TYP_S5 } from '../../lib/devices/acpi-pm.js';
import { PC_GSI_ROUTES } from '../../lib/vmm/builder.js';
import { DSDT_AML } from '../../lib/boot/acpi.js';

t.test('the ACPI PM device answers where the FADT says it is', async (t) => {
  t.equal(PM1A_EVT_PORT, Platform.pm1aEventPort);
  t.equal(PM1A_CNT_PORT, Platform.pm1aControlPort);
  t.equal(PM_TMR_PORT, Platform.pmTimerPort);
  t.equal(ACPI_PM_BASE, Platform.pm1aEventPort);
  // _S5's package: its first element (SLP_TYPa) follows PackageOp, PkgLength and NumElements.
  t.equal(DSDT_AML[8], 0x00, 'the DSDT\'s _S5 SLP_TYPa is ZeroOp');
  t.equal(SLP_TYP_S5, 0, 'and 0 is the sleep type that powers off');
});

t.test('GSIs are routed as the MADT and MP table say: the PIT on IOAPIC pin 2, every other ISA IRQ n on pin n', async (t) => {
  const ioapic = PC_GSI_ROUTES.filter((route) => route.type === 'irqchip' && route.irqchip === 2);
  const pins = new Map(ioapic.map((route) => [route.gsi, route.type === 'irqchip' ? route.pin : -1]));
  t.equal(pins.get(0), Platform.pitGsi);
  for (let gsi = 1; gsi < Platform.ioApicPins; gsi++) if (gsi !== Platform.pitGsi) t.equal(pins.get(gsi), gsi, `GSI ${gsi}`);
  t.equal(pins.has(Platform.pitGsi), false, 'GSI 2 (the cascade) goes nowhere');
  const pic = PC_GSI_ROUTES.filter((route) => route.type === 'irqchip' && route.irqchip !== 2);
  t.same(pic.map((route) => route.gsi), [0, 1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], 'ISA IRQs on the PICs, but the cascade');
});
