// Upgrading the VMM under a running guest: this process boots the echo guest and hands it to a
// second process (this file again, forked by support/two-processes.ts; in real life a newer
// node-kvm) with migrate({ local: true }): its RAM, as a memfd, moves over the unix socket and
// nothing is copied. The guest carries on there and is typed into.
import { Machine } from 'node-kvm';
import { ConsoleOutput, echoGuest, runInTwoProcesses } from './support/two-processes.js';

await runInTwoProcesses(import.meta.url, {
  async destination(address, onListening, sourceDone) {
    // Any incoming migration may be a local one: the stream says so.
    const machine = await Machine.incoming(address, { onListening });
    const output = new ConsoleOutput(machine);
    await sourceDone;
    machine.console.write('q');
    const exit = await machine.wait();
    console.log(`new process: the guest printed ${JSON.stringify(output.text)} here, then exit: ${exit.reason} ${exit.code}`);
  },

  async source(address) {
    const machine = await Machine.create({ image: echoGuest, memoryBytes: 1 << 20 });
    const output = new ConsoleOutput(machine);
    machine.start();
    machine.console.write('hi');
    await output.waitFor('echo> hi');
    const stats = await machine.migrate(address, { local: true });
    console.log(`old process: the guest printed ${JSON.stringify(output.text)} here; handed over with ${stats.pagesTransferred} pages copied, downtime ${Math.round(stats.downtimeMs)} ms`);
    console.log(`old process: exit: ${(await machine.wait()).reason}`);
  },
});
