// The virtio-mmio transport and the virtio-blk device model, driven register by register and
// chain by chain over a fake guest RAM (test/helpers/virtio-driver.ts): exact bytes in the image
// file and in RAM, used-ring entries, dirty pages, and every hostile ring the issue names.
import t from 'tap';
import { readFileSync, truncateSync } from 'node:fs';
import { Interrupt, Reg, Status, VIRTIO_MMIO_MAGIC, VirtioMmio } from '../../lib/devices/virtio-mmio.js';
import { BlkRequest, BlkStatus } from '../../lib/devices/virtio-blk.js';
import { throwsArgError } from '../helpers/kvm.js';
import {
  AVAIL, DATA, DESC, F_INDIRECT, F_NEXT, F_WRITE, FakeDriver, FEATURE_EVENT_IDX, FEATURE_VERSION_1, QUEUE_SIZE, RAM_BYTES, USED,
} from '../helpers/virtio-driver.js';

const pattern = (length: number, seed: number) => Uint8Array.from({ length }, (_, i) => (i * 7 + seed) & 0xff);

function driver(t: { teardown(fn: () => void): void }, options?: ConstructorParameters<typeof FakeDriver>[0]): FakeDriver {
  const d = new FakeDriver(options);
  t.teardown(() => d.close());
  return d;
}

t.test('identifies as a version 2 virtio-mmio block device and offers its features', async (t) => {
  const d = driver(t, { sectors: 100 });
  t.equal(d.read32(Reg.MagicValue), VIRTIO_MMIO_MAGIC);
  t.equal(d.read32(Reg.Version), 2);
  t.equal(d.read32(Reg.DeviceId), 2);
  const features = d.deviceFeatures();
  for (const bit of [32n, 28n, 29n, 9n, 6n, 2n, 13n, 14n]) t.ok(features & (1n << bit), `feature ${bit} offered`);
  t.notOk(features & (1n << 5n), 'not read-only');
  t.equal(d.read32(Reg.QueueNumMax), 256);
  // Config space at any width: capacity is a u64 at 0x100.
  t.same([...d.readBytes(Reg.Config, 8)], [100, 0, 0, 0, 0, 0, 0, 0]);
  t.equal(d.readBytes(Reg.Config, 1)[0], 100);
  t.same([...d.readBytes(Reg.Config, 2)], [100, 0]);
  t.equal(d.read32(Reg.Config + 20), 512, 'blk_size');
  t.equal(d.read32(Reg.QueueNumMax + 1), 0, 'a misaligned register read reads zero');
});

t.test('feature negotiation refuses what the device lacks, and a driver without VERSION_1', async (t) => {
  const d = driver(t);
  t.notOk(d.init({ features: 1n << 40n | 1n << FEATURE_VERSION_1 }), 'FEATURES_OK stays clear for an unknown feature');
  t.notOk(d.init({ features: 1n << 9n }), 'and without VERSION_1 (no legacy interface)');
  t.ok(d.init({ features: 1n << FEATURE_VERSION_1 }), 'VERSION_1 alone is fine');
  t.equal(d.mmio.driverFeatures, 1n << FEATURE_VERSION_1);
  d.write32(Reg.DriverFeaturesSel, 0);
  d.write32(Reg.DriverFeatures, 0xffffffff);
  t.equal(d.mmio.driverFeatures, 1n << FEATURE_VERSION_1, 'features are fixed once FEATURES_OK is set');
});

