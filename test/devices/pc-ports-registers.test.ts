// The quiet PC ports' register logic, without a VM: the ELCR pair and PCI configuration
// mechanism #1 with no device behind it; and the structure check of the new devices' states.
import t from 'tap';
import { Elcr } from '../../lib/devices/elcr.js';
import { PciConfig } from '../../lib/devices/pci-config.js';
import { isDeviceStates } from '../../lib/vmm/devices.js';

t.test('ELCR: bytes read back as written, less the IRQs a PC keeps edge-triggered; state carried', async (t) => {
  const elcr = new Elcr(Elcr.createShared());
  t.equal(elcr.read(0, 2), 0, 'all edge at power-on');
  elcr.write(0, 1, 0xff);
  elcr.write(1, 1, 0xff);
  t.same([elcr.read(0, 1), elcr.read(1, 1)], [0xf8, 0xde], 'IRQ 0-2, 8 and 13 stay edge');
  elcr.write(0, 2, 0x0e20);
  t.equal(elcr.read(0, 2), 0x0e20, 'a word write sets both');
  t.same(elcr.saveState(), { registers: [0x20, 0x0e] });
  const restored = new Elcr(Elcr.createShared());
  restored.restoreState({ registers: [0x20, 0x0e] });
  t.equal(restored.read(0, 2), 0x0e20);
  t.equal(restored.read(1, 2), 0xff0e, 'past 0x4d1: nothing');
});

t.test('PCI configuration: CONFIG_ADDRESS keeps a dword, CONFIG_DATA says no device', async (t) => {
  const pci = new PciConfig(PciConfig.createShared());
  pci.addressPort.write(0, 4, 0x80000000);
  t.equal(pci.addressPort.read(0, 4), 0x80000000, 'read back as written');
  pci.addressPort.write(3, 1, 0x01);
  pci.addressPort.write(1, 1, 0x06);
  pci.addressPort.write(0, 2, 0x1234);
  t.equal(pci.addressPort.read(0, 4), 0x80000000, 'byte and word writes do not reach it');
  t.equal(pci.addressPort.read(3, 1), 0x80, 'its bytes');
  pci.addressPort.write(0, 4, 0x8000f808);
  t.same(pci.saveState(), { address: 0x8000f808 });
  t.same([pci.dataPort.read(0, 4), pci.dataPort.read(0, 2), pci.dataPort.read(2, 2), pci.dataPort.read(3, 1)], [0xffffffff, 0xffff, 0xffff, 0xff]);
  pci.dataPort.write(0, 4, 0);
  t.equal(pci.dataPort.read(0, 4), 0xffffffff, 'writes change nothing');
  const restored = new PciConfig(PciConfig.createShared());
  restored.restoreState({ address: 0x8000f808 });
  t.equal(restored.addressPort.read(0, 4), 0x8000f808);
});

t.test('device states from a stream: the new devices are optional, and checked when present', async (t) => {
  const base = { serial: { ier: 0 }, postCode: { lastCode: 0, writes: 0 } };
  t.ok(isDeviceStates(base), 'a state from a machine without them loads');
  t.ok(isDeviceStates({ ...base, acpiPm: { status: 0, enable: 0, control: 1, counter: 0x123456 }, elcr: { registers: [0x20, 0x0e] }, pciConfig: { address: 0x80000000 } }));
  t.notOk(isDeviceStates({ ...base, acpiPm: { status: 0, enable: 0, control: 1 } }), 'a PM state without its counter');
  t.notOk(isDeviceStates({ ...base, acpiPm: { status: 0, enable: 0, control: 1, counter: -1 } }));
  t.notOk(isDeviceStates({ ...base, elcr: { registers: 'x' } }));
  t.notOk(isDeviceStates({ ...base, pciConfig: {} }));
});
