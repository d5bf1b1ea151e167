// The control API's stop and reset on a real machine: stop ends it as stop() does, reset as the
// guest's own reset through the i8042 does (the machine ends with exit reason 'reset').
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import t, { type Test } from 'tap';
import { callApi } from '../../lib/cli/api-client.js';
import { apiMachine, startApiServer } from '../../lib/cli/api-server.js';
import { Machine } from '../../lib/vmm/machine.js';
import { noKvm, repoRoot } from '../helpers/kvm.js';
import { sharedPool } from '../helpers/pool.js';

const echoImage = path.join(repoRoot, 'guests', 'build', 'echo.bin');
if (!noKvm) sharedPool();

/** The echo guest running (waiting for input), served by the API on a fresh socket. */
async function served(t: Test): Promise<{ machine: Machine; socketPath: string }> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nkvm-api-'));
  const socketPath = path.join(dir, 'api.sock');
  const machine = await Machine.create({ image: echoImage, memoryBytes: 1024 * 1024, pool: sharedPool() });
  const server = await startApiServer(socketPath, apiMachine(machine));
  t.teardown(async () => {
    await machine.stop();
    await server.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });
  machine.start();
  return { machine, socketPath };
}

t.test('reset ends the machine as a guest reset does; a machine already ending refuses it', { skip: noKvm }, async (t) => {
  const { machine, socketPath } = await served(t);
  t.same(await callApi(socketPath, 'reset', {}), { state: 'stopping' });
  const exit = await machine.wait();
  t.equal(exit.reason, 'reset');
  t.equal(machine.state, 'stopped');
  await t.rejects(callApi(socketPath, 'reset', {}), { code: 'ERR_MACHINE_STATE', message: 'machine is stopped: there is no guest to reset' });
});

t.test('stop ends a paused machine too, with exit reason stopped', { skip: noKvm }, async (t) => {
  const { machine, socketPath } = await served(t);
  t.same(await callApi(socketPath, 'pause', {}), { state: 'paused' });
  t.same(await callApi(socketPath, 'stop', {}), { state: 'stopping' });
  t.same(await machine.wait(), { reason: 'stopped' });
  t.same(await callApi(socketPath, 'stop', {}), { state: 'stopped' }, 'and again: nothing more to do');
});
