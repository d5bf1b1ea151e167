// What the two-process examples (migrate.ts, live-update.ts) share, none of it their point: the
// example's own file run again as a second process, a unix socket between the two in a temporary
// folder, and the echo guest typed into on each side, with what it printed there.
import { fork } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Machine } from 'node-kvm';

const echoGuest = new URL('../../../guests/build/echo.bin', import.meta.url).pathname;

export interface EchoGuestMove {
  /** What each side's lines start with. */
  names: { source: string; destination: string };
  /** In the second process: the machine arriving at `address`; `onListening` once it listens. */
  receive(address: string, onListening: () => void): Promise<Machine>;
  /** Here: sends `machine` (the echo guest, running) to `address`; says how it went. */
  send(machine: Machine, address: string): Promise<string>;
}

/** What the guest prints on the console from now on. */
function consoleOutput(machine: Machine): () => string {
  let output = '';
  machine.console.on('data', (chunk: Buffer) => (output += chunk.toString('latin1')));
  return () => output;
}

/**
 * Boots the echo guest here, types "hi" and sends it with `move.send` to this file (`exampleUrl`:
 * its import.meta.url) run again as a second process, where `move.receive` takes it and "q" ends
 * it. Each side prints what the guest printed there.
 */
export async function moveEchoGuest(exampleUrl: string, move: EchoGuestMove): Promise<void> {
  if (process.argv[2] === 'destination') {
    // Typed once the source has said its piece, so the two processes' lines come in order.
    const sourceDone = new Promise((resolve) => process.once('message', resolve));
    const machine = await move.receive(`unix:${process.argv[3]}`, () => process.send!('listening'));
    const output = consoleOutput(machine);
    await sourceDone;
    machine.console.write('q');
    const exit = await machine.wait();
    console.log(`${move.names.destination}: the guest printed ${JSON.stringify(output())} here, then exit: ${exit.reason} ${exit.code}`);
    process.disconnect();
    return;
  }
  const dir = mkdtempSync(path.join(tmpdir(), 'node-kvm-example-'));
  const socket = path.join(dir, 'migration.sock');
  const destination = fork(fileURLToPath(exampleUrl), ['destination', socket], { stdio: 'inherit' });
  try {
    await new Promise((resolve) => destination.once('message', resolve));
    const machine = await Machine.create({ image: echoGuest, memoryBytes: 1 << 20 });
    const output = consoleOutput(machine);
    machine.start();
    machine.console.write('hi');
    while (!output().includes('echo> hi')) await new Promise((resolve) => machine.console.once('data', resolve));
    const outcome = await move.send(machine, `unix:${socket}`);
    console.log(`${move.names.source}: the guest printed ${JSON.stringify(output())} here; ${outcome}`);
    console.log(`${move.names.source}: exit: ${(await machine.wait()).reason}`);
    const ended = new Promise((resolve) => destination.once('exit', resolve));
    destination.send('source done');
    await ended;
  } finally {
    destination.kill();
    rmSync(dir, { recursive: true, force: true });
  }
}
