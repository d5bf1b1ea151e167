// The dirtier guests as a migration workload: each pass checks the previous pass's pattern over
// its range and writes its own, and prints "pass N ok" (or "pass N BAD at ..."). A guest moved
// with a lost or stale page fails its next check; a guest restarted prints "pass 1" again.
import { createHash } from 'node:crypto';
import path from 'node:path';
import type { Test } from 'tap';
import { GUEST_PARAMS_ADDR } from '../../lib/boot/index.js';
import type { GuestMemory, MachineConfig } from '../../lib/index.js';
import { repoRoot } from './kvm.js';
import { boot, type Booted } from './machine.js';

export const MiB = 1 << 20;

export const dirtierImage = (name: 'dirtier' | 'dirtier-user') => path.join(repoRoot, 'guests', 'build', `${name}.elf`);

/** The guest's parameters: passes (0 = forever) and range bytes (from 2 MiB). */
export function dirtierParams(passes: number, rangeBytes: number): Uint8Array {
  const params = new Uint8Array(8);
  const view = new DataView(params.buffer);
  view.setUint32(0, passes, true);
  view.setUint32(4, rangeBytes, true);
  return params;
}

/** Boots a dirtier guest (params written through the VMM, so they count as VMM writes) and starts it. */
export async function startDirtier(options: {
  name?: 'dirtier' | 'dirtier-user'; passes?: number; rangeBytes?: number; memoryBytes?: number; vcpus?: number;
  config?: Partial<MachineConfig>;
} = {}): Promise<Booted> {
  const booted = await boot({
    image: dirtierImage(options.name ?? 'dirtier-user'),
    memoryBytes: options.memoryBytes ?? 16 * MiB,
    vcpus: options.vcpus ?? 1,
    ...options.config,
  });
  booted.machine.writeMemory(GUEST_PARAMS_ADDR, dirtierParams(options.passes ?? 0, options.rangeBytes ?? MiB));
  booted.machine.start();
  return booted;
}

/** The last complete "pass N ok" line in `output`, or 0. */
export function lastPass(output: string): number {
  const matches = [...output.matchAll(/pass (\d+) ok\n/g)];
  return matches.length ? Number(matches[matches.length - 1]![1]) : 0;
}

/** True when `output` is exactly "pass 1 ok\n" ... "pass N ok\n" for some N (a prefix of the next line may follow). */
export function isUnbrokenCount(output: string): boolean {
  let expected = 1;
  let rest = output;
  for (;;) {
    const line = `pass ${expected} ok\n`;
    if (rest.startsWith(line)) {
      rest = rest.slice(line.length);
      expected++;
      continue;
    }
    return line.startsWith(rest);
  }
}

export function memoryHash(memory: GuestMemory): string {
  return createHash('sha256').update(memory.bytes()).digest('hex');
}

/**
 * The dirtier moved: it counts on at `destination` from where `source` left off, two passes
 * more, unbroken (its memory check passing), and no further at the source meanwhile.
 */
export async function assertCountsOnThere(
  t: Test,
  source: { output(): string },
  destination: { output(): string; waitForOutput(text: string): Promise<void> },
): Promise<void> {
  const before = source.output();
  await destination.waitForOutput(`pass ${lastPass(before) + 2} ok\n`);
  t.ok(isUnbrokenCount(before + destination.output()), 'it counts on at the destination, unbroken');
  t.equal(lastPass(source.output()), lastPass(before), 'and not at the source meanwhile');
}

/** The guest still runs at `source` and counts on, two passes more, unbroken (its memory check passing). */
export async function assertRunsOn(t: Test, source: Booted): Promise<void> {
  t.equal(source.machine.state, 'running', 'the guest runs on at the source');
  await source.waitForOutput(`pass ${lastPass(source.output()) + 2} ok\n`);
  t.ok(isUnbrokenCount(source.output()), 'its count goes on unbroken, its memory check passing');
}