t.test('reads, writes, flushes and identifies, with exact bytes in RAM, in the file and in the dirty bitmap', async (t) => {
  const image = pattern(64 * 512, 3);
  const d = driver(t, { image, id: 'disk-serial-1' });
  t.ok(d.init());
  d.dirty.takeRanges();
  // Read sectors 2..9 into two buffers (a 4 KiB request split 1 KiB + 3 KiB).
  const readStatus = d.statusByte(0);
  d.submit([
    { addr: d.header(0, BlkRequest.In, 2), len: 16, flags: 0 },
    { addr: DATA, len: 1024, flags: F_WRITE },
    { addr: DATA + 0x3000, len: 3072, flags: F_WRITE },
    { addr: readStatus, len: 1, flags: F_WRITE },
  ], 0);
  t.equal(d.serve(), 1);
  t.same(d.takeUsed(), [[0, 4097]], 'used: head 0, 4096 data bytes + status');
  t.equal(d.ram[readStatus], BlkStatus.Ok);
  t.same(d.ram.subarray(DATA, DATA + 1024), image.subarray(1024, 2048));
  t.same(d.ram.subarray(DATA + 0x3000, DATA + 0x3000 + 3072), image.subarray(2048, 5120));
  t.same(d.dirty.takeRanges(), [
    { firstPage: 0x12, pageCount: 1 }, // used ring
    { firstPage: 0x20, pageCount: 1 }, // status byte
    { firstPage: 0x100, pageCount: 1 }, { firstPage: 0x103, pageCount: 1 }, // data
  ], 'exactly the pages the device wrote are dirty');

  // Write sectors 10..11, header and data in one descriptor (no framing assumed).
  const data = pattern(1024, 99);
  const header = d.header(1, BlkRequest.Out, 10);
  d.ram.copyWithin(DATA + 0x10000, header, header + 16);
  d.ram.set(data, DATA + 0x10000 + 16);
  const status = d.statusByte(1);
  d.submit([{ addr: DATA + 0x10000, len: 16 + 1024, flags: 0 }, { addr: status, len: 1, flags: F_WRITE }], 4);
  t.equal(d.serve(), 1);
  t.same(d.takeUsed(), [[4, 1]]);
  t.equal(d.ram[status], BlkStatus.Ok);
  t.same(readFileSync(d.path).subarray(10 * 512, 12 * 512), Buffer.from(data), 'the data is in the file');

  const flushStatus = d.statusByte(2);
  d.submit([{ addr: d.header(2, BlkRequest.Flush, 0), len: 16, flags: 0 }, { addr: flushStatus, len: 1, flags: F_WRITE }], 6);
  d.serve();
  t.equal(d.ram[flushStatus], BlkStatus.Ok);
  t.same(d.takeUsed(), [[6, 1]]);

  const idStatus = d.statusByte(3);
  d.submit([
    { addr: d.header(3, BlkRequest.GetId, 0), len: 16, flags: 0 },
    { addr: DATA + 0x20000, len: 20, flags: F_WRITE },
    { addr: idStatus, len: 1, flags: F_WRITE },
  ], 8);
  d.ram.fill(0xee, DATA + 0x20000, DATA + 0x20000 + 20);
  d.serve();
  t.same(d.takeUsed(), [[8, 21]]);
  t.equal(d.ram[idStatus], BlkStatus.Ok);
  t.equal(Buffer.from(d.ram.subarray(DATA + 0x20000, DATA + 0x20000 + 20)).toString('latin1'), 'disk-serial-1'.padEnd(20, '\0'));
});

t.test('status bytes: OK, IOERR past the end, UNSUPP for an unknown type, IOERR for a data buffer the wrong way', async (t) => {
  const d = driver(t, { sectors: 16 });
  t.ok(d.init());
  const request = (slot: number, type: number, sector: number, dataFlags: number, len = 512) => {
    const status = d.statusByte(slot);
    d.submit([
      { addr: d.header(slot, type, sector), len: 16, flags: 0 },
      { addr: DATA + slot * 0x1000, len, flags: dataFlags },
      { addr: status, len: 1, flags: F_WRITE },
    ], slot * 3);
    d.serve();
    return d.ram[status];
  };
  t.equal(request(0, BlkRequest.In, 15, F_WRITE), BlkStatus.Ok, 'the last sector');
  t.equal(request(1, BlkRequest.In, 16, F_WRITE), BlkStatus.IoErr, 'past the end');
  t.equal(request(2, BlkRequest.In, 15, F_WRITE, 1024), BlkStatus.IoErr, 'running past the end');
  t.equal(request(3, 99, 0, F_WRITE), BlkStatus.Unsupp, 'unknown type');
  t.equal(request(4, BlkRequest.In, 0, 0), BlkStatus.IoErr, 'a read into a device-readable buffer');
  t.equal(request(0, BlkRequest.Out, 0, F_WRITE), BlkStatus.IoErr, 'a write from a device-writable buffer');
  t.equal(request(1, BlkRequest.In, 0, F_WRITE, 100), BlkStatus.IoErr, 'not whole sectors');
  t.equal(d.takeUsed().length, 7);
  t.equal(d.status & Status.NeedsReset, 0, 'none of these needs a reset');
  t.ok(d.logs.some((line) => line.includes('past the end of the disk')), 'the problem is logged');
});

