// fw_cfg on its own: the item encodings byte by byte (QEMU's docs/specs/fw_cfg.rst and its
// fw_cfg.c layouts), the port interface, DMA transfers, hostile DMA descriptors, and saved state.
import t from 'tap';
import {
  FW_CFG_DMA_ACCESS_BYTES, FwCfg, FwCfgDma, FwCfgKey, encodeE820, encodeFileDir, fwCfgItems, isFwCfgState, type FwCfgMachine, type FwCfgState,
} from '../../lib/devices/fw-cfg.js';
import { isDeviceStates } from '../../lib/vmm/devices.js';
import { memoryMap } from '../../lib/boot/index.js';
import { machineStateOf } from '../../lib/migration/state-sections.js';

const MiB = 1024 * 1024;
const RAM_BYTES = 64 * 1024;
const SELECTOR = 0; // offsets from 0x510
const DATA = 1;
const DMA_HIGH = 0; // offsets from 0x514
const DMA_LOW = 4;
const DESCRIPTOR = 0x1000;
const BUFFER = 0x2000;

const machineFacts = (overrides: Partial<FwCfgMachine> = {}): FwCfgMachine => ({
  memoryBytes: 64 * MiB, vcpus: 2, cmdline: 'console=ttyS0 quiet', memoryMap: memoryMap(64 * MiB), ...overrides,
});

/** A device over `RAM_BYTES` of fake guest RAM, recording the ranges it marks dirty. */
function device(facts = machineFacts()) {
  const ram = new Uint8Array(RAM_BYTES);
  const marked: [number, number][] = [];
  const shared = FwCfg.createShared(fwCfgItems(facts));
  const fwCfg = new FwCfg(shared, { bytes: () => ram, dirty: { mark: (addr, length) => marked.push([addr, length]) } });
  return { fwCfg, shared, ram, marked };
}

const be32 = (value: number) => (((value & 0xff) << 24) | ((value & 0xff00) << 8) | ((value >>> 8) & 0xff00) | (value >>> 24)) >>> 0;

/** What a guest does: a 16-bit write of the key to 0x510. */
const select = (fwCfg: FwCfg, key: number) => fwCfg.port.write(SELECTOR, 2, key);
const readBytes = (fwCfg: FwCfg, count: number) => Array.from({ length: count }, () => fwCfg.port.read(DATA, 1));

/** Writes a FWCfgDmaAccess at `at` (big-endian fields). */
function putDescriptor(ram: Uint8Array, at: number, control: number, length: number, address: bigint) {
  const view = new DataView(ram.buffer, at, FW_CFG_DMA_ACCESS_BYTES);
  view.setUint32(0, control);
  view.setUint32(4, length);
  view.setBigUint64(8, address);
}

/** The two 32-bit big-endian halves, as `outl` of htobe32() writes them: high at 0x514, then low at 0x518. */
function startDma(fwCfg: FwCfg, descriptorAddr: bigint) {
  fwCfg.dmaPort.write(DMA_HIGH, 4, be32(Number(descriptorAddr >> 32n)));
  fwCfg.dmaPort.write(DMA_LOW, 4, be32(Number(descriptorAddr & 0xffffffffn)));
}

const controlAt = (ram: Uint8Array, at: number) => new DataView(ram.buffer).getUint32(at);

