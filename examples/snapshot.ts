// Snapshots: a running guest saved to a file, then run again from that file in a new machine,
// which goes on from where the first one was. The echo guest's state (what it was typed so far)
// is in its registers and RAM, so the restored guest carries on the same line.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { Machine, type MachineConsole } from 'node-kvm';

/** Resolves with everything `console` has printed once it includes `text`. */
function readUntil(console: MachineConsole, text: string): Promise<string> {
  let output = '';
  return new Promise((resolve) => {
    const onData = (chunk: Buffer) => {
      output += chunk.toString('latin1');
      if (output.includes(text)) {
        console.off('data', onData);
        resolve(output);
      }
    };
    console.on('data', onData);
  });
}

const dir = mkdtempSync(path.join(tmpdir(), 'node-kvm-example-'));
try {
  const file = path.join(dir, 'echo.snap');
  const machine = await Machine.create({ image: new URL('../../guests/build/echo.bin', import.meta.url).pathname, memoryBytes: 1 << 20 });
  const typed = readUntil(machine.console, 'echo> ab');
  machine.start();
  machine.console.write('ab');
  await typed;
  // Pauses the guest, writes its state and RAM (zero pages as holes), and lets it run on.
  const info = await machine.snapshot(file);
  console.log(`snapshot: ${info.pagesWritten} pages written, guest paused ${info.pausedMs < 1000 ? 'under a second' : `${info.pausedMs} ms`}`);
  await machine.stop();

  // RAM is mapped from the file copy-on-write; verify checks its checksum first.
  const restored = await Machine.restore(file, { verify: true });
  const output = readUntil(restored.console, 'q');
  restored.start();
  restored.console.write('q');
  console.log(`restored guest printed ${JSON.stringify(await output)}`);
  const exit = await restored.wait();
  console.log(`exit: ${exit.reason} ${exit.code}`);
} finally {
  rmSync(dir, { recursive: true, force: true });
}