t.test('a read-only disk reads, and refuses writes, discards and write-zeroes', async (t) => {
  const image = pattern(8 * 512, 5);
  const d = driver(t, { image, readOnly: true });
  t.ok(d.deviceFeatures() & (1n << 5n), 'VIRTIO_BLK_F_RO');
  t.notOk(d.deviceFeatures() & (1n << 13n), 'no discard offered');
  t.ok(d.init());
  for (const [slot, type] of [[0, BlkRequest.Out], [1, BlkRequest.Discard], [2, BlkRequest.WriteZeroes]] as const) {
    const status = d.statusByte(slot);
    d.view.setBigUint64(DATA, 0n, true);
    d.view.setUint32(DATA + 8, 1, true);
    d.submit([{ addr: d.header(slot, type, 0), len: 16, flags: 0 }, { addr: DATA, len: type === BlkRequest.Out ? 512 : 16, flags: 0 }, { addr: status, len: 1, flags: F_WRITE }], slot * 3);
    d.serve();
    t.equal(d.ram[status], BlkStatus.IoErr, `request type ${type} refused`);
  }
  t.same(readFileSync(d.path), Buffer.from(image), 'the file is unchanged');
});

t.test('discard and write-zeroes: the ranges read back as zeros', async (t) => {
  const image = pattern(64 * 512, 1);
  const d = driver(t, { image });
  t.ok(d.init());
  const ranges = (slot: number, type: number, list: [number, number][]) => {
    const at = DATA + slot * 0x1000;
    list.forEach(([sector, count], i) => {
      d.view.setBigUint64(at + 16 * i, BigInt(sector), true);
      d.view.setUint32(at + 16 * i + 8, count, true);
      d.view.setUint32(at + 16 * i + 12, 0, true);
    });
    const status = d.statusByte(slot);
    d.submit([{ addr: d.header(slot, type, 0), len: 16, flags: 0 }, { addr: at, len: 16 * list.length, flags: 0 }, { addr: status, len: 1, flags: F_WRITE }], slot * 3);
    d.serve();
    return d.ram[status];
  };
  t.equal(ranges(0, BlkRequest.WriteZeroes, [[8, 8], [40, 1]]), BlkStatus.Ok);
  t.equal(ranges(1, BlkRequest.Discard, [[16, 16]]), BlkStatus.Ok);
  t.equal(ranges(2, BlkRequest.Discard, [[60, 8]]), BlkStatus.IoErr, 'past the end');
  const file = readFileSync(d.path);
  const expected = Buffer.from(image);
  expected.fill(0, 8 * 512, 16 * 512);
  expected.fill(0, 40 * 512, 41 * 512);
  expected.fill(0, 16 * 512, 32 * 512);
  t.same(file, expected, 'exactly the ranges are zero');
});

t.test('indirect descriptors and event index', async (t) => {
  const image = pattern(16 * 512, 9);
  const d = driver(t, { image });
  t.ok(d.init());
  const table = DATA + 0x40000;
  const status = d.statusByte(0);
  d.setDescriptor(table, 0, { addr: d.header(0, BlkRequest.In, 1), len: 16, flags: F_NEXT, next: 1 });
  d.setDescriptor(table, 1, { addr: DATA, len: 512, flags: F_WRITE | F_NEXT, next: 2 });
  d.setDescriptor(table, 2, { addr: status, len: 1, flags: F_WRITE });
  d.submit([{ addr: table, len: 48, flags: F_INDIRECT }], 5);
  // Event index: ask for an interrupt once the first used entry appears.
  d.view.setUint16(AVAIL + 4 + 2 * QUEUE_SIZE, 0, true);
  t.equal(d.serve(), 1);
  t.equal(d.ram[status], BlkStatus.Ok);
  t.same(d.ram.subarray(DATA, DATA + 512), image.subarray(512, 1024));
  t.same(d.takeUsed(), [[5, 513]]);
  t.equal(d.view.getUint16(USED + 4 + 8 * QUEUE_SIZE, true), 1, 'avail_event: notify me from entry 1 on');
  t.equal(d.mmio.saveState().interruptStatus & Interrupt.UsedBuffer, Interrupt.UsedBuffer, 'interrupt raised (used_event 0 reached)');
});