t.test('items: signature, ID, RAM size, CPU counts, command line, exact bytes', async (t) => {
  const items = new Map(fwCfgItems(machineFacts()).map((item) => [item.key, [...item.data]]));
  t.same(items.get(FwCfgKey.Signature), [0x51, 0x45, 0x4d, 0x55], '"QEMU"');
  t.same(items.get(FwCfgKey.Id), [3, 0, 0, 0], 'u32 LE: traditional interface and DMA');
  t.same(items.get(FwCfgKey.RamSize), [0, 0, 0, 4, 0, 0, 0, 0], 'u64 LE 64 MiB');
  t.same(items.get(FwCfgKey.NbCpus), [2, 0]);
  t.same(items.get(FwCfgKey.MaxCpus), [2, 0]);
  t.same(items.get(FwCfgKey.CmdlineSize), [20, 0, 0, 0], 'u32 LE, counting the NUL');
  t.same(items.get(FwCfgKey.CmdlineData), [...Buffer.from('console=ttyS0 quiet\0')]);
  const keys = fwCfgItems(machineFacts()).map((item) => item.key);
  t.same(keys, [0x00, 0x01, 0x03, 0x05, 0x0f, 0x14, 0x15, 0x19, 0x20], 'these keys and no others, sorted');

  const bare = new Map(fwCfgItems(machineFacts({ cmdline: undefined, vcpus: 1 })).map((item) => [item.key, [...item.data]]));
  t.same(bare.get(FwCfgKey.CmdlineSize), [0, 0, 0, 0], 'no command line: size 0');
  t.same(bare.get(FwCfgKey.CmdlineData), [], 'and no data');
  t.same(bare.get(FwCfgKey.NbCpus), [1, 0]);
  t.same(new Map(fwCfgItems(machineFacts({ cmdline: '' })).map((item) => [item.key, [...item.data]])).get(FwCfgKey.CmdlineData), [0], 'an empty command line is one NUL');
  t.throws(() => fwCfgItems(machineFacts({ cmdline: 'a\0b' })), { code: 'ERR_INVALID_ARG_VALUE' });
  t.throws(() => fwCfgItems(machineFacts({ vcpus: 0 })), RangeError);
});

t.test('the file directory and etc/e820, exact bytes', async (t) => {
  const map = [
    { addr: 0n, size: 0x9fc00n, type: 1 },
    { addr: 0x100000n, size: 0x3f00000n, type: 1 },
    { addr: 0xfffff000n, size: 0x1000n, type: 2 },
  ];
  const e820 = encodeE820(map);
  t.equal(e820.length, 60, '20 bytes per entry, packed');
  t.same([...e820.subarray(0, 20)], [0, 0, 0, 0, 0, 0, 0, 0, 0x00, 0xfc, 0x09, 0, 0, 0, 0, 0, 1, 0, 0, 0], '{u64 addr, u64 length, u32 type} LE');
  t.same([...e820.subarray(40, 60)], [0x00, 0xf0, 0xff, 0xff, 0, 0, 0, 0, 0x00, 0x10, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0]);

  const dir = encodeFileDir([{ name: 'etc/e820', size: 60 }, { name: 'opt/x', size: 0x12345 }]);
  t.equal(dir.length, 4 + 2 * 64);
  t.same([...dir.subarray(0, 4)], [0, 0, 0, 2], 'count: u32 BE');
  const name = [...Buffer.from('etc/e820')];
  t.same([...dir.subarray(4, 68)], [0, 0, 0, 60, 0x00, 0x20, 0, 0, ...name, ...new Array(56 - name.length).fill(0)], 'size BE, select BE 0x20, reserved, name[56]');
  t.same([...dir.subarray(68, 76)], [0, 0x01, 0x23, 0x45, 0x00, 0x21, 0, 0], 'the next file gets key 0x21');
  t.throws(() => encodeFileDir([{ name: 'x'.repeat(56), size: 0 }]), { code: 'ERR_INVALID_ARG_VALUE' }, 'a name needs room for its NUL');

  const items = new Map(fwCfgItems(machineFacts()).map((item) => [item.key, item.data]));
  const machineDir = items.get(FwCfgKey.FileDir)!;
  t.equal(new DataView(machineDir.buffer).getUint32(0), 1, 'a machine has one file');
  t.equal(Buffer.from(machineDir.subarray(12, 20)).toString('latin1'), 'etc/e820');
  t.same(items.get(0x20), encodeE820(memoryMap(64 * MiB)), 'etc/e820 is the loader\'s memory map');
  t.equal(new DataView(machineDir.buffer).getUint32(4), items.get(0x20)!.length, 'and the directory gives its size');
});

