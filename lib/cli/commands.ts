// The `node-kvm` command's subcommands (main.ts is the entry).
// Only what every command needs is imported up front: `run` hands its vCPU threads to the machine
// while they load, and loads the rest meanwhile.
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { VcpuWorkerPool, type VcpuThread } from '../vmm/pool.js';
import { argValueError } from '../kvm/errors.js';
import { COMMANDS } from './command-names.js';
import { parseRunArgs, parseVcpus } from './run-options.js';

const USAGE = `usage: node-kvm <command> [options]

commands:
  run       boot a guest image with its serial console on stdio (or receive one by
            live migration, or restore a snapshot)
  migrate   live-migrate a running machine's guest to another node-kvm run --incoming
  snapshot  write a running machine's guest to a file
  config    print a running machine's configuration (as run --config reads it)
  status    print a running machine's state
  pause     pause a running machine
  resume    resume a paused machine
  stop      end a running machine
  reset     reboot a running machine's guest
  regs      print a running machine's vCPU registers
  x         dump a running machine's guest memory (virtual or physical)
  stats     print a running machine's exit statistics
  trace     print or summarise an exit trace; start or stop one on a running machine
  info      print this host's KVM capabilities

options:
  -h, --help     show this help (node-kvm help COMMAND or COMMAND --help: a command's)
  -V, --version  print the version`;

/** The package's version, from the package.json above this module (source, dist or bundle). */
function packageVersion(): string {
  let dir = path.dirname(fileURLToPath(import.meta.url));
  for (;;) {
    try {
      const json = JSON.parse(readFileSync(path.join(dir, 'package.json'), 'utf8')) as { name?: string; version?: string };
      if (json.name === 'node-kvm' && typeof json.version === 'string') return json.version;
    } catch {
      // none here: look further up
    }
    const parent = path.dirname(dir);
    if (parent === dir) return 'unknown';
    dir = parent;
  }
}

/**
 * Runs the command `argv` (without node and the script) as the process does, and resolves with
 * its exit status: an error is one line on stderr, `node-kvm: MESSAGE`, and status 1, not a stack
 * trace. `firstThread`, a vCPU thread the entry started before loading this module, is `run`'s to use.
 */
export async function main(argv: string[], firstThread?: VcpuThread): Promise<number> {
  try {
    return await runCommand(argv, firstThread);
  } catch (error) {
    console.error(`node-kvm: ${error instanceof Error ? error.message : String(error)}`);
    return 1;
  }
}

/** Runs the command `argv` and resolves with the exit status; bad arguments and failures throw. */
export async function runCommand(argv: string[], firstThread?: VcpuThread): Promise<number> {
  const [command, ...rest] = argv;
  if (command === undefined || command === '-h' || command === '--help' || (command === 'help' && rest.length === 0)) {
    console.log(USAGE);
    return command === undefined ? 2 : 0;
  }
  if (command === '--version' || command === '-V') {
    console.log(`node-kvm ${packageVersion()}`);
    return 0;
  }
  // `help COMMAND` is `COMMAND --help`.
  if (command === 'help') {
    if (rest.length > 1 || !(COMMANDS as readonly string[]).includes(rest[0]!)) throw argValueError(`help takes one command (${COMMANDS.join(', ')}), got '${rest.join(' ')}'`);
    return runCommand([rest[0]!, '--help'], firstThread);
  }
  switch (command) {
    case 'run': {
      const { options, help, extraImages } = parseRunArgs(rest);
      const sources = (options.image === undefined ? 0 : 1) + (options.kernel === undefined ? 0 : 1) + (options.incoming === undefined ? 0 : 1) + (options.restore === undefined ? 0 : 1);
      // Checked before any thread starts: a count the machine refuses must not start them all first.
      const vcpus = options.vcpus === undefined ? 1 : parseVcpus(options.vcpus);
      // The machine takes its threads while they load: it builds its VM meanwhile. A thread that
      // fails to load fails Machine.create().
      const threads = !help && sources === 1 && extraImages === 0 ? VcpuWorkerPool.start(Math.min(vcpus, 64), firstThread ? [firstThread] : []) : null;
      const { RUN_USAGE, run, checkRunSource } = await import('./run.js');
      if (help) {
        console.log(RUN_USAGE);
        return 0;
      }
      if (!threads) {
        if (extraImages > 0) throw argValueError(`run takes one IMAGE, got ${extraImages + 1} (see node-kvm run --help)`);
        checkRunSource(options); // none or several of IMAGE, --incoming, --restore: throws
      }
      return run(options, threads!);
    }
    case 'migrate': {
      const { migrateCommand } = await import('./migrate.js');
      return migrateCommand(rest);
    }
    case 'snapshot': {
      const { snapshotCommand } = await import('./snapshot.js');
      return snapshotCommand(rest);
    }
    case 'status':
    case 'pause':
    case 'resume':
    case 'stop':
    case 'reset':
    case 'config': {
      const { controlCommand } = await import('./snapshot.js');
      return controlCommand(command, rest);
    }
    case 'regs':
    case 'x':
    case 'stats':
    case 'trace': {
      const { inspectCommand } = await import('./inspect.js');
      return inspectCommand(command, rest);
    }
    case 'info': {
      const { values } = parseArgs({
        args: rest,
        options: { help: { type: 'boolean', short: 'h' }, json: { type: 'boolean' }, device: { type: 'string', default: '/dev/kvm' } },
      });
      if (values.help) {
        console.log('usage: node-kvm info [--device /dev/kvm] [--json]\n\nPrints the KVM API version, limits and capabilities of this host.');
        return 0;
      }
      const [{ Kvm }, { printInfo }] = await Promise.all([import('../kvm/kvm.js'), import('./info.js')]);
      using kvm = Kvm.open(values.device);
      printInfo(kvm, values.device!, !!values.json);
      return 0;
    }
    default:
      console.error(`node-kvm: unknown command '${command}'\n\n${USAGE}`);
      return 2;
  }
}
