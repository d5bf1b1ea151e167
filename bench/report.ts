// What every benchmark prints alongside its figures: the host it ran on, and medians.
import { existsSync, readFileSync } from 'node:fs';
import os from 'node:os';

export const median = (xs: number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  const mid = s.length >> 1;
  return s.length % 2 ? s[mid]! : (s[mid - 1]! + s[mid]!) / 2;
};

export function hostInfo(): Record<string, string | number> {
  let cpu = 'unknown';
  try {
    cpu = /^model name\s*:\s*(.*)$/m.exec(readFileSync('/proc/cpuinfo', 'utf8'))?.[1] ?? cpu;
  } catch {
    // Not Linux /proc: leave it unknown.
  }
  const kvmModule = ['kvm_intel', 'kvm_amd', 'kvm_pvm'].filter((m) => existsSync(`/sys/module/${m}`)).join(', ') || 'unknown';
  return { kernel: os.release(), cpu, cpus: os.availableParallelism(), kvmModule, node: process.version };
}
