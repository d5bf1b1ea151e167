// SMP through the VMM: one thread per vCPU, the in-kernel irqchip, and the guest's BSP waking
// the APs with INIT-SIPI-SIPI. Every CPU prints its APIC id.
import { readFileSync } from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { noKvm, repoRoot } from '../helpers/kvm.js';
import { runToExit } from '../helpers/machine.js';

const smp = () => readFileSync(path.join(repoRoot, 'guests', 'build', 'smp.elf'));

for (const vcpus of [1, 2, 4]) {
  t.test(`${vcpus} vCPU${vcpus > 1 ? 's' : ''} come up and each prints its APIC id`, { skip: noKvm }, async (t) => {
    const { exit, output } = await runToExit({ image: smp(), vcpus, memoryBytes: 16 << 20, irqchip: true });
    t.same({ reason: exit.reason, code: exit.code }, { reason: 'debug-exit', code: 0x20 }, output);
    const lines = output.trim().split('\n');
    t.equal(lines.at(-1), `all ${vcpus} cpus up`);
    const cpus = lines.slice(0, -1);
    t.equal(cpus[0], 'cpu 0', 'the BSP checks in first');
    t.same([...cpus].sort(), Array.from({ length: vcpus }, (_, id) => `cpu ${id}`).sort());
  });
}