const hostile: [string, (d: FakeDriver) => void][] = [
  ['a buffer outside guest RAM', (d) => d.submit([{ addr: d.header(0, BlkRequest.In, 0), len: 16, flags: 0 }, { addr: 0xf000_0000, len: 512, flags: F_WRITE }, { addr: d.statusByte(0), len: 1, flags: F_WRITE }])],
  ['a length that overflows', (d) => d.submit([{ addr: d.header(0, BlkRequest.In, 0), len: 16, flags: 0 }, { addr: 0xffff_ffff_ffff_f000n, len: 0x2000, flags: F_WRITE }, { addr: d.statusByte(0), len: 1, flags: F_WRITE }])],
  ['a buffer ending just past RAM', (d) => d.submit([{ addr: d.header(0, BlkRequest.In, 0), len: 16, flags: 0 }, { addr: RAM_BYTES - 512, len: 513, flags: F_WRITE }, { addr: d.statusByte(0), len: 1, flags: F_WRITE }])],
  ['a next index beyond the queue', (d) => d.submit([{ addr: d.header(0, BlkRequest.In, 0), len: 16, flags: 0, next: 300 }, { addr: DATA, len: 1, flags: F_WRITE }])],
  ['a chain that loops', (d) => {
    d.setDescriptor(DESC, 0, { addr: d.header(0, BlkRequest.In, 0), len: 16, flags: F_NEXT, next: 1 });
    d.setDescriptor(DESC, 1, { addr: DATA, len: 512, flags: F_WRITE | F_NEXT, next: 0 });
    d.offer(0);
  }],
  ['an indirect table outside RAM', (d) => d.submit([{ addr: 0xf000_0000, len: 48, flags: F_INDIRECT }])],
  ['an indirect table of 24 bytes', (d) => d.submit([{ addr: DATA, len: 24, flags: F_INDIRECT }])],
  ['an indirect table inside an indirect table', (d) => {
    d.setDescriptor(DATA, 0, { addr: DATA + 0x1000, len: 16, flags: F_INDIRECT });
    d.submit([{ addr: DATA, len: 16, flags: F_INDIRECT }]);
  }],
  ['an indirect table that loops', (d) => {
    d.setDescriptor(DATA, 0, { addr: d.header(0, BlkRequest.In, 0), len: 16, flags: F_NEXT, next: 1 });
    d.setDescriptor(DATA, 1, { addr: DATA + 0x1000, len: 16, flags: F_NEXT | F_WRITE, next: 0 });
    d.submit([{ addr: DATA, len: 32, flags: F_INDIRECT }]);
  }],
  ['an available head beyond the queue', (d) => d.offer(QUEUE_SIZE)],
  ['the available index moved more than the queue size', (d) => d.setAvailIdx(QUEUE_SIZE + 1)],
  ['a readable buffer after a writable one', (d) => d.submit([{ addr: d.header(0, BlkRequest.In, 0), len: 16, flags: F_WRITE }, { addr: DATA, len: 16, flags: 0 }])],
];

