// The `fwcfg` guest (guests/fwcfg.c) reads fw_cfg the way a kernel written for QEMU does, on the
// real /dev/kvm: signature and ID through the ports, CPU counts, RAM size, the file directory,
// etc/e820 and the command line through DMA, hostile DMA from inside. Then a guest in the middle of
// reading its command line is snapshotted (and migrated) to a machine built without one, and
// reads on where it was.
import t from 'tap';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { GUEST_PARAMS_ADDR, Machine, memoryMap } from '../../lib/index.js';
import { noKvm, repoRoot } from '../helpers/kvm.js';
import { boot, runToExit } from '../helpers/machine.js';
import { sharedPool } from '../helpers/pool.js';
import { serialCollector } from '../helpers/serial-collector.js';

const MiB = 1 << 20;
const image = path.join(repoRoot, 'guests', 'build', 'fwcfg.elf');
const SUCCESS = 0x10;
const Mode = { Enumerate: 0, HalfRead: 1 } as const;
const pool = noKvm ? undefined : sharedPool(2);

const hex = (value: bigint | number) => `0x${value.toString(16)}`;

function params(mode: number, go = 0): Uint8Array {
  const view = new DataView(new ArrayBuffer(8));
  view.setUint32(0, mode, true);
  view.setUint32(4, go, true);
  return new Uint8Array(view.buffer);
}


t.test('a guest enumerates fw_cfg and finds the machine it runs on', { skip: noKvm }, async (t) => {
  const memoryBytes = 48 * MiB;
  const cmdline = 'console=ttyS0 fwcfg.test=1 root=/dev/vda';
  const { exit, output } = await runToExit({ image, memoryBytes, vcpus: 2, irqchip: true, cmdline, pool });
  t.same({ reason: exit.reason, code: exit.code }, { reason: 'debug-exit', code: SUCCESS }, output);
  const e820Lines = memoryMap(memoryBytes).map((entry) => `fwcfg e820 ${hex(entry.addr)} ${hex(entry.size)} ${entry.type}`);
  t.equal(output, [
    'fwcfg signature QEMU',
    'fwcfg id 0x3',
    'fwcfg dma signature QEMU CFG',
    'fwcfg cpus 2 max 2',
    `fwcfg ram ${hex(memoryBytes)}`,
    `fwcfg file 0x20 etc/e820 size ${memoryMap(memoryBytes).length * 20}`,
    ...e820Lines,
    `fwcfg cmdline ${cmdline.length + 1} "${cmdline}"`,
    'fwcfg dma outside ram: error',
    'fwcfg dma write: error',
    'fwcfg done',
    '',
  ].join('\n'));
});

t.test('without a command line the guest reads size 0 and nothing', { skip: noKvm }, async (t) => {
  const { exit, output } = await runToExit({ image, memoryBytes: 16 * MiB, pool });
  t.equal(exit.code, SUCCESS, output);
  t.match(output, /^fwcfg cpus 1 max 1$/m);
  t.match(output, /^fwcfg ram 0x1000000$/m);
  t.match(output, /^fwcfg cmdline 0 ""$/m);
});

const CMDLINE = 'abcdefghijklmnopqrstuvwxyz-0123456789';
const half = Math.floor((CMDLINE.length + 1) / 2);

/** A guest with its command line selected and half read, waiting to be told to go on. */
async function halfRead() {
  const source = await boot({ image, memoryBytes: 16 * MiB, cmdline: CMDLINE, pool });
  source.machine.writeMemory(GUEST_PARAMS_ADDR, params(Mode.HalfRead));
  source.machine.start();
  await source.waitForOutput('fwcfg waiting\n');
  return source;
}

t.test('a snapshot of a guest half way through an item: the restored guest reads on where it was', { skip: noKvm }, async (t) => {
  const dir = mkdtempSync(path.join(tmpdir(), 'node-kvm-fwcfg-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const source = await halfRead();
  t.teardown(() => void source.machine.stop());
  t.match(source.output(), `fwcfg half "${CMDLINE.slice(0, half)}"\n`);
  await source.machine.pause();
  const file = path.join(dir, 'fwcfg.snap');
  await source.machine.snapshot(file);
  await source.machine.stop();

  // The restored machine is built from no image, so with no command line of its own.
  const output = serialCollector();
  const restored = await Machine.restore(file, { serial: { output: output.sink }, log: () => {}, pool });
  t.teardown(() => void restored.stop());
  restored.writeMemory(GUEST_PARAMS_ADDR + 4, new Uint8Array([1, 0, 0, 0]));
  restored.start();
  const exit = await restored.wait();
  await new Promise((resolve) => setImmediate(resolve));
  t.equal(exit.code, SUCCESS, output.output());
  t.equal(output.output(), `fwcfg rest "${CMDLINE.slice(half)}"\n`, 'the second half, from the offset the snapshot held');
});

t.test('a live migration of a guest half way through an item: the destination reads on', { skip: noKvm }, async (t) => {
  const dir = mkdtempSync(path.join(tmpdir(), 'node-kvm-fwcfg-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const source = await halfRead();
  t.teardown(() => void source.machine.stop());
  const output = serialCollector();
  const address = `unix:${path.join(dir, 'm.sock')}`;
  let listening!: () => void;
  const ready = new Promise<void>((resolve) => (listening = resolve));
  const incoming = Machine.incoming(address, { onListening: () => listening(), serial: { output: output.sink }, log: () => {}, pool });
  await ready;
  await source.machine.migrate(address);
  const destination = await incoming;
  t.teardown(() => void destination.stop());
  t.equal((await source.machine.wait()).reason, 'migrated');
  destination.writeMemory(GUEST_PARAMS_ADDR + 4, new Uint8Array([1, 0, 0, 0]));
  const exit = await destination.wait();
  await new Promise((resolve) => setImmediate(resolve));
  t.equal(exit.code, SUCCESS, output.output());
  t.equal(output.output(), `fwcfg rest "${CMDLINE.slice(half)}"\n`);
});