t.test('the port interface: select, stream, past the end, unknown keys, ignored writes', async (t) => {
  const { fwCfg } = device();
  t.same(readBytes(fwCfg, 4), [0x51, 0x45, 0x4d, 0x55], 'the signature is selected at reset');
  t.same(readBytes(fwCfg, 2), [0, 0], 'past the end: zeros');
  select(fwCfg, FwCfgKey.NbCpus);
  t.equal(fwCfg.offset, 0);
  t.same(readBytes(fwCfg, 1), [2]);
  fwCfg.port.write(DATA, 1, 0x55);
  fwCfg.port.write(SELECTOR, 1, FwCfgKey.Id);
  t.equal(fwCfg.selector, FwCfgKey.NbCpus, 'byte writes neither write nor select');
  t.same(readBytes(fwCfg, 2), [0, 0]);
  select(fwCfg, FwCfgKey.NbCpus);
  t.same(readBytes(fwCfg, 2), [2, 0], 'selecting again starts over');
  select(fwCfg, FwCfgKey.Signature);
  t.equal(fwCfg.port.read(SELECTOR, 1), 0x51, 'a byte read at 0x510 reads data too (QEMU\'s combined port)');
  t.equal(fwCfg.port.read(DATA, 2), 0, 'wider reads are not data reads');
  t.equal(fwCfg.port.read(DATA, 1), 0x45, 'and do not move the offset');
  select(fwCfg, 0x1234);
  t.same(readBytes(fwCfg, 3), [0, 0, 0], 'an unknown key reads as an empty item');
  select(fwCfg, 0x4000 | FwCfgKey.Signature);
  t.same(readBytes(fwCfg, 1), [0], 'keys are exact: the old write bit makes another (empty) key');
});

t.test('the DMA register reads as "QEMU CFG", first byte at 0x514', async (t) => {
  const { fwCfg } = device();
  t.equal(fwCfg.dmaPort.read(0, 4), 0x554d4551, 'inl(0x514): "QEMU" in memory order (be32 0x51454d55)');
  t.equal(fwCfg.dmaPort.read(4, 4), 0x47464320, 'inl(0x518): " CFG"');
  t.same([0, 1, 2, 3, 4, 5, 6, 7].map((at) => fwCfg.dmaPort.read(at, 1)), [...Buffer.from('QEMU CFG')]);
  t.equal(fwCfg.dmaPort.read(6, 2), 0x4746);
});

t.test('DMA: select and read, zeros past the end, skip, marks what it wrote', async (t) => {
  const { fwCfg, ram, marked } = device();
  const e820 = encodeE820(memoryMap(64 * MiB));
  putDescriptor(ram, DESCRIPTOR, (0x20 << 16) | FwCfgDma.Select | FwCfgDma.Read, e820.length, BigInt(BUFFER));
  ram.fill(0xee, BUFFER, BUFFER + 256);
  startDma(fwCfg, BigInt(DESCRIPTOR));
  t.equal(controlAt(ram, DESCRIPTOR), 0, 'control written back 0');
  t.same(ram.subarray(BUFFER, BUFFER + e820.length), e820, 'etc/e820 in guest RAM');
  t.equal(ram[BUFFER + e820.length], 0xee, 'not a byte more');
  t.same(marked, [[BUFFER, e820.length], [DESCRIPTOR, 4]], 'the buffer and the control word are marked dirty');
  t.equal(fwCfg.selector, 0x20);
  t.equal(fwCfg.offset, e820.length);

  // The command line: skip 8 bytes, then read 32 (12 of it and 20 zeros).
  marked.length = 0;
  putDescriptor(ram, DESCRIPTOR, (FwCfgKey.CmdlineData << 16) | FwCfgDma.Select | FwCfgDma.Skip, 8, 0xdead0000n);
  startDma(fwCfg, BigInt(DESCRIPTOR));
  t.equal(controlAt(ram, DESCRIPTOR), 0, 'a skip touches no buffer (its address is not even looked at)');
  t.equal(fwCfg.offset, 8);
  t.same(marked, [[DESCRIPTOR, 4]]);
  putDescriptor(ram, DESCRIPTOR, FwCfgDma.Read, 32, BigInt(BUFFER));
  startDma(fwCfg, BigInt(DESCRIPTOR));
  t.equal(controlAt(ram, DESCRIPTOR), 0);
  t.equal(Buffer.from(ram.subarray(BUFFER, BUFFER + 32)).toString('latin1'), 'ttyS0 quiet\0' + '\0'.repeat(20), 'the rest, then zeros');
  t.equal(fwCfg.offset, 20, 'the offset stops at the end of the item');
  t.same(fwCfg.port.read(DATA, 1), 0, 'and the port agrees');

  // A 32-bit address needs only the low write (the high half is 0 after every transfer).
  putDescriptor(ram, DESCRIPTOR, (FwCfgKey.Signature << 16) | FwCfgDma.Select | FwCfgDma.Read, 4, BigInt(BUFFER));
  fwCfg.dmaPort.write(DMA_LOW, 4, be32(DESCRIPTOR));
  t.equal(Buffer.from(ram.subarray(BUFFER, BUFFER + 4)).toString('latin1'), 'QEMU');
  // Select alone: no transfer, control 0.
  putDescriptor(ram, DESCRIPTOR, (FwCfgKey.Id << 16) | FwCfgDma.Select, 100, BigInt(BUFFER));
  startDma(fwCfg, BigInt(DESCRIPTOR));
  t.equal(controlAt(ram, DESCRIPTOR), 0);
  t.equal(fwCfg.selector, FwCfgKey.Id);
  t.same(readBytes(fwCfg, 4), [3, 0, 0, 0], 'the port reads from the key the DMA selected');
  // Reading an unknown key fills zeros.
  ram.fill(0xee, BUFFER, BUFFER + 16);
  putDescriptor(ram, DESCRIPTOR, (0x7777 << 16) | FwCfgDma.Select | FwCfgDma.Read, 16, BigInt(BUFFER));
  startDma(fwCfg, BigInt(DESCRIPTOR));
  t.equal(controlAt(ram, DESCRIPTOR), 0);
  t.same([...ram.subarray(BUFFER, BUFFER + 16)], new Array(16).fill(0));
});

