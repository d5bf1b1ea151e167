// Where bench/migrate.ts runs a migration's two ends, so that it can compare as two hosts would:
//
// - shared: source and destination on the same CPUs (all of them), over loopback TCP: one host
//   migrating to itself, as the benchmark always measured;
// - pinned: the source's process on CPU 0 and the destination's on CPU 1 (every thread of each:
//   sched_setaffinity through `taskset`, which threads started later inherit), over loopback;
// - netns: pinned likewise, and each in a network namespace of its own, the two joined by a veth
//   pair: the stream crosses a network device as between two hosts (an MTU of 1500, no loopback
//   shortcut). Needs root and `ip`. The namespaces, with the veth pair inside them, are made for
//   the run and deleted at its end, on failure and on SIGINT/SIGTERM too; the host's own
//   namespace, its links and routes are never touched (the veth ends are created inside the
//   namespaces).
//
// A placement is a pair of command prefixes (`taskset -c 0`, `ip netns exec NS taskset -c 1`):
// the benchmark starts the source side (its own process: bench/migrate.ts in --placement-child
// mode, or QEMU's source) under one and the destination under the other.
import { spawnSync } from 'node:child_process';
import os from 'node:os';

export type PlacementKey = 'shared' | 'pinned' | 'netns';
export const PLACEMENT_KEYS: readonly PlacementKey[] = ['shared', 'pinned', 'netns'];

export interface Placement {
  key: PlacementKey;
  title: string;
  /** Command prefix for the source's process ([] for none). */
  source: string[];
  /** Command prefix for the destination's process. */
  destination: string[];
  /** The address the destination listens on, as the source reaches it. */
  destinationHost: string;
  /** The CPUs of the source and the destination (for the C stream), or null when they share all. */
  cpus: [number, number] | null;
  /** netns only: the names of the source's and the destination's network namespaces (under /run/netns). */
  netns?: { source: string; destination: string };
}

/** The veth pair's subnet: only inside the two namespaces, never in the host's. */
const SOURCE_ADDRESS = '10.231.71.1';
const DESTINATION_ADDRESS = '10.231.71.2';

const has = (command: string) => spawnSync('sh', ['-c', `command -v ${command}`], { encoding: 'utf8' }).status === 0;

function run(command: string, args: string[]): string | null {
  const result = spawnSync(command, args, { encoding: 'utf8' });
  if (result.status === 0) return null;
  return `${command} ${args.join(' ')}: ${(result.stderr || result.error?.message || `status ${result.status}`).trim()}`;
}

export function sharedPlacement(): Placement {
  return { key: 'shared', title: 'shared CPUs, loopback', source: [], destination: [], destinationHost: '127.0.0.1', cpus: null };
}

/** Source on CPU 0, destination on CPU 1; or why not. */
export function pinnedPlacement(): Placement | string {
  if (os.availableParallelism() < 2) return 'pinned: needs 2 CPUs';
  if (!has('taskset')) return 'pinned: taskset is not installed';
  return { key: 'pinned', title: 'a CPU each, loopback', source: ['taskset', '-c', '0'], destination: ['taskset', '-c', '1'], destinationHost: '127.0.0.1', cpus: [0, 1] };
}

/** What netnsPlacement() made, to be removed by cleanup() (idempotent; also run at exit and on SIGINT/SIGTERM). */
export interface NetnsPlacement {
  placement: Placement;
  cleanup(): void;
}

/** Pinned as pinnedPlacement(), each end in a network namespace of its own over a veth pair; or why not. */
export function netnsPlacement(): NetnsPlacement | string {
  const pinned = pinnedPlacement();
  if (typeof pinned === 'string') return pinned.replace(/^pinned/, 'netns');
  if (process.getuid?.() !== 0) return 'netns: needs root (network namespaces)';
  if (!has('ip')) return 'netns: ip (iproute2) is not installed';
  const tag = `nkvb${process.pid % 100000}`;
  const sourceNs = `${tag}-src`;
  const destinationNs = `${tag}-dst`;
  const made: string[] = [];
  let cleaned = false;
  const cleanup = () => {
    if (cleaned) return;
    cleaned = true;
    // Deleting a namespace deletes the veth end inside it, and with it the other end.
    for (const ns of made.reverse()) run('ip', ['netns', 'delete', ns]);
    process.off('exit', cleanup);
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
  };
  const onSignal = (signal: NodeJS.Signals) => {
    cleanup();
    process.kill(process.pid, signal);
  };
  process.on('exit', cleanup);
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  const steps: [string, string[], (() => void)?][] = [
    ['ip', ['netns', 'add', sourceNs], () => made.push(sourceNs)],
    ['ip', ['netns', 'add', destinationNs], () => made.push(destinationNs)],
    // Both ends created inside the namespaces: nothing appears in the host's, even for a moment.
    ['ip', ['link', 'add', 'veth-src', 'netns', sourceNs, 'type', 'veth', 'peer', 'name', 'veth-dst', 'netns', destinationNs]],
    ['ip', ['-n', sourceNs, 'addr', 'add', `${SOURCE_ADDRESS}/30`, 'dev', 'veth-src']],
    ['ip', ['-n', destinationNs, 'addr', 'add', `${DESTINATION_ADDRESS}/30`, 'dev', 'veth-dst']],
    ['ip', ['-n', sourceNs, 'link', 'set', 'lo', 'up']],
    ['ip', ['-n', destinationNs, 'link', 'set', 'lo', 'up']],
    ['ip', ['-n', sourceNs, 'link', 'set', 'veth-src', 'up']],
    ['ip', ['-n', destinationNs, 'link', 'set', 'veth-dst', 'up']],
  ];
  for (const [command, args, done] of steps) {
    const failure = run(command, args);
    if (failure) {
      cleanup();
      return `netns: ${failure}`;
    }
    done?.();
  }
  return {
    placement: {
      key: 'netns',
      title: 'a CPU each, two network namespaces over a veth pair',
      source: ['ip', 'netns', 'exec', sourceNs, ...pinned.source],
      destination: ['ip', 'netns', 'exec', destinationNs, ...pinned.destination],
      destinationHost: DESTINATION_ADDRESS,
      cpus: pinned.cpus,
      netns: { source: sourceNs, destination: destinationNs },
    },
    cleanup,
  };
}

/** `command args` under `prefix`: the program and its arguments for spawn(). */
export function underPrefix(prefix: readonly string[], command: string, args: readonly string[]): [string, string[]] {
  if (prefix.length === 0) return [command, [...args]];
  return [prefix[0]!, [...prefix.slice(1), command, ...args]];
}
