// The `node-kvm` command's subcommands (main.ts is the entry).
// Only what every command needs is imported up front: `run` hands its vCPU threads to the machine
// while they load, and loads the rest meanwhile.
import { parseArgs } from 'node:util';
import { VcpuWorkerPool, type VcpuThread } from '../vmm/pool.js';
import { argValueError } from '../kvm/errors.js';

const USAGE = `usage: node-kvm <command> [options]

commands:
  run       boot a guest image with its serial console on stdio (or receive one by
            live migration, or restore a snapshot)
  migrate   live-migrate a running machine's guest to another node-kvm run --incoming
  snapshot  write a running machine's guest to a file
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
  -h, --help  show help for a command`;

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
  if (command === undefined || command === '-h' || command === '--help' || command === 'help') {
    console.log(USAGE);
    return command === undefined ? 2 : 0;
  }
  switch (command) {
    case 'run': {
      const { values, positionals } = parseArgs({
        args: rest,
        allowPositionals: true,
        options: {
          help: { type: 'boolean', short: 'h' },
          mode: { type: 'string' },
          'load-addr': { type: 'string' },
          memory: { type: 'string' },
          vcpus: { type: 'string' },
          cmdline: { type: 'string' },
          kernel: { type: 'string' },
          initrd: { type: 'string' },
          append: { type: 'string' },
          disk: { type: 'string', multiple: true },
          net: { type: 'string', multiple: true },
          'api-socket': { type: 'string' },
          incoming: { type: 'string' },
          restore: { type: 'string' },
          'no-verify': { type: 'boolean' },
          'no-irqchip': { type: 'boolean' },
          rng: { type: 'boolean' },
          vsock: { type: 'string' },
          token: { type: 'string' },
          gdb: { type: 'string' },
          'gdb-wait': { type: 'boolean' },
          serial: { type: 'string' },
          'trace-exits': { type: 'string' },
          'exit-stats': { type: 'boolean' },
        },
      });
      const sources = positionals.length + (values.kernel === undefined ? 0 : 1) + (values.incoming === undefined ? 0 : 1) + (values.restore === undefined ? 0 : 1);
      // The machine takes its threads while they load: it builds its VM meanwhile. A thread that
      // fails to load fails Machine.create().
      const threads = !values.help && sources === 1
        ? VcpuWorkerPool.start(Math.min(Math.max(Number(values.vcpus ?? 1) | 0, 1), 64), firstThread ? [firstThread] : [])
        : null;
      const { RUN_USAGE, run, checkRunSource } = await import('./run.js');
      if (values.help) {
        console.log(RUN_USAGE);
        return 0;
      }
      const options = {
        image: positionals[0], incoming: values.incoming, restore: values.restore, token: values.token, apiSocket: values['api-socket'],
        mode: values.mode, loadAddr: values['load-addr'], memory: values.memory, vcpus: values.vcpus, cmdline: values.cmdline,
        kernel: values.kernel, initrd: values.initrd, append: values.append, disk: values.disk, net: values.net, noVerify: values['no-verify'], noIrqchip: values['no-irqchip'], rng: values.rng, vsock: values.vsock,
        gdb: values.gdb, gdbWait: values['gdb-wait'], serial: values.serial, traceExits: values['trace-exits'], exitStats: values['exit-stats'],
      };
      if (!threads) {
        if (positionals.length > 1) throw argValueError(`run takes one IMAGE, got ${positionals.length} (see node-kvm run --help)`);
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
    case 'reset': {
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
