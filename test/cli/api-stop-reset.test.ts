// The control API's stop and reset on a real machine: stop ends it as stop() does; reset reboots
// the guest (Machine.reset(), as QEMU's system_reset): it starts over from its image, with RAM
// cleared, while the machine runs on.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { PassThrough } from 'node:stream';
import t, { type Test } from 'tap';
import { callApi } from '../../lib/cli/api-client.js';
import { apiMachine, startApiServer } from '../../lib/cli/api-server.js';
import { Machine } from '../../lib/vmm/machine.js';
import { noKvm, repoRoot } from '../helpers/kvm.js';
import { sharedPool } from '../helpers/pool.js';

const echoImage = path.join(repoRoot, 'guests', 'build', 'echo.bin');
if (!noKvm) sharedPool();

/** The echo guest running (waiting for input), served by the API on a fresh socket. */
async function served(t: Test): Promise<{ machine: Machine; socketPath: string; output: () => string; waitFor: (text: string, count?: number) => Promise<void> }> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nkvm-api-'));
  const socketPath = path.join(dir, 'api.sock');
  const sink = new PassThrough();
  let output = '';
  const waiters: (() => void)[] = [];
  sink.on('data', (chunk: Buffer) => {
    output += chunk.toString('latin1');
    for (const wake of waiters.splice(0)) wake();
  });
  const machine = await Machine.create({ image: echoImage, memoryBytes: 1024 * 1024, pool: sharedPool(), serial: { output: sink } });
  const server = await startApiServer(socketPath, apiMachine(machine));
  t.teardown(async () => {
    await machine.stop();
    await server.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });
  machine.start();
  const waitFor = async (text: string, count = 1) => {
    while (output.split(text).length - 1 < count) await new Promise<void>((resolve) => waiters.push(resolve));
  };
  return { machine, socketPath, output: () => output, waitFor };
}

t.test('reset reboots the guest: it prints its prompt again and echoes what comes next', { skip: noKvm }, async (t) => {
  const { machine, socketPath, output, waitFor } = await served(t);
  const events: string[] = [];
  for (const name of ['paused', 'reset', 'resumed'] as const) machine.on(name, () => events.push(name));
  await waitFor('echo> ');
  machine.console.write('ab');
  await waitFor('echo> ab');
  t.same(await callApi(socketPath, 'reset', {}), { state: 'running' });
  t.same(events, ['paused', 'reset', 'resumed'], 'paused for it, rebooted, running again');
  await waitFor('echo> ', 2);
  machine.console.write('cq');
  const exit = await machine.wait();
  t.same({ reason: exit.reason, code: exit.code }, { reason: 'debug-exit', code: 5 }, 'the rebooted guest ran to its own exit');
  t.equal(output(), 'echo> abecho> cq');
});

t.test('a paused guest reboots and stays paused; a machine already ending refuses', { skip: noKvm }, async (t) => {
  const { machine, socketPath, output, waitFor } = await served(t);
  await waitFor('echo> ');
  t.same(await callApi(socketPath, 'pause', {}), { state: 'paused' });
  t.same(await callApi(socketPath, 'reset', {}), { state: 'paused' });
  t.equal(output(), 'echo> ', 'nothing ran while paused');
  t.same(await callApi(socketPath, 'resume', {}), { state: 'running' });
  await waitFor('echo> ', 2);
  t.same(await callApi(socketPath, 'stop', {}), { state: 'stopping' });
  await machine.wait();
  await t.rejects(callApi(socketPath, 'reset', {}), { code: 'ERR_MACHINE_STATE', message: 'machine is stopped: there is no guest to reset' });
});

t.test('stop ends a paused machine too, with exit reason stopped', { skip: noKvm }, async (t) => {
  const { machine, socketPath } = await served(t);
  t.same(await callApi(socketPath, 'pause', {}), { state: 'paused' });
  t.same(await callApi(socketPath, 'stop', {}), { state: 'stopping' });
  t.same(await machine.wait(), { reason: 'stopped' });
  t.same(await callApi(socketPath, 'stop', {}), { state: 'stopped' }, 'and again: nothing more to do');
});
