// machine.console: the serial console as a stream the machine owns. Reading it gives the guest's
// COM1 output (for a machine given no serial output of its own), writing to it types into COM1,
// and output nobody reads stays bounded without ever holding a vCPU up.
import { once } from 'node:events';
import { PassThrough } from 'node:stream';
import t from 'tap';
import { Machine } from '../../lib/index.js';
import { CONSOLE_BACKLOG_BYTES, type MachineConsole } from '../../lib/vmm/console.js';
import { guestImage, noKvm } from '../helpers/kvm.js';
import { exactly } from '../helpers/machine.js';
import { sharedPool } from '../helpers/pool.js';

const pool = noKvm ? undefined : sharedPool();
const log = () => {};

/** Everything the console gives until its end. */
async function readToEnd(console: MachineConsole): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const chunk of console) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks);
}

/** Reads the console until its output so far includes `text`; returns that output. */
async function readUntil(console: MachineConsole, text: string, sofar: { text: string }): Promise<void> {
  while (!sofar.text.includes(text)) {
    const chunk = console.read() as Buffer | null;
    if (chunk) sofar.text += chunk.toString('latin1');
    else await once(console, 'readable');
  }
}

/**
 * A real-mode guest that writes `count` bytes to COM1, counting down (byte i of the output is
 * (count - i) & 0xff), then writes 7 to the debug-exit port.
 */
function floodGuest(count: number): Uint8Array {
  return Uint8Array.from([
    0x66, 0xb9, count & 0xff, (count >>> 8) & 0xff, (count >>> 16) & 0xff, count >>> 24, // mov ecx, count
    0xba, 0xf8, 0x03, //                                     mov dx, 0x3f8
    0x88, 0xc8, //                                     loop: mov al, cl
    0xee, //                                                 out dx, al
    0x66, 0x49, //                                           dec ecx
    0x75, 0xf9, //                                           jnz loop
    0xb0, 0x07, 0xe6, 0xf4, //                               mov al, 7; out 0xf4, al
    0xf4, //                                                 hlt
  ]);
}

t.test('a machine given no serial output writes it to its console, which ends once the machine has stopped', { skip: noKvm }, async (t) => {
  const machine = await Machine.create({ image: guestImage('hello'), memoryBytes: 1 << 20, pool, log });
  const read = readToEnd(machine.console);
  machine.start();
  const exit = await machine.wait();
  t.equal(exit.reason, 'hlt');
  t.equal((await read).toString('latin1'), 'Hello from node-kvm!\n');
  t.equal(machine.console.droppedBytes, 0);
});

t.test('bytes written to the console reach the guest, whose echo comes back through it', { skip: noKvm }, async (t) => {
  const machine = await Machine.create({ image: guestImage('echo'), memoryBytes: 1 << 20, pool, log });
  const { console } = machine;
  const output = { text: '' };
  machine.start();
  await readUntil(console, 'echo> ', output);
  console.write('typed ');
  await readUntil(console, 'echo> typed ', output);
  // More than the UART's 4 KiB input buffer at once: the console waits for room, dropping nothing.
  const long = 'x'.repeat(10_000);
  const taken = new Promise<void>((resolve, reject) => console.write(long, (error) => (error ? reject(error) : resolve())));
  await taken;
  console.write('q');
  const exit = await machine.wait();
  output.text += (await readToEnd(console)).toString('latin1');
  t.same({ reason: exit.reason, code: exit.code }, { reason: 'debug-exit', code: 5 });
  t.equal(output.text, `echo> typed ${long}q`);
});

t.test('output nobody reads stays bounded: the latest is kept, the guest never waits', { skip: noKvm }, async (t) => {
  const count = 100_000;
  const machine = await Machine.create({ image: floodGuest(count), memoryBytes: 1 << 20, pool, log });
  machine.start();
  // Nobody reads while the guest prints: it must still reach its exit.
  const exit = await machine.wait();
  t.same({ reason: exit.reason, code: exit.code }, { reason: 'debug-exit', code: 7 });
  t.equal(machine.console.droppedBytes, count - CONSOLE_BACKLOG_BYTES, 'all but the last 64 KiB were dropped');
  const kept = await readToEnd(machine.console);
  const expected = Buffer.from(Array.from({ length: CONSOLE_BACKLOG_BYTES }, (_, i) => (CONSOLE_BACKLOG_BYTES - i) & 0xff));
  t.equal(kept.length, CONSOLE_BACKLOG_BYTES);
  t.ok(kept.equals(expected), 'the kept bytes are the last the guest wrote, in order');
});

t.test('with serial output of its own, the console gives nothing and ends with the machine', { skip: noKvm }, async (t) => {
  const sink = new PassThrough();
  let printed = '';
  sink.on('data', (chunk: Buffer) => (printed += chunk.toString('latin1')));
  const machine = await Machine.create({ image: guestImage('hello'), memoryBytes: 1 << 20, pool, log, serial: { output: sink } });
  const read = readToEnd(machine.console);
  machine.start();
  await machine.wait();
  t.equal((await read).length, 0);
  t.equal(printed, 'Hello from node-kvm!\n');
});

t.test('a write to the console after the machine has ended fails with ERR_MACHINE_STATE', { skip: noKvm }, async (t) => {
  const machine = await Machine.create({ image: guestImage('hello'), memoryBytes: 1 << 20, pool, log, serial: { output: null } });
  machine.start();
  await machine.wait();
  const failed = once(machine.console, 'error');
  machine.console.write('late');
  const [error] = await failed;
  t.match(error, { name: 'NodeKvmError', code: 'ERR_MACHINE_STATE', message: exactly('machine is stopped: its console takes no more input') });
});
