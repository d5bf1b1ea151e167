// The ports a PC kernel probes on every boot answer as on a PC, with no log line: the ELCR pair
// (0x4d0/0x4d1), PCI configuration mechanism #1 (0xcf8, 0xcfc: "no device"), the POST code port
// 0x80 at every width, and the ACPI PM block (guests/pc-ports.c, mode 4), with and without the
// in-kernel irqchip (whose PIC answers the ELCR ports itself).
import path from 'node:path';
import t from 'tap';
import { GUEST_PARAMS_ADDR } from '../../lib/boot/index.js';
import { noKvm, repoRoot } from '../helpers/kvm.js';
import { boot } from '../helpers/machine.js';
import { sharedPool } from '../helpers/pool.js';

const image = path.join(repoRoot, 'guests', 'build', 'pc-ports.elf');
const pool = noKvm ? undefined : sharedPool();
const PROBE = 4;

for (const irqchip of [false, true]) {
  t.test(`the probe of a PC's ports reads what a PC answers, logs nothing (irqchip: ${irqchip})`, { skip: noKvm }, async (t) => {
    const logs: string[] = [];
    const booted = await boot({ image, memoryBytes: 8 << 20, pool, irqchip }, logs);
    t.teardown(() => booted.machine.stop());
    booted.machine.writeMemory(GUEST_PARAMS_ADDR, Uint8Array.of(PROBE, 0, 0, 0));
    booted.machine.start();
    const exit = await booted.machine.wait();
    await new Promise((resolve) => setImmediate(resolve));
    t.same({ reason: exit.reason, code: exit.code }, { reason: 'debug-exit', code: 0 });
    t.equal(booted.output(), [
      'elcr 0xf8 0xde 0x20 0xe', // IRQ 0-2, 8 and 13 stay edge-triggered
      'cf8 0x80000000 0x80000000', // a dword reads back; a byte to 0xcfb does not reach it
      'cfc 0xffffffff 0xffff 0xff', // no device
      'post 0x78', // the last code: the low byte of the dword write
      '',
    ].join('\n'));
    t.same(booted.machine.unknownAccesses, { ports: 0, mmio: 0 }, 'no unknown port accessed');
    t.same(logs, [], 'nothing logged: no unknown-port line, no summary at the end');
  });
}
