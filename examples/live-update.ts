// Upgrading the VMM under a running guest: this process boots the echo guest and hands it to a
// second process (this file again, forked by support/two-processes.ts; in real life a newer
// node-kvm) with migrate({ local: true }): its RAM, as a memfd, moves over the unix socket and
// nothing is copied. The guest carries on there and is typed into.
import { Machine } from 'node-kvm';
import { moveEchoGuest } from './support/two-processes.js';

await moveEchoGuest(import.meta.url, {
  names: { source: 'old process', destination: 'new process' },
  // Any incoming migration may be a local one: the stream says so.
  receive: (address, onListening) => Machine.incoming(address, { onListening }),
  async send(machine, address) {
    const stats = await machine.migrate(address, { local: true });
    return `handed over with ${stats.pagesTransferred} pages copied, downtime ${Math.round(stats.downtimeMs)} ms`;
  },
});
