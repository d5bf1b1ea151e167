// Live migration between two processes on this host: this process boots the echo guest and
// migrates it over a unix socket to a second process (this file again, forked by
// support/two-processes.ts), where it carries on and is typed into.
import { Machine } from 'node-kvm';
import { ConsoleOutput, echoGuest, runInTwoProcesses } from './support/two-processes.js';

await runInTwoProcesses(import.meta.url, {
  async destination(address, onListening, sourceDone) {
    // Waits for one migration; resolves with the machine, running, once the guest has arrived.
    const machine = await Machine.incoming(address, { onListening });
    const output = new ConsoleOutput(machine);
    await sourceDone;
    machine.console.write('q');
    const exit = await machine.wait();
    console.log(`destination: the guest printed ${JSON.stringify(output.text)} here, then exit: ${exit.reason} ${exit.code}`);
  },

  async source(address) {
    const machine = await Machine.create({ image: echoGuest, memoryBytes: 1 << 20 });
    const output = new ConsoleOutput(machine);
    machine.start();
    machine.console.write('hi');
    await output.waitFor('echo> hi');
    const stats = await machine.migrate(address);
    console.log(`source: the guest printed ${JSON.stringify(output.text)} here; migrated ${stats.pagesTransferred} pages, downtime ${Math.round(stats.downtimeMs)} ms`);
    console.log(`source: exit: ${(await machine.wait()).reason}`);
  },
});
