// The `exits` guest (1,000,000 writes to port 0x80) through the whole VMM: a vCPU worker thread,
// the I/O bus and the POST-code device. Used by bench/exits.ts; also runnable on its own.
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Machine, type MachineRuntimeConfig } from '../lib/index.js';

/** The guest's loop count when the host leaves ECX at 0 (see guests/exits.S). */
export const VMM_EXITS = 1_000_000;

/** `extra`: more of the machine's configuration (bench/debug.ts: exit statistics, an exit trace). */
export async function measureVmmExits(root: string, extra: MachineRuntimeConfig = {}): Promise<{ exits: number; seconds: number; exitsPerSec: number; nsPerExit: number }> {
  const image = readFileSync(path.join(root, 'guests', 'build', 'exits.bin'));
  const machine = await Machine.create({ image, memoryBytes: 1 << 20, serial: { output: null }, ...extra });
  const started = performance.now();
  machine.start();
  // The clock stops at the guest's last port write, not at the machine's end: with the in-kernel
  // irqchip (the default) the final HLT is found by the halt watch, up to 100 ms later, which is
  // not the exit path's cost. Checked every millisecond: 0.1 per mille of the run.
  let seconds = 0;
  const lastWrite = setInterval(() => {
    if (machine.postCode.writes >= VMM_EXITS && seconds === 0) seconds = (performance.now() - started) / 1000;
  }, 1);
  const exit = await machine.wait().finally(() => clearInterval(lastWrite));
  if (seconds === 0) seconds = (performance.now() - started) / 1000;
  const exits = machine.postCode.writes;
  if (exit.reason !== 'hlt' || exits !== VMM_EXITS) throw new Error(`the exits guest ended with ${exit.reason} after ${exits} port writes`);
  return { exits, seconds, exitsPerSec: exits / seconds, nsPerExit: (seconds * 1e9) / exits };
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
  console.log(JSON.stringify(await measureVmmExits(root)));
}