t.test('DMA: writes are refused, unknown control bits are ignored', async (t) => {
  const { fwCfg, ram } = device();
  ram.fill(0xaa, BUFFER, BUFFER + 4);
  putDescriptor(ram, DESCRIPTOR, (FwCfgKey.Signature << 16) | FwCfgDma.Select | FwCfgDma.Write, 4, BigInt(BUFFER));
  startDma(fwCfg, BigInt(DESCRIPTOR));
  t.equal(controlAt(ram, DESCRIPTOR), FwCfgDma.Error, 'a write sets ERROR');
  t.same(readBytes(fwCfg, 4), [0x51, 0x45, 0x4d, 0x55], 'the item is unchanged, the offset did not move');
  putDescriptor(ram, DESCRIPTOR, (FwCfgKey.Signature << 16) | FwCfgDma.Select | FwCfgDma.Write | FwCfgDma.Skip, 4, BigInt(BUFFER));
  startDma(fwCfg, BigInt(DESCRIPTOR));
  t.equal(controlAt(ram, DESCRIPTOR), FwCfgDma.Error, 'write wins over skip, as in QEMU');
  putDescriptor(ram, DESCRIPTOR, (FwCfgKey.Signature << 16) | FwCfgDma.Select | FwCfgDma.Write | FwCfgDma.Read, 4, BigInt(BUFFER));
  startDma(fwCfg, BigInt(DESCRIPTOR));
  t.equal(controlAt(ram, DESCRIPTOR), 0, 'read wins over write');
  t.equal(Buffer.from(ram.subarray(BUFFER, BUFFER + 4)).toString('latin1'), 'QEMU');
  ram.fill(0, BUFFER, BUFFER + 4);
  putDescriptor(ram, DESCRIPTOR, (FwCfgKey.Signature << 16) | 0xffe0 | FwCfgDma.Error | FwCfgDma.Select | FwCfgDma.Read, 4, BigInt(BUFFER));
  startDma(fwCfg, BigInt(DESCRIPTOR));
  t.equal(controlAt(ram, DESCRIPTOR), 0, 'bits 5-15 and a stale ERROR bit are ignored');
  t.equal(Buffer.from(ram.subarray(BUFFER, BUFFER + 4)).toString('latin1'), 'QEMU');
  putDescriptor(ram, DESCRIPTOR, FwCfgDma.Write, 0, BigInt(BUFFER));
  startDma(fwCfg, BigInt(DESCRIPTOR));
  t.equal(controlAt(ram, DESCRIPTOR), 0, 'a write of nothing succeeds, as in QEMU');
});

