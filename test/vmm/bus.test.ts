// The I/O bus on a synthetic kvm_run page: dispatch by port table, string I/O, widths, MMIO
// ranges, and what happens where nothing is.
import t from 'tap';
import { IoBus, KvmRun, KvmRunOffset as O, type MmioDevice, type PortDevice } from '../../lib/index.js';
import { MAX_LOGGED_UNKNOWN_MMIO, MAX_LOGGED_UNKNOWN_PORTS, createBusShared, unknownAccesses } from '../../lib/vmm/bus.js';

const PIO_PAGE = 4096;

function ioExit(run: KvmRun, port: number, size: number, count: number, out: boolean, data: number[] = []): void {
  const v = run.view;
  v.setUint8(O['io.direction'], out ? 1 : 0);
  v.setUint8(O['io.size'], size);
  v.setUint16(O['io.port'], port, true);
  v.setUint32(O['io.count'], count, true);
  v.setBigUint64(O['io.data_offset'], BigInt(PIO_PAGE), true);
  data.forEach((byte, i) => v.setUint8(PIO_PAGE + i, byte));
}

function recorder(name: string) {
  const calls: string[] = [];
  const device: PortDevice = {
    name,
    read: (offset, size) => {
      calls.push(`read ${offset} ${size}`);
      return size === 1 ? 0x12 : size === 2 ? 0x3456 : 0x789abcde;
    },
    write: (offset, size, value) => void calls.push(`write ${offset} ${size} 0x${value.toString(16)}`),
  };
  return { device, calls };
}

t.test('port accesses reach the device at their offset, in every width, including string I/O', async (t) => {
  const logs: string[] = [];
  const bus = new IoBus(createBusShared(), (m) => logs.push(m));
  const { device, calls } = recorder('dev');
  bus.registerPorts(0x100, 8, device);
  const run = new KvmRun(new ArrayBuffer(3 * 4096));
  ioExit(run, 0x103, 1, 3, true, [1, 2, 3]);
  bus.handleIo(run);
  ioExit(run, 0x104, 2, 1, true, [0x34, 0x12]);
  bus.handleIo(run);
  ioExit(run, 0x100, 4, 1, true, [0x78, 0x56, 0x34, 0x12]);
  bus.handleIo(run);
  ioExit(run, 0x107, 1, 1, false);
  bus.handleIo(run);
  t.equal(run.view.getUint8(PIO_PAGE), 0x12);
  ioExit(run, 0x102, 2, 2, false);
  bus.handleIo(run);
  t.same([run.view.getUint16(PIO_PAGE, true), run.view.getUint16(PIO_PAGE + 2, true)], [0x3456, 0x3456]);
  ioExit(run, 0x100, 4, 1, false);
  bus.handleIo(run);
  t.equal(run.view.getUint32(PIO_PAGE, true), 0x789abcde);
  t.same(calls, [
    'write 3 1 0x1', 'write 3 1 0x2', 'write 3 1 0x3', 'write 4 2 0x1234', 'write 0 4 0x12345678',
    'read 7 1', 'read 2 2', 'read 2 2', 'read 0 4',
  ]);
  t.same(logs, []);
});

t.test('unknown ports read as all-ones, are counted, and logged once each', async (t) => {
  const logs: string[] = [];
  const bus = new IoBus(createBusShared(), (m) => logs.push(m));
  const run = new KvmRun(new ArrayBuffer(3 * 4096));
  ioExit(run, 0x5000, 2, 2, false);
  bus.handleIo(run);
  t.same([...new Uint8Array(run.view.buffer, PIO_PAGE, 4)], [0xff, 0xff, 0xff, 0xff]);
  bus.handleIo(run);
  ioExit(run, 0x5001, 1, 1, true, [0]);
  bus.handleIo(run);
  t.equal(bus.unknownPortAccesses, 3);
  t.same(logs, ['unknown port read from 0x5000', 'unknown port write to 0x5001']);
});

