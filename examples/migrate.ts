// Live migration between two processes on this host: this process boots the echo guest and
// migrates it over a unix socket to a second process (this file again, forked by
// support/two-processes.ts, which also types into the guest), where it carries on.
import { Machine } from 'node-kvm';
import { moveEchoGuest } from './support/two-processes.js';

await moveEchoGuest(import.meta.url, {
  names: { source: 'source', destination: 'destination' },
  // Waits for one migration; resolves with the machine, running, once the guest has arrived.
  receive: (address, onListening) => Machine.incoming(address, { onListening }),
  async send(machine, address) {
    // Memory is copied while the guest runs; it pauses only for the last pass.
    const stats = await machine.migrate(address);
    return `migrated ${stats.pagesTransferred} pages, downtime ${Math.round(stats.downtimeMs)} ms`;
  },
});