t.test('DMA: hostile descriptors set ERROR, touch nothing outside RAM, never throw', async (t) => {
  const { fwCfg, ram, marked } = device();
  const attempt = (control: number, length: number, address: bigint) => {
    putDescriptor(ram, DESCRIPTOR, control, length, address);
    marked.length = 0;
    startDma(fwCfg, BigInt(DESCRIPTOR));
    return controlAt(ram, DESCRIPTOR);
  };
  const readE820 = (0x20 << 16) | FwCfgDma.Select | FwCfgDma.Read;
  t.equal(attempt(readE820, 20, BigInt(RAM_BYTES)), FwCfgDma.Error, 'a buffer just past RAM');
  t.equal(fwCfg.offset, 0, 'a failed read moves nothing');
  t.same(marked, [[DESCRIPTOR, 4]], 'only the control word was written');
  t.equal(attempt(readE820, 20, BigInt(RAM_BYTES - 19)), FwCfgDma.Error, 'a buffer that ends one byte past RAM');
  t.equal(attempt(readE820, 20, BigInt(RAM_BYTES - 20)), 0, 'one that ends at the end of RAM is fine');
  t.equal(attempt(readE820, 0xffffffff, BigInt(BUFFER)), FwCfgDma.Error, 'a 4 GiB length');
  t.equal(attempt(readE820, 0x20, 0xfffffffffffffff0n), FwCfgDma.Error, 'an address that wraps around 2^64');
  t.equal(attempt(readE820, 0x20, 0x100000000n + BigInt(BUFFER)), FwCfgDma.Error, 'an address above 4 GiB whose low half is in RAM');
  t.equal(attempt(readE820, 0x20, 0x20000000000000n), FwCfgDma.Error, 'an address past 2^53');
  t.ok(ram.subarray(BUFFER, BUFFER + 0x20).every((byte) => byte === 0), 'no failed read wrote the buffer');

  // Descriptors outside RAM.
  const before = Buffer.from(ram);
  marked.length = 0;
  for (const addr of [BigInt(RAM_BYTES), BigInt(RAM_BYTES - 3), 0xffffffffn, 0xfffffffffffffff8n, 0x100000000n + BigInt(DESCRIPTOR)]) {
    startDma(fwCfg, addr);
  }
  t.same(marked, [], 'no descriptor there: nothing written, nothing marked');
  t.ok(Buffer.from(ram).equals(before), 'RAM unchanged');
  // Half a descriptor at the end of RAM: its control word is, and gets the ERROR.
  const tail = RAM_BYTES - 8;
  new DataView(ram.buffer).setUint32(tail, readE820);
  startDma(fwCfg, BigInt(tail));
  t.equal(controlAt(ram, tail), FwCfgDma.Error, 'a descriptor cut by the end of RAM: ERROR in its control word');
  t.same(marked, [[tail, 4]]);

  // Odd register writes do nothing.
  marked.length = 0;
  fwCfg.dmaPort.write(DMA_HIGH, 2, 0xffff);
  fwCfg.dmaPort.write(DMA_LOW, 1, 0x10);
  fwCfg.dmaPort.write(2, 4, 0x10);
  t.same(marked, [], 'only 32-bit writes at 0x514 and 0x518 count');
  t.equal(fwCfg.saveState().dmaAddressHigh, 0);
  fwCfg.dmaPort.write(DMA_HIGH, 4, be32(1));
  t.equal(fwCfg.saveState().dmaAddressHigh, 1, 'the high half waits for the low one');
  putDescriptor(ram, DESCRIPTOR, readE820, 4, BigInt(BUFFER));
  fwCfg.dmaPort.write(DMA_LOW, 4, be32(DESCRIPTOR));
  t.same(marked, [], 'a descriptor above 4 GiB is not in RAM');
  t.equal(fwCfg.saveState().dmaAddressHigh, 0, 'the register is 0 after every operation');
});

t.test('DMA without guest RAM (the main thread\'s instance, or RAM that cannot be mapped) does nothing', async (t) => {
  const shared = FwCfg.createShared(fwCfgItems(machineFacts()));
  const noRam = new FwCfg(shared);
  t.doesNotThrow(() => noRam.dmaPort.write(DMA_LOW, 4, be32(DESCRIPTOR)));
  const failing = new FwCfg(shared, { bytes: () => { throw new Error('no mapping'); }, dirty: { mark: () => {} } });
  t.doesNotThrow(() => failing.dmaPort.write(DMA_LOW, 4, be32(DESCRIPTOR)));
});

