// Upgrading the VMM under a running guest: this process boots the echo guest and hands it to a
// second process (this file again, forked with the argument `destination`; in real life a newer
// node-kvm) with migrate({ local: true }): its RAM, as a memfd, moves over the unix socket and
// nothing is copied. The guest carries on there and is typed into.
import { fork } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Machine } from 'node-kvm';

const echo = new URL('../../guests/build/echo.bin', import.meta.url).pathname;

if (process.argv[2] === 'destination') {
  // Any incoming migration may be a local one: the stream says so.
  const machine = await Machine.incoming(`unix:${process.argv[3]}`, { onListening: () => process.send!('listening') });
  let output = '';
  machine.console.on('data', (chunk: Buffer) => (output += chunk.toString('latin1')));
  await new Promise((resolve) => process.once('message', resolve));
  machine.console.write('q');
  const exit = await machine.wait();
  console.log(`new process: the guest printed ${JSON.stringify(output)} here, then exit: ${exit.reason} ${exit.code}`);
  process.disconnect();
} else {
  const dir = mkdtempSync(path.join(tmpdir(), 'node-kvm-example-'));
  const socket = path.join(dir, 'upgrade.sock');
  const destination = fork(fileURLToPath(import.meta.url), ['destination', socket], { stdio: 'inherit' });
  try {
    await new Promise((resolve) => destination.once('message', resolve));
    const machine = await Machine.create({ image: echo, memoryBytes: 1 << 20 });
    let output = '';
    machine.console.on('data', (chunk: Buffer) => (output += chunk.toString('latin1')));
    machine.start();
    machine.console.write('hi');
    while (!output.includes('echo> hi')) await new Promise((resolve) => machine.console.once('data', resolve));
    const stats = await machine.migrate(`unix:${socket}`, { local: true });
    console.log(`old process: the guest printed ${JSON.stringify(output)} here; handed over with ${stats.pagesTransferred} pages copied, downtime ${Math.round(stats.downtimeMs)} ms`);
    console.log(`old process: exit: ${(await machine.wait()).reason}`);
    const ended = new Promise((resolve) => destination.once('exit', resolve));
    destination.send('type');
    await ended;
  } finally {
    destination.kill();
    rmSync(dir, { recursive: true, force: true });
  }
}
