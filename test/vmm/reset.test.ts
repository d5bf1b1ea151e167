// Machine.reset(): the guest reboots from its image with its devices as at power-on. The rng
// guest holds (a flag the host wrote into its RAM) after its run; a reboot clears RAM, so the
// second run goes through without holding, setting up the virtio device again from reset.
import t from 'tap';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { GUEST_PARAMS_ADDR, Machine } from '../../lib/index.js';
import { noKvm, repoRoot } from '../helpers/kvm.js';
import { boot } from '../helpers/machine.js';
import { sharedPool } from '../helpers/pool.js';

const image = path.join(repoRoot, 'guests', 'build', 'rng.elf');
const pool = noKvm ? undefined : sharedPool(2);

t.test('a reboot runs the guest again from its image, RAM cleared and virtio devices reset', { skip: noKvm }, async (t) => {
  const booted = await boot({ image, memoryBytes: 16 << 20, rng: true, pool });
  const { machine } = booted;
  t.teardown(() => void machine.stop());
  machine.writeMemory(GUEST_PARAMS_ADDR, new Uint8Array([1, 0, 0, 0]));
  machine.start();
  await booted.waitForOutput('rng: holding\n');
  const firstRun = booted.output();
  await machine.reset();
  t.equal(machine.state, 'running');
  const exit = await machine.wait();
  t.match(exit, { reason: 'debug-exit', code: 0x10 }, booted.output());
  const secondRun = booted.output().slice(firstRun.length);
  t.match(secondRun, /^rng: slot 0\nrng: [0-9a-f]{32}\nrng: [0-9a-f]{32}\nrng: filled 4096 4096\nrng: hostile: needs-reset\nrng: recovered [0-9a-f]{32}\n$/,
    'the whole run again, not holding: the flag went with the rest of RAM');
  t.not(secondRun.split('\n')[1], firstRun.split('\n')[1], 'fresh random bytes');
});

t.test('only a machine booted from an image reboots; reset() refuses before start and after the end', { skip: noKvm }, async (t) => {
  const dir = mkdtempSync(path.join(tmpdir(), 'node-kvm-reset-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const booted = await boot({ image, memoryBytes: 16 << 20, rng: true, pool });
  await t.rejects(booted.machine.reset(), { code: 'ERR_MACHINE_STATE', message: /machine is created, not running/ });
  const file = path.join(dir, 'rng.snap');
  await booted.machine.snapshot(file);
  await booted.machine.stop();
  await t.rejects(booted.machine.reset(), { code: 'ERR_MACHINE_STATE' });
  const restored = await Machine.restore(file, { pool, log: () => {} });
  t.teardown(() => void restored.stop());
  restored.start();
  await t.rejects(restored.reset(), { code: 'ERR_MACHINE_STATE', message: 'this machine was restored or received: it has no image to boot again' });
});
