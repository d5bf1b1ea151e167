// A machine's states (created, running, paused, stopping, stopped), every transition between
// them, the calls each state refuses (code ERR_MACHINE_STATE, naming the state), and the
// 'paused', 'resumed' and 'exit' events in their order against the calls that cause them.
import t from 'tap';
import { Machine, type MachineRunState } from '../../lib/index.js';
import { guestImage, noKvm } from '../helpers/kvm.js';
import { exactly } from '../helpers/machine.js';
import { sharedPool } from '../helpers/pool.js';

const pool = noKvm ? undefined : sharedPool();
const quiet = { serial: { output: null }, log: () => {} };
const MACHINE_STATE = 'ERR_MACHINE_STATE';
const refused = (message: string) => ({ name: 'NodeKvmError', code: MACHINE_STATE, message: exactly(message) });

/** A spinning guest (it never exits on its own), with every event it emits recorded in order. */
async function spinner(): Promise<{ machine: Machine; events: string[] }> {
  const machine = await Machine.create({ image: guestImage('spin'), memoryBytes: 1 << 20, pool, ...quiet });
  const events: string[] = [];
  const record = (name: string) => () => events.push(`${name} (${machine.state})`);
  machine.on('paused', record('paused'));
  machine.on('resumed', record('resumed'));
  machine.on('exit', (exit) => events.push(`exit ${exit.reason} (${machine.state})`));
  return { machine, events };
}

t.test('created -> running -> paused -> running -> stopping -> stopped, with each event once, in order', { skip: noKvm }, async (t) => {
  const { machine, events } = await spinner();
  t.equal(machine.state, 'created');
  const created = await machine.saveState();
  t.equal(created.vcpus.length, 1, 'a created machine saves its state');
  t.throws(() => machine.resume(), refused('machine is created, not paused'));
  await t.rejects(machine.pause(), refused('machine is created, not running'));

  machine.start();
  t.equal(machine.state, 'running');
  t.throws(() => machine.start(), refused('machine is running, not created'));
  t.throws(() => machine.resume(), refused('machine is running, not paused'));
  await t.rejects(machine.saveState(), refused('machine is running: pause it before saving its state'));

  const pausing = machine.pause().then(() => events.push(`pause() resolved (${machine.state})`));
  t.equal(machine.state, 'paused', 'paused at once: no vCPU enters the guest again');
  await t.rejects(machine.pause(), refused('machine is paused, not running'), 'a second pause() while the first is under way');
  await pausing;
  t.same(events, ['paused (paused)', 'pause() resolved (paused)'], "'paused' comes once every vCPU is parked, before pause() resolves");
  t.throws(() => machine.start(), refused('machine is paused, not created'));
  const paused = await machine.saveState();
  t.equal(paused.vcpus.length, 1, 'a paused machine saves its state');

  events.length = 0;
  machine.resume();
  events.push(`resume() returned (${machine.state})`);
  t.same(events, ['resumed (running)', 'resume() returned (running)'], "'resumed' comes once the guest runs, before resume() returns");

  events.length = 0;
  const waited = machine.wait().then((exit) => events.push(`wait() resolved ${exit.reason} (${machine.state})`));
  const stopped = machine.stop();
  t.equal(machine.state, 'stopping', 'stopping while the vCPU threads leave and everything is released');
  const exit = await stopped;
  await waited;
  t.same(exit, { reason: 'stopped' });
  t.equal(machine.state, 'stopped');
  t.same(events, ['exit stopped (stopped)', 'wait() resolved stopped (stopped)'], "'exit' and wait() come once the machine is stopped");
  t.equal(await machine.stop(), exit, 'stop() twice resolves with the same exit');
  t.same(events.filter((event) => event.startsWith('exit')), ['exit stopped (stopped)'], "'exit' is emitted once");
});