t.test('MMIO ranges dispatch by address; overlaps and port clashes are refused', async (t) => {
  const logs: string[] = [];
  const bus = new IoBus(createBusShared(), (m) => logs.push(m));
  const seen: string[] = [];
  const mmio = (name: string): MmioDevice => ({
    name,
    read: (offset, data) => {
      seen.push(`${name} read ${offset} ${data.length}`);
      data.fill(0xab);
    },
    write: (offset, data) => void seen.push(`${name} write ${offset} ${[...data].join(',')}`),
  });
  bus.registerMmio(0xd0000000, 0x1000, mmio('a'));
  bus.registerMmio(0xd0002000, 0x1000, mmio('b'));
  t.throws(() => bus.registerMmio(0xd0000800, 0x1000, mmio('c')), /overlaps a/);
  bus.registerPorts(0x60, 1, recorder('kbd').device);
  t.throws(() => bus.registerPorts(0x5e, 4, recorder('other').device), /port 0x60 of other is taken by kbd/);
  t.throws(() => bus.registerPorts(0xfffe, 4, recorder('edge').device), RangeError);

  const run = new KvmRun(new ArrayBuffer(3 * 4096));
  const mmioExit = (addr: number, len: number, write: boolean, data: number[] = []) => {
    run.view.setBigUint64(O['mmio.phys_addr'], BigInt(addr), true);
    run.view.setUint32(O['mmio.len'], len, true);
    run.view.setUint8(O['mmio.is_write'], write ? 1 : 0);
    data.forEach((byte, i) => run.view.setUint8(O['mmio.data'] + i, byte));
    bus.handleMmio(run);
  };
  mmioExit(0xd0002010, 4, true, [1, 2, 3, 4]);
  mmioExit(0xd0000ff8, 8, false);
  t.same([...run.mmioData], Array(8).fill(0xab));
  mmioExit(0xd0001000, 2, false);
  t.same([...run.mmioData.subarray(0, 2)], [0xff, 0xff], 'a hole between ranges reads all-ones');
  mmioExit(0x1_0000_0000 + 0x10, 1, true, [9]);
  t.same(seen, ['b write 16 1,2,3,4', 'a read 4088 8']);
  t.equal(bus.unknownMmioAccesses, 2);
  t.same(logs, ['unknown MMIO read from 0xd0001000 (2 bytes)', 'unknown MMIO write to 0x100000010 (1 bytes)']);
});

t.test('a guest scanning the ports: every access counted, at most 64 distinct ports logged over all vCPU threads', async (t) => {
  const logs: string[] = [];
  const shared = createBusShared();
  // Two vCPU threads' buses over one machine's shared counters.
  const buses = [new IoBus(shared, (m) => logs.push(m)), new IoBus(shared, (m) => logs.push(m))];
  const run = new KvmRun(new ArrayBuffer(3 * 4096));
  for (let port = 0x1000; port < 0x2000; port++) {
    ioExit(run, port, 1, 1, false);
    buses[port & 1]!.handleIo(run);
    // And again from the other thread: a port is logged once, whichever thread saw it first.
    buses[(port + 1) & 1]!.handleIo(run);
  }
  t.equal(MAX_LOGGED_UNKNOWN_PORTS, 64);
  t.equal(logs.length, MAX_LOGGED_UNKNOWN_PORTS, 'one line per port, up to the limit');
  t.same(logs.slice(0, 2), ['unknown port read from 0x1000', 'unknown port read from 0x1001']);
  t.equal(logs.at(-1), 'unknown port read from 0x103f; further unknown ports are counted, not logged');
  t.same(unknownAccesses(shared), { ports: 2 * 4096, distinctPorts: 4096, mmio: 0 }, 'every access and every port counted');
  t.equal(buses[0]!.unknownPortAccesses, 2 * 4096);
});

t.test('unknown MMIO addresses: at most 64 logged over all vCPU threads, all counted', async (t) => {
  const logs: string[] = [];
  const shared = createBusShared();
  const buses = [new IoBus(shared, (m) => logs.push(m)), new IoBus(shared, (m) => logs.push(m))];
  const run = new KvmRun(new ArrayBuffer(3 * 4096));
  for (let i = 0; i < 200; i++) {
    run.view.setBigUint64(O['mmio.phys_addr'], BigInt(0xe0000000 + i * 8), true);
    run.view.setUint32(O['mmio.len'], 4, true);
    run.view.setUint8(O['mmio.is_write'], 0);
    buses[i & 1]!.handleMmio(run);
  }
  t.equal(logs.length, MAX_LOGGED_UNKNOWN_MMIO);
  t.equal(logs.at(-1), `unknown MMIO read from 0x${(0xe0000000 + 63 * 8).toString(16)} (4 bytes); further unknown MMIO addresses are counted, not logged`);
  t.same(unknownAccesses(shared), { ports: 0, distinctPorts: 0, mmio: 200 });
});