for (const [name, build] of hostile) {
  t.test(`hostile: ${name} needs a reset, writes nothing, and the device works after one`, async (t) => {
    const image = pattern(16 * 512, 4);
    const d = driver(t, { image });
    t.ok(d.init());
    d.dirty.takeRanges();
    build(d);
    const snapshotBefore = Buffer.from(d.ram);
    t.equal(d.serve(), 0, 'nothing completes');
    t.equal(d.status & Status.NeedsReset, Status.NeedsReset, 'DEVICE_NEEDS_RESET');
    t.equal(d.mmio.saveState().interruptStatus & Interrupt.ConfigChange, Interrupt.ConfigChange, 'config-change interrupt');
    t.same(Buffer.from(d.ram), snapshotBefore, 'guest RAM untouched');
    t.same(d.dirty.takeRanges(), [], 'nothing marked dirty');
    t.equal(d.logs.length, 1, `logged once: ${d.logs[0]}`);
    t.equal(d.serve(), 0, 'the queue stays stopped until a reset');
    t.equal(d.logs.length, 1, 'and is not logged again');
    // Reset and a good request.
    t.ok(d.init());
    t.equal(d.status & Status.NeedsReset, 0, 'a reset clears it');
    const status = d.statusByte(0);
    d.submit([{ addr: d.header(0, BlkRequest.In, 3), len: 16, flags: 0 }, { addr: DATA + 0x8000, len: 512, flags: F_WRITE }, { addr: status, len: 1, flags: F_WRITE }]);
    t.equal(d.serve(), 1);
    t.equal(d.ram[status], BlkStatus.Ok);
    t.same(d.ram.subarray(DATA + 0x8000, DATA + 0x8200), image.subarray(3 * 512, 4 * 512));
  });
}

t.test('hostile queue set-up: a size that is not a power of two, rings outside RAM or misaligned', async (t) => {
  for (const [what, options] of [
    ['size 3', { size: 3 }], ['size 0', { size: 0 }], ['size 512 (above the maximum)', { size: 512 }],
    ['a descriptor table outside RAM', { desc: 0xf000_0000 }], ['a descriptor table just past RAM', { desc: RAM_BYTES - 16 * 8 }],
    ['a misaligned descriptor table', { desc: DESC + 8 }],
  ] as const) {
    const d = driver(t);
    t.notOk(d.init(options), `${what}: the queue is not ready`);
    t.equal(d.status & Status.NeedsReset, Status.NeedsReset, `${what}: needs reset`);
    t.equal(d.read32(Reg.QueueReady), 0);
    t.ok(d.init(), `${what}: works after a reset`);
  }
});

t.test('notifies for a queue that is not ready, or does not exist, are ignored', async (t) => {
  const d = driver(t);
  d.write32(Reg.QueueNotify, 0);
  d.write32(Reg.QueueNotify, 5);
  t.equal(d.notify.read(), 0n, 'the device thread is not woken');
  t.equal(d.logs.length, 2);
  t.ok(d.init());
  t.equal(d.notify.read(), 1n, 'DRIVER_OK wakes it');
  d.write32(Reg.QueueNotify, 0);
  t.equal(d.notify.read(), 1n, 'a notify for the ready queue does');
  t.equal(d.read32(Reg.QueueSel), 0);
  d.write32(Reg.QueueSel, 0x8000_0000);
  t.equal(d.read32(Reg.QueueNumMax), 0, 'a huge queue index is not a queue');
});

t.test('the register state survives a save and restore in the middle of I/O', async (t) => {
  const image = pattern(16 * 512, 6);
  const d = driver(t, { image });
  t.ok(d.init());
  // Two requests available; the device takes one, then the machine pauses it.
  for (const slot of [0, 1]) {
    d.submit([{ addr: d.header(slot, BlkRequest.In, slot), len: 16, flags: 0 }, { addr: DATA + slot * 512, len: 512, flags: F_WRITE }, { addr: d.statusByte(slot), len: 1, flags: F_WRITE }], slot * 3);
  }
  let served = 0;
  t.equal(d.device.serve(() => served++ < 1), 1, 'stopped between two requests');
  const saved = d.mmio.saveState();
  t.equal(saved.queues[0]!.lastAvail, 1);
  t.equal(saved.queues[0]!.nextUsed, 1);
  // A fresh device on the same RAM (a migration's destination) takes the second request.
  const e = driver(t, { image });
  e.ram.set(d.ram);
  e.mmio.restoreState(JSON.parse(JSON.stringify(saved)));
  t.same(e.mmio.saveState(), saved);
  t.equal(e.serve(), 1);
  t.same(e.ram.subarray(DATA + 512, DATA + 1024), image.subarray(512, 1024));
  t.equal(e.view.getUint16(USED + 2, true), 2);
  // A saved state that does not fit the device is a refused argument, as a register write would be.
  throwsArgError(t, () => e.mmio.restoreState({ ...saved, queues: [] }), 'ERR_INVALID_ARG_VALUE', 'virtio-blk0: the saved state has 0 queues, the device 1');
  throwsArgError(t, () => e.mmio.restoreState({ ...saved, queues: [{ ...saved.queues[0]!, num: 3 }] }), 'ERR_INVALID_ARG_VALUE', 'virtio-blk0: saved queue 0: size 3 is not a power of two up to 256');
  throwsArgError(t, () => e.mmio.restoreState({ ...saved, status: -1 }), 'ERR_INVALID_ARG_VALUE', 'virtio-blk0: bad status in the saved state');
});

