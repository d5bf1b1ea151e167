// `node-kvm snapshot`, `status`, `pause`, `resume`, `stop`, `reset` and `config`: commands to a
// running machine through its control API.
import path from 'node:path';
import { parseArgs } from 'node:util';
import { argValueError } from '../kvm/errors.js';
import { callApi, parseApiCommandArgs, requireApiSocket } from './api-client.js';
import { mib, ms, progressLine, table } from './progress.js';

export const SNAPSHOT_USAGE = `usage: node-kvm snapshot --api-socket PATH [--diff] [--json] FILE

Writes the guest of a running \`node-kvm run --api-socket PATH\` to FILE: its memory and the
state of its vCPUs and devices. The guest pauses while it is written, then runs on.
\`node-kvm run --restore FILE\` runs it again from there.

options:
  --api-socket PATH  the machine's control socket (required)
  --diff             only the pages written since this machine's previous snapshot, layered on
                     that file (which must stay where it is)
  --json             print the figures as JSON
  -h, --help         show this help`;

const CONTROL_USAGE = {
  status: 'usage: node-kvm status --api-socket PATH [--json]\n\nPrints the state of a running machine (and of a migration under way).',
  pause: 'usage: node-kvm pause --api-socket PATH\n\nPauses every vCPU of a running machine.',
  resume: 'usage: node-kvm resume --api-socket PATH\n\nResumes a paused machine.',
  stop: 'usage: node-kvm stop --api-socket PATH\n\nEnds a machine (as quit in QEMU\'s monitor): its node-kvm run exits 0.',
  reset: 'usage: node-kvm reset --api-socket PATH\n\nReboots the guest, as QEMU\'s system_reset does: its vCPUs, interrupt controllers and\ndevices as at power-on, its RAM cleared and the image loaded again. A running guest runs\non from its entry point; a paused one stays paused. A restored or received guest has no\nimage to boot again: the machine refuses.',
  config: 'usage: node-kvm config --api-socket PATH\n\nPrints the configuration of a running machine as JSON, in the form node-kvm run --config\nreads: the options it was run with (file paths absolute, no --token), its RAM, vCPUs, irqchip\nand dirty log.',
};

export async function snapshotCommand(args: string[]): Promise<number> {
  const parsed = parseApiCommandArgs(args, { diff: { type: 'boolean' }, json: { type: 'boolean' } }, SNAPSHOT_USAGE);
  if (!parsed) return 0;
  const { values, positionals } = parsed;
  if (positionals.length !== 1) throw argValueError(`snapshot takes one FILE, got ${positionals.length} (see node-kvm snapshot --help)`);
  const apiSocket = requireApiSocket(values['api-socket'], 'snapshot');
  // The machine resolves paths from its own working directory, not ours.
  const file = path.resolve(positionals[0]!);
  const info = await callApi(path.resolve(apiSocket), 'snapshot', values.diff ? { path: file, diff: true } : { path: file });
  if (values.json) {
    console.log(JSON.stringify(info, null, 2));
    return 0;
  }
  process.stdout.write(table([
    ['snapshot', info.path],
    ['kind', info.kind === 'diff' && info.parent ? `diff on ${info.parent}` : info.kind],
    ['written', mib(info.bytesWritten)],
    ['pages', String(info.pagesWritten)],
    ['zero pages', String(info.zeroPagesSkipped)],
    ['guest paused', ms(info.pausedMs)],
    ['total time', ms(info.totalTimeMs)],
  ]));
  return 0;
}

/** `status`, `pause`, `resume`, `stop` or `reset`. */
export async function controlCommand(command: 'status' | 'pause' | 'resume' | 'stop' | 'reset' | 'config', args: string[]): Promise<number> {
  const { values } = parseArgs({
    args,
    options: {
      help: { type: 'boolean', short: 'h' },
      'api-socket': { type: 'string' },
      ...(command === 'status' ? { json: { type: 'boolean' } as const } : {}),
    },
  });
  if (values.help) {
    console.log(CONTROL_USAGE[command]);
    return 0;
  }
  const apiSocket = path.resolve(requireApiSocket(values['api-socket'], command));
  if (command === 'config') {
    console.log(JSON.stringify(await callApi(apiSocket, 'config', {}), null, 2));
    return 0;
  }
  if (command !== 'status') {
    const { state } = await callApi(apiSocket, command, {});
    console.log(state);
    return 0;
  }
  const status = await callApi(apiSocket, 'status', {});
  if ((values as { json?: boolean }).json) {
    console.log(JSON.stringify(status, null, 2));
    return 0;
  }
  const rows: [string, string][] = [
    ['state', status.state],
    ['vCPUs', String(status.vcpuCount)],
    ['memory', mib(status.memoryBytes)],
  ];
  if (status.migration) rows.push(['migration', progressLine(status.migration).replace(/^migrate: /, '')]);
  process.stdout.write(table(rows));
  return 0;
}
