#!/usr/bin/env node
// The `node-kvm` command. A vCPU thread takes longer to start (about 17 ms here) than the rest of
// the command takes to load and read its arguments, so `run` starts its first thread before
// loading anything else, and the two overlap.
import { startVcpuThread } from '../vmm/vcpu-thread.js';

const args = process.argv.slice(2);
const firstThread = args[0] === 'run' && !args.includes('-h') && !args.includes('--help') ? startVcpuThread() : undefined;

// No top-level await: the built command is CommonJS (scripts/bundle.mjs).
import('./commands.js').then(({ main }) => main(args, firstThread)).then((code) => {
  process.exitCode = code;
}, (error: unknown) => {
  // One clear line, not a stack trace.
  console.error(`node-kvm: ${error instanceof Error ? error.message : String(error)}`);
  process.exitCode = 1;
}).finally(() => {
  // Unused (a usage error, say), it would keep the process alive; used, it has ended already
  // (run closes its pool), and the message goes nowhere.
  firstThread?.send({ type: 'quit' });
});
