#!/usr/bin/env node
// The `node-kvm` command.
import { parseArgs } from 'node:util';
import { Kvm, KvmError } from '../kvm/index.js';
import { printInfo } from './info.js';

const USAGE = `usage: node-kvm <command> [options]

commands:
  info      print this host's KVM capabilities

options:
  -h, --help  show help for a command`;

function main(argv: string[]): number {
  const [command, ...rest] = argv;
  if (command === undefined || command === '-h' || command === '--help' || command === 'help') {
    console.log(USAGE);
    return command === undefined ? 2 : 0;
  }
  switch (command) {
    case 'info': {
      const { values } = parseArgs({
        args: rest,
        options: { help: { type: 'boolean', short: 'h' }, json: { type: 'boolean' }, device: { type: 'string', default: '/dev/kvm' } },
      });
      if (values.help) {
        console.log('usage: node-kvm info [--device /dev/kvm] [--json]\n\nPrints the KVM API version, limits and capabilities of this host.');
        return 0;
      }
      using kvm = Kvm.open(values.device);
      printInfo(kvm, values.device!, !!values.json);
      return 0;
    }
    default:
      console.error(`node-kvm: unknown command '${command}'\n\n${USAGE}`);
      return 2;
  }
}

try {
  process.exitCode = main(process.argv.slice(2));
} catch (error) {
  // One clear line, not a stack trace.
  const message = error instanceof KvmError || error instanceof TypeError || error instanceof RangeError
    ? error.message
    : (error as Error)?.message ?? String(error);
  console.error(`node-kvm: ${message}`);
  process.exitCode = 1;
}
