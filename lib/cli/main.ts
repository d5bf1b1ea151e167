#!/usr/bin/env node
// The `node-kvm` command. A vCPU thread takes longer to start (about 17 ms here) than the rest of
// the command takes to load and read its arguments, so `run` starts its first thread before
// loading anything else, and the two overlap.
import { startVcpuThread } from '../vmm/vcpu-thread.js';

const args = process.argv.slice(2);
const firstThread = args[0] === 'run' && !args.includes('-h') && !args.includes('--help') ? startVcpuThread() : undefined;

// No top-level await: the built command is CommonJS (scripts/bundle.mjs). main() prints a failure
// of the command itself; this prints one of loading it (the addon, say), as one line too.
import('./commands.js').then(({ main }) => main(args, firstThread), (error: unknown) => {
  console.error(`node-kvm: ${error instanceof Error ? error.message : String(error)}`);
  return 1;
}).then((code) => {
  process.exitCode = code;
}).finally(() => {
  // Unused (a usage error, say), it would keep the process alive; used, it has ended already
  // (run closes its pool), and the message goes nowhere.
  firstThread?.send({ type: 'quit' });
});
