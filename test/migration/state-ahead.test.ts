// What a live migration prepares ahead of its pause, so that less is done inside the downtime.
// The devices' state (but the virtio devices') goes ahead, and at the end only the devices whose
// state changed since (SectionType.DeviceStateAhead): the destination puts the first on its
// machine before it answers the last Sync, then the rest. Here: which devices go again, that the
// two parts put together are the source's state exactly, and the value comparison that decides
// it. (A migration with it end to end: live.test.ts; damaged or misplaced sections:
// faults.test.ts.) And the last state's Config section, encoded before the pause.
import t from 'tap';
import { Machine } from '../../lib/index.js';
import { SectionType } from '../../lib/migration/format.js';
import { decodeState, encodeState, sameState } from '../../lib/migration/state-codec.js';
import { DeviceStatesSentAhead, FinalConfigSections, StateSectionReader, decodeDeviceStatesAhead, encodeConfigSection, encodeCpuState, mergeDeviceStates } from '../../lib/migration/state-sections.js';
import { isDeviceStatesAhead, type DeviceStates, type DeviceStatesAhead } from '../../lib/vmm/devices.js';
import { machineInternals } from '../../lib/vmm/machine.js';
import { guestImage, noKvm } from '../helpers/kvm.js';
import { sharedPool } from '../helpers/pool.js';

const pool = noKvm ? undefined : sharedPool(2);
const log = () => {};

t.test('sameState: equal as encoded and decoded, key order aside', async (t) => {
  t.ok(sameState({ a: 1, b: [1, 2, { c: 'x' }] }, { b: [1, 2, { c: 'x' }], a: 1 }), 'key order does not count');
  t.ok(sameState({ a: 1, gone: undefined }, { a: 1 }), 'an undefined property is left out as encoding leaves it out');
  t.ok(sameState(Uint8Array.of(1, 2, 3), Uint8Array.of(1, 2, 3)), 'bytes by value');
  t.ok(sameState(NaN, NaN), 'NaN encodes as NaN');
  t.ok(sameState(5n, 5n), 'bigints by value');
  t.notOk(sameState(Uint8Array.of(1, 2, 3), Uint8Array.of(1, 2, 4)), 'one byte differs');
  t.notOk(sameState(Uint8Array.of(1, 2), [1, 2]), 'bytes are not an array of numbers');
  t.notOk(sameState(0, -0), '-0 is encoded apart from 0');
  t.notOk(sameState([1, 2], [1, 2, 3]), 'another length');
  t.notOk(sameState({ a: 1 }, { a: 1, b: 2 }), 'another key');
  t.notOk(sameState({ a: [1, { b: 2 }] }, { a: [1, { b: 3 }] }), 'a change deep down');
  t.notOk(sameState(null, {}), 'null is not an empty object');
  t.notOk(sameState(1, '1'), 'a number is not its text');
  // What the comparison stands for: the encodings agree wherever it says the values do.
  const value = { serial: { ier: 1, input: [65] }, fwCfg: { items: [{ key: 1, data: Uint8Array.of(9) }] } };
  t.ok(sameState(value, decodeState(encodeState(value), 'test')), 'a value and its decoded encoding');
});

t.test('the devices\' state ahead of the pause, then the ones that changed: put together, the source\'s state', { skip: noKvm }, async (t) => {
  const source = await Machine.create({ image: guestImage('hello'), memoryBytes: 1 << 20, pool, log });
  const destination = await Machine.create({ image: guestImage('hello'), memoryBytes: 1 << 20, pool, log });
  t.teardown(async () => {
    await source.stop();
    await destination.stop();
  });
  const from = machineInternals(source);
  const to = machineInternals(destination);

  const ahead = new DeviceStatesSentAhead(from.saveDeviceStateAhead());
  // The section as the destination reads it.
  const payload = ahead.section.subarray(8, ahead.section.length - 4);
  const part = decodeDeviceStatesAhead({ type: SectionType.DeviceStateAhead, name: 'DeviceStateAhead', flags: 0, payload }, 'the test');
  t.same(Object.keys(part).sort(), ['acpiPm', 'cmosRtc', 'elcr', 'fwCfg', 'pciConfig', 'postCode', 'serial'], 'every device but the virtio ones goes ahead');
  to.applyDeviceStateAhead(part);

  // Serial input arrives after the state went ahead: the serial port's state changes.
  await new Promise((resolve) => source.console.write('xy', resolve));
  const devices = from.saveDeviceState();
  t.same(devices.serial.input, [0x78, 0x79], 'the source holds the input');
  const changed = ahead.changed(devices);
  t.ok(Object.hasOwn(changed, 'serial'), 'the serial port goes again');
  for (const key of ['postCode', 'elcr', 'pciConfig', 'fwCfg', 'cmosRtc']) t.notOk(Object.hasOwn(changed, key), `${key} does not go again`);

  // At the end, through the stream's encoding.
  const merged = mergeDeviceStates(part, decodeState(encodeState(changed), 'the test'), 'the test');
  t.notOk(merged.appliedAhead.has('serial'), 'the serial port is applied again');
  t.ok(merged.appliedAhead.has('fwCfg'), 'fw_cfg stays as it was put ahead');
  to.applyDeviceState(merged.devices, merged.appliedAhead);
  const arrived = to.saveDeviceState();
  const { acpiPm: _sourceTimer, ...sourceRest } = devices;
  const { acpiPm: _destinationTimer, ...destinationRest } = arrived;
  t.ok(sameState(destinationRest, sourceRest), 'the destination\'s devices hold the source\'s state (the PM timer runs on by itself)');
  t.same(arrived.serial.input, [0x78, 0x79], 'the input waits at the destination');
});