t.test('after the end every call but stop() and wait() is refused, naming the state', { skip: noKvm }, async (t) => {
  const { machine } = await spinner();
  machine.start();
  const stopping = machine.stop();
  t.equal(machine.state, 'stopping');
  await t.rejects(machine.saveState(), refused('machine is stopping: it has no state left to save'));
  t.throws(() => machine.writeMemory(0x1000, new Uint8Array(4)), refused('machine is stopping: its memory is released'));
  t.throws(() => machine.sendSerialInput(new Uint8Array([0x61])), refused('machine is stopping: it takes no more serial input'));
  await t.rejects(machine.pause(), refused('machine is stopping, not running'));
  await stopping;

  t.equal(machine.state, 'stopped');
  t.throws(() => machine.start(), refused('machine is stopped, not created'), 'start after stop');
  await t.rejects(machine.pause(), refused('machine is stopped, not running'), 'pause after the end');
  t.throws(() => machine.resume(), refused('machine is stopped, not paused'));
  await t.rejects(machine.saveState(), refused('machine is stopped: it has no state left to save'));
  t.throws(() => machine.writeMemory(0x1000, new Uint8Array(4)), refused('machine is stopped: its memory is released'));
  t.throws(() => machine.sendSerialInput(new Uint8Array([0x61])), refused('machine is stopped: it takes no more serial input'));
  t.same(await machine.stop(), { reason: 'stopped' }, 'stop() after the end resolves with the exit');
  t.same(await machine.wait(), { reason: 'stopped' });
});

t.test('stop a machine that was never started', { skip: noKvm }, async (t) => {
  const { machine, events } = await spinner();
  const stopped = machine.stop();
  t.equal(machine.state, 'stopping');
  t.same(await stopped, { reason: 'stopped' });
  t.equal(machine.state, 'stopped');
  t.same(events, ['exit stopped (stopped)']);
});

t.test('start({ paused: true }) goes from created to paused without an event; stop it there', { skip: noKvm }, async (t) => {
  const { machine, events } = await spinner();
  machine.start({ paused: true });
  t.equal(machine.state, 'paused');
  t.same(events, [], 'start() emits neither paused nor resumed');
  t.equal((await machine.saveState()).vcpus.length, 1);
  t.throws(() => machine.start({ paused: 'yes' } as never), refused('machine is paused, not created'));
  t.same(await machine.stop(), { reason: 'stopped' });
  t.equal(machine.state, 'stopped');
  t.same(events, ['exit stopped (stopped)']);
});

t.test('a stop() during a pause() makes the pause reject, and no paused event comes', { skip: noKvm }, async (t) => {
  const { machine, events } = await spinner();
  machine.start();
  const pausing = machine.pause();
  const stopped = machine.stop();
  await t.rejects(pausing, { code: MACHINE_STATE, message: /^machine is (stopping|stopped), not paused$/ });
  await stopped;
  t.same(events, ['exit stopped (stopped)']);
});

t.test('a guest that exits on its own ends stopped, and its exit is emitted once stopped', { skip: noKvm }, async (t) => {
  const machine = await Machine.create({ image: guestImage('hello'), memoryBytes: 1 << 20, pool, ...quiet });
  const seen: MachineRunState[] = [];
  machine.once('exit', () => seen.push(machine.state));
  machine.start();
  const exit = await machine.wait();
  t.same({ reason: exit.reason, code: exit.code }, { reason: 'hlt', code: 0 });
  t.same(seen, ['stopped']);
  t.equal(machine.state, 'stopped');
  t.equal(await machine.stop(), exit, 'stop() after the guest ended resolves with the guest\'s exit');
});

t.test('argument errors of the lifecycle calls carry their codes', { skip: noKvm }, async (t) => {
  const { machine } = await spinner();
  t.teardown(() => machine.stop());
  t.throws(() => machine.start(null as never), { name: 'TypeError', code: 'ERR_INVALID_ARG_TYPE', message: exactly('options must be an object') });
  t.throws(() => machine.sendSerialInput('text' as never), { name: 'TypeError', code: 'ERR_INVALID_ARG_TYPE', message: exactly('bytes must be a Uint8Array') });
  t.equal(machine.state, 'created');
});
