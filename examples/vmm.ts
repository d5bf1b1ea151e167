// The VMM: boot a guest image, its serial console as a stream, pause and resume. The echo guest
// prints "echo> ", sends back every byte typed into its COM1, and exits (debug-exit 5) after 'q'.
import { Machine } from 'node-kvm';

const machine = await Machine.create({ image: new URL('../../guests/build/echo.bin', import.meta.url).pathname, memoryBytes: 1 << 20 });
machine.on('paused', () => console.log('[paused]'));
machine.on('resumed', () => console.log('[resumed]'));

// machine.console is a Duplex: what the guest writes to COM1 comes out, what we write goes in.
let output = '';
let waiting: { text: string; resolve: () => void } | null = null;
machine.console.on('data', (chunk: Buffer) => {
  output += chunk.toString('latin1');
  if (waiting && output.includes(waiting.text)) waiting.resolve();
});
const seen = (text: string) => new Promise<void>((resolve) => {
  if (output.includes(text)) resolve();
  else waiting = { text, resolve };
});

machine.start();
await seen('echo> ');
machine.console.write('hi');
await seen('echo> hi');

await machine.pause(); // every vCPU parked
machine.console.write('!'); // waits in the UART for the guest
console.log(`${machine.state}, output so far ${JSON.stringify(output)}`);
machine.resume();
await seen('hi!');

machine.console.write('q');
const exit = await machine.wait();
console.log(`output ${JSON.stringify(output)}; exit: ${exit.reason} ${exit.code}`);