t.test('what a source sends ahead is checked as the destination checks it', async (t) => {
  const ahead = new DeviceStatesSentAhead({ postCode: { lastCode: 7, writes: 1 }, cmosRtc: { index: 0, cmos: [1], offsetMs: 0, flags: 0 } } as unknown as DeviceStatesAhead);
  const payload = ahead.section.subarray(8, ahead.section.length - 4);
  t.same(decodeState(payload, 'the test'), { postCode: { lastCode: 7, writes: 1 } }, 'a device whose state does not check out stays for the end');
  const devices = { serial: { ier: 0 }, postCode: { lastCode: 7, writes: 1 }, cmosRtc: { index: 0, cmos: new Array(128).fill(0), offsetMs: 0, flags: 0 } } as unknown as DeviceStates;
  t.same(Object.keys(ahead.changed(devices)).sort(), ['cmosRtc', 'serial'], 'and goes at the end, with those never sent');
  t.notOk(isDeviceStatesAhead({ virtio: [] }), 'the virtio devices never go ahead');
  t.throws(() => mergeDeviceStates({ postCode: { lastCode: 7, writes: 1 } }, {}, 'the test'), { code: 'EFORMAT', message: 'the test: no device state' }, 'the whole state must be there in the end');
  t.throws(() => mergeDeviceStates({}, { serial: {}, postCode: {}, elcr: { registers: 'x' } }, 'the test'), { code: 'EFORMAT', message: 'the test: the device state is malformed' });
});

t.test('the last state\'s Config section, encoded before the pause, is the one encoded at the end', async (t) => {
  const shape = { memoryBytes: 2 << 20, vcpus: 1, irqchip: true };
  const configs = new FinalConfigSections(shape);
  const same = { ...shape };
  t.same(configs.get({ shape: same, running: true }), encodeConfigSection({ machine: shape, running: true }), 'running, for an equal shape object');
  t.same(configs.get({ shape: same, running: false }), encodeConfigSection({ machine: shape, running: false }), 'paused by its owner');
  t.equal(configs.get({ shape: { ...shape, vcpus: 2 }, running: true }), undefined, 'none for another shape');
  t.equal(configs.get({ shape }), undefined, 'none without a running flag');
  const state = { shape: same, running: true, vm: Uint8Array.of(1, 2, 3), vcpus: [{ regs: { rip: 16 } }] };
  t.same(encodeCpuState(state, configs), encodeCpuState(state), 'the same bytes as encoded at the end');
  t.same(encodeCpuState({ ...state, shape: { ...shape, vcpus: 2 } }, configs), encodeCpuState({ ...state, shape: { ...shape, vcpus: 2 } }), 'another shape is encoded at the end');
});

t.test('a destination takes the last state\'s Config as the machine it announced, without decoding it again', async (t) => {
  const announced = { memoryBytes: 2 << 20, vcpus: 1, irqchip: true };
  const expected = { machine: announced, running: true };
  const reader = new StateSectionReader('the test', 1);
  reader.expectConfig(expected);
  const section = (bytes: Uint8Array) => ({ type: SectionType.Config, name: 'Config' as const, flags: 0, payload: bytes.subarray(8, bytes.length - 4) });
  reader.take(section(new FinalConfigSections({ ...announced }).get({ shape: announced, running: true })!));
  t.equal(reader.config, expected, 'the very record it expected: nothing decoded');
  const other = new StateSectionReader('the test', 1);
  other.expectConfig(expected);
  other.take(section(encodeConfigSection({ machine: announced, running: false })));
  t.not(other.config, expected, 'another Config is decoded as ever');
  t.same(other.config, { machine: announced, running: false });
});
