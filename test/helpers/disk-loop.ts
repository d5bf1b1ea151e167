// The disk guest (guests/disk.c) in loop mode as a migration workload: round after round it writes
// its disk, flushes, reads back and checks, printing "round N ok" (or a line with "BAD"). A guest
// moved with a stale page or a lost write fails a later round's check.
import path from 'node:path';
import { GUEST_PARAMS_ADDR, type MachineConfig } from '../../lib/index.js';
import { repoRoot } from './kvm.js';
import { boot, type Booted } from './machine.js';

export const diskGuestImage = path.join(repoRoot, 'guests', 'build', 'disk.elf');
const LOOP_MODE = 1;

/**
 * Boots the disk guest over the image `file` in loop mode (64 MiB, the machine stopped when `t`
 * ends) and resolves once it has passed `rounds` rounds.
 */
export async function startDiskLoop(t: { teardown(fn: () => void): void }, file: string, config: Partial<MachineConfig> = {}, rounds = 2): Promise<Booted> {
  const booted = await boot({ image: diskGuestImage, memoryBytes: 64 << 20, disks: [{ path: file }], ...config });
  t.teardown(() => void booted.machine.stop());
  const params = new DataView(new ArrayBuffer(24));
  params.setUint32(0, LOOP_MODE, true);
  booted.machine.writeMemory(GUEST_PARAMS_ADDR, new Uint8Array(params.buffer));
  booted.machine.start();
  await booted.waitForOutput(`round ${rounds} ok\n`);
  return booted;
}

/** The last round the output says passed, or -1. */
export const lastRound = (output: string) => Math.max(-1, ...[...output.matchAll(/round (\d+) ok\n/g)].map((m) => Number(m[1])));

/** Resolves once `output()` has passed `round`, has a "BAD" line, or after 20 s, whichever comes first. */
export async function untilRound(output: () => string, round: number): Promise<void> {
  const deadline = Date.now() + 20_000;
  while (lastRound(output()) < round && Date.now() < deadline && !output().includes('BAD')) await new Promise((resolve) => setTimeout(resolve, 20));
}