t.test('saved state carries the registers and the items; a restore refuses what does not hold together', async (t) => {
  const source = device();
  select(source.fwCfg, FwCfgKey.CmdlineData);
  readBytes(source.fwCfg, 8);
  source.fwCfg.dmaPort.write(DMA_HIGH, 4, be32(0x12));
  const state = source.fwCfg.saveState();
  t.equal(state.selector, FwCfgKey.CmdlineData);
  t.equal(state.offset, 8);
  t.equal(state.dmaAddressHigh, 0x12);
  t.ok(isFwCfgState(state));

  // A machine built without a command line (a restore builds from no image) takes the source's.
  const destination = device(machineFacts({ cmdline: undefined }));
  t.equal(destination.fwCfg.item(FwCfgKey.CmdlineData)!.length, 0);
  const sharedBefore = destination.shared.contents.byteLength;
  destination.fwCfg.restoreState(structuredClone(state));
  t.ok(destination.shared.contents.byteLength > sharedBefore, 'the contents grew to take the longer items');
  t.equal(Buffer.from(readBytes(destination.fwCfg, 12)).toString('latin1'), 'ttyS0 quiet\0', 'reading goes on where it was');
  t.same(destination.fwCfg.saveState().items, state.items);
  // Another thread's instance over the same shared state sees the grown contents.
  const other = new FwCfg(destination.shared);
  select(other, FwCfgKey.CmdlineSize);
  t.same(readBytes(other, 4), [20, 0, 0, 0]);

  const bad: unknown[] = [
    null, {}, { ...state, selector: 0x10000 }, { ...state, offset: -1 }, { ...state, dmaAddressHigh: 2 ** 32 }, { ...state, items: {} },
    { ...state, items: [{ key: 1, data: [1, 2] }] },
  ];
  for (const value of bad) t.notOk(isFwCfgState(value), `not a state: ${JSON.stringify(value)?.slice(0, 60)}`);
  const saved = destination.fwCfg.saveState();
  t.throws(() => destination.fwCfg.restoreState({ ...state, items: [{ key: 1, data: new Uint8Array(1) }, { key: 1, data: new Uint8Array(1) }] }), { code: 'ERR_INVALID_ARG_VALUE' });
  t.throws(() => destination.fwCfg.restoreState({ ...state, items: [{ key: 0x10000, data: new Uint8Array(1) }] }), RangeError);
  t.throws(() => destination.fwCfg.restoreState({ ...state, items: [{ key: 0x30, data: new Uint8Array(2 * MiB) }] }), { code: 'ERR_OUT_OF_RANGE' }, 'items are limited in size');
  t.throws(() => destination.fwCfg.restoreState({ selector: 1 } as FwCfgState), TypeError);
  t.same(destination.fwCfg.saveState(), saved, 'a refused state changed nothing');

  const devices = { serial: {}, postCode: {} };
  t.ok(isDeviceStates(devices), 'device states from before fw_cfg still load');
  t.ok(isDeviceStates({ ...devices, fwCfg: state }));
  t.notOk(isDeviceStates({ ...devices, fwCfg: { ...state, items: 'x' } }));
});

t.test('a stream whose fw_cfg state is malformed is refused as a format error before anything is applied', async (t) => {
  const state = device().fwCfg.saveState();
  const parts = (fwCfg: unknown) => ({
    machine: { memoryBytes: 64 * MiB, vcpus: 1, irqchip: false },
    vm: { clock: {} },
    vcpus: [{ id: 0, regs: {}, sregs: {}, xsave: new Uint8Array(0), cpuid: [], msrs: [] }],
    devices: { serial: {}, postCode: {}, fwCfg },
  });
  const expected = { memoryBytes: 64 * MiB, vcpus: 1 };
  t.same(machineStateOf(parts(state), expected, 'test').devices.fwCfg, state, 'a good one passes');
  t.ok(machineStateOf({ ...parts(undefined), devices: { serial: {}, postCode: {} } }, expected, 'test'), 'as does none (a state from before fw_cfg)');
  t.throws(() => machineStateOf(parts({ ...state, offset: 'x' }), expected, 'test'), { name: 'MigrationError', code: 'EFORMAT', message: /device state is malformed/ });
});
