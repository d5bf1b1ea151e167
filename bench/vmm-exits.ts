// The `exits` guest (1,000,000 writes to port 0x80) through the whole VMM: a vCPU worker thread,
// the I/O bus and the POST-code device. Used by bench/exits.ts; also runnable on its own.
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Machine } from '../lib/index.js';

/** The guest's loop count when the host leaves ECX at 0 (see guests/exits.S). */
export const VMM_EXITS = 1_000_000;

export async function measureVmmExits(root: string): Promise<{ exits: number; seconds: number; exitsPerSec: number; nsPerExit: number }> {
  const image = readFileSync(path.join(root, 'guests', 'build', 'exits.bin'));
  const machine = await Machine.create({ image, memoryBytes: 1 << 20, serial: { output: null } });
  const started = performance.now();
  machine.start();
  const exit = await machine.wait();
  const seconds = (performance.now() - started) / 1000;
  const exits = machine.postCode.writes;
  if (exit.reason !== 'hlt' || exits !== VMM_EXITS) throw new Error(`the exits guest ended with ${exit.reason} after ${exits} port writes`);
  return { exits, seconds, exitsPerSec: exits / seconds, nsPerExit: (seconds * 1e9) / exits };
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
  console.log(JSON.stringify(await measureVmmExits(root)));
}