t.test('the transport refuses a shared buffer it did not make', async (t) => {
  throwsArgError(t, () => new VirtioMmio(new SharedArrayBuffer(16), 'x', () => {}), 'ERR_INVALID_ARG_TYPE', 'shared must be the SharedArrayBuffer of VirtioMmio.createShared()');
});

t.test('polling after work: the driver is told not to notify meanwhile, and to notify again after', async (t) => {
  const d = driver(t, { sectors: 16 });
  t.ok(d.init());
  const availEvent = () => d.view.getUint16(USED + 4 + 8 * QUEUE_SIZE, true);
  const submit = (slot: number) => d.submit([
    { addr: d.header(slot, BlkRequest.In, slot), len: 16, flags: 0 }, { addr: DATA, len: 512, flags: F_WRITE }, { addr: d.statusByte(slot), len: 1, flags: F_WRITE },
  ], slot * 3);
  submit(0);
  t.equal(d.serve(), 1);
  t.equal(availEvent(), 1, 'after serving: notify me from entry 1');
  let looks = 0;
  // A request arrives while the device polls: found without a notify.
  t.ok(d.device.pollForRequests(1000, () => {
    if (++looks === 3) {
      t.equal(availEvent(), 0, 'while polling: avail_event one behind, so the driver does not notify');
      submit(1);
    }
    return true;
  }));
  t.equal(d.serve(), 1);
  // Nothing arrives: after the window the driver is asked to notify again.
  t.notOk(d.device.pollForRequests(0.2, () => true));
  t.equal(availEvent(), 2, 'after the window: notify me from entry 2');
  t.notOk(d.device.pollForRequests(1000, () => false), 'stops at once when the machine pauses');
  t.ok(d.init({ features: 1n << FEATURE_VERSION_1 }), 'again without event idx');
  submit(0);
  d.serve();
  t.notOk(d.device.pollForRequests(0.1, () => true));
  t.equal(availEvent(), 0, 'no event idx: the used ring\'s avail_event is left alone');
});

t.test('an image that shrinks under the guest: a read past its new end is IOERR, logged with the image\'s path', async (t) => {
  const image = pattern(16 * 512, 5);
  const d = driver(t, { image });
  t.ok(d.init());
  truncateSync(d.path, 8 * 512);
  const read = (slot: number, sector: number, sectors: number) => {
    const status = d.statusByte(slot);
    d.ram.fill(0xee, DATA + slot * 0x2000, DATA + slot * 0x2000 + sectors * 512);
    d.submit([
      { addr: d.header(slot, BlkRequest.In, sector), len: 16, flags: 0 },
      { addr: DATA + slot * 0x2000, len: sectors * 512, flags: F_WRITE },
      { addr: status, len: 1, flags: F_WRITE },
    ], slot * 3);
    t.equal(d.serve(), 1);
    return d.ram[status];
  };
  t.equal(read(0, 0, 8), BlkStatus.Ok, 'what is still in the file reads as before');
  t.same(d.ram.subarray(DATA, DATA + 8 * 512), image.subarray(0, 8 * 512));
  t.equal(read(1, 12, 2), BlkStatus.IoErr, 'sectors wholly past the new end');
  t.equal(read(2, 6, 4), BlkStatus.IoErr, 'a read that runs past the new end');
  t.same(d.logs, [`virtio-blk0: ${d.path}: a read past the end of the image file, which has shrunk to 4096 bytes since the disk was opened (IOERR)`],
    'logged once, naming the image');
  t.same(d.takeUsed(), [[0, 8 * 512 + 1], [3, 1], [6, 1]], 'a failed read returns only its status byte');
});
