// The virtio-net device model over a fake guest RAM and a fake TAP: a driver written here sets
// up both queues register by register, and the test checks the exact bytes that reach the TAP
// and the guest's buffers, the used rings, dirty pages, when the device watches the TAP, and
// every hostile ring the issue names.
import t from 'tap';
import { Interrupt, Reg, Status, VirtioMmio } from '../../lib/devices/virtio-mmio.js';
import {
  defaultMac, NET_HDR_BYTES, netModel, parseMac, VirtioNetDevice, type FrameIo,
} from '../../lib/devices/virtio-net.js';
import { EventFd } from '../../lib/kvm/eventfd.js';
import { DirtyBitmap } from '../../lib/vmm/dirty-bitmap.js';
import { throwsArgError } from '../helpers/kvm.js';

const RAM_BYTES = 1024 * 1024;
const QUEUE_SIZE = 16;
/** Queue q's rings: descriptors, available, used. */
const RINGS = [[0x10000, 0x11000, 0x12000], [0x14000, 0x15000, 0x16000]] as const;
const BUFFERS = 0x40000;
const F_NEXT = 1, F_WRITE = 2;
const VERSION_1 = 1n << 32n, MAC = 1n << 5n, STATUS = 1n << 16n, EVENT_IDX = 1n << 29n;

class FakeTap implements FrameIo {
  readonly incoming: Uint8Array[] = [];
  readonly sent: Uint8Array[] = [];
  fail: NodeJS.ErrnoException | null = null;

  readFail: NodeJS.ErrnoException | null = null;

  read(views: Uint8Array[]): number {
    if (this.readFail) throw this.readFail;
    const frame = this.incoming.shift();
    if (frame === undefined) return -1;
    let done = 0;
    for (const view of views) {
      const n = Math.min(view.length, frame.length - done);
      view.set(frame.subarray(done, done + n));
      done += n;
    }
    return frame.length; // as the TAP does: the frame's length, even when it was cut short
  }

  write(views: Uint8Array[]): void {
    if (this.fail) throw this.fail;
    this.sent.push(Buffer.concat(views));
  }
}

class Driver {
  readonly ram = new Uint8Array(RAM_BYTES);
  readonly view = new DataView(this.ram.buffer);
  readonly dirty = DirtyBitmap.create(RAM_BYTES / 4096);
  readonly notify = EventFd.create();
  readonly logs: string[] = [];
  readonly tap = new FakeTap();
  readonly mmio: VirtioMmio;
  readonly device: VirtioNetDevice;
  /** The TAP watch the device holds, if any. */
  watch: (() => void) | null = null;
  watches = 0;
  readonly #avail = [0, 0];
  readonly #usedSeen = [0, 0];
  readonly #nextDesc = [0, 0];

  constructor(mac = '52:54:00:12:34:56') {
    const log = (message: string) => this.logs.push(message);
    const shared = VirtioMmio.createShared(netModel({ mac }), RAM_BYTES, this.notify.fd, null);
    this.mmio = new VirtioMmio(shared, 'virtio-net0', log);
    const context = {
      mmio: new VirtioMmio(shared, 'virtio-net0', log), ram: this.ram, dirty: this.dirty, log,
      watch: (_fd: number, onReadable: () => void) => {
        this.watch = onReadable;
        this.watches++;
        return { close: () => { if (this.watch === onReadable) this.watch = null; } };
      },
    };
    this.device = new VirtioNetDevice(context, { fd: 99, tap: 'tap0' }, this.tap);
  }

  read32(offset: number): number {
    const data = new Uint8Array(4);
    this.mmio.read(offset, data);
    return new DataView(data.buffer).getUint32(0, true);
  }

  write32(offset: number, value: number): void {
    const data = new Uint8Array(4);
    new DataView(data.buffer).setUint32(0, value >>> 0, true);
    this.mmio.write(offset, data);
  }

  get status(): number {
    return this.read32(Reg.Status);
  }

  init(features = VERSION_1 | MAC | STATUS): void {
    this.write32(Reg.Status, 0);
    this.write32(Reg.Status, Status.Acknowledge | Status.Driver);
    this.write32(Reg.DriverFeaturesSel, 0);
    this.write32(Reg.DriverFeatures, Number(features & 0xffffffffn));
    this.write32(Reg.DriverFeaturesSel, 1);
    this.write32(Reg.DriverFeatures, Number(features >> 32n));
    this.write32(Reg.Status, Status.Acknowledge | Status.Driver | Status.FeaturesOk);
    for (const q of [0, 1]) {
      const [desc, avail, used] = RINGS[q]!;
      this.ram.fill(0, avail, used + 0x1000);
      this.#avail[q] = this.#usedSeen[q] = this.#nextDesc[q] = 0;
      this.write32(Reg.QueueSel, q);
      this.write32(Reg.QueueNum, QUEUE_SIZE);
      this.write32(Reg.QueueDescLow, desc);
      this.write32(Reg.QueueDriverLow, avail);
      this.write32(Reg.QueueDeviceLow, used);
      this.write32(Reg.QueueReady, 1);
    }
    this.write32(Reg.Status, Status.Acknowledge | Status.Driver | Status.FeaturesOk | Status.DriverOk);
  }

  /** Chains `buffers` ([addr, len, flags]) into descriptors of queue `q` and makes the chain available. */
  add(q: number, buffers: [number, number, number][]): number {
    const [desc, avail] = RINGS[q]!;
    const head = this.#nextDesc[q]!;
    buffers.forEach(([addr, len, flags], i) => {
      const index = (head + i) % QUEUE_SIZE;
      const at = desc + 16 * index;
      const last = i === buffers.length - 1;
      this.view.setBigUint64(at, BigInt(addr), true);
      this.view.setUint32(at + 8, len, true);
      this.view.setUint16(at + 12, last ? flags : flags | F_NEXT, true);
      this.view.setUint16(at + 14, (index + 1) % QUEUE_SIZE, true);
    });
    this.#nextDesc[q] = (head + buffers.length) % QUEUE_SIZE;
    this.view.setUint16(avail + 4 + 2 * (this.#avail[q]! % QUEUE_SIZE), head, true);
    this.#avail[q] = (this.#avail[q]! + 1) & 0xffff;
    this.view.setUint16(avail + 2, this.#avail[q]!, true);
    return head;
  }

  /** Used entries of queue `q` since the last call: [head, len]. */
  takeUsed(q: number): [number, number][] {
    const used = RINGS[q]![2];
    const idx = this.view.getUint16(used + 2, true);
    const out: [number, number][] = [];
    while (this.#usedSeen[q] !== idx) {
      const at = used + 4 + 8 * (this.#usedSeen[q]! % QUEUE_SIZE);
      out.push([this.view.getUint32(at, true), this.view.getUint32(at + 4, true)]);
      this.#usedSeen[q] = (this.#usedSeen[q]! + 1) & 0xffff;
    }
    return out;
  }

  /** Takes InterruptStatus (and acknowledges it). */
  takeInterrupt(): number {
    const bits = this.read32(Reg.InterruptStatus);
    this.write32(Reg.InterruptAck, bits);
    return bits;
  }

  /** The TAP turns readable: runs the device's watch callback, as the thread's event loop would. */
  readable(): void {
    this.watch?.();
  }

  close(): void {
    this.device.close();
    this.notify.close();
  }
}

function driver(t: { teardown(fn: () => void): void }): Driver {
  const d = new Driver();
  t.teardown(() => d.close());
  return d;
}

const frame = (length: number, seed: number) => Uint8Array.from({ length }, (_, i) => (i * 13 + seed) & 0xff);
/** A received frame as the TAP hands it over: a zero header (num_buffers not set) and the frame. */
const fromTap = (data: Uint8Array) => Buffer.concat([new Uint8Array(NET_HDR_BYTES), data]);

t.test('a network device: MAC and link up in config space, two queues, no offloads', async (t) => {
  const d = driver(t);
  t.equal(d.read32(Reg.DeviceId), 1);
  d.write32(Reg.DeviceFeaturesSel, 0);
  const low = BigInt(d.read32(Reg.DeviceFeatures));
  d.write32(Reg.DeviceFeaturesSel, 1);
  const features = low | (BigInt(d.read32(Reg.DeviceFeatures)) << 32n);
  t.equal(features, VERSION_1 | MAC | STATUS | EVENT_IDX | (1n << 28n), 'MAC, STATUS, VERSION_1 and the ring features; no checksum, GSO or mergeable buffers');
  const config = new Uint8Array(8);
  d.mmio.read(Reg.Config, config);
  t.same([...config], [0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 1, 0], 'mac, status = VIRTIO_NET_S_LINK_UP');
  for (const [q, max] of [[0, 256], [1, 256], [2, 0]] as const) {
    d.write32(Reg.QueueSel, q);
    t.equal(d.read32(Reg.QueueNumMax), max, `queue ${q}: QueueNumMax ${max}`);
  }
  t.equal(defaultMac(0), '52:54:00:12:34:56');
  t.equal(defaultMac(1), '52:54:00:12:34:57');
  t.same([...parseMac('02-00-00-AB-cd-EF')], [2, 0, 0, 0xab, 0xcd, 0xef]);
  throwsArgError(t, () => parseMac('52:54:00:12:34'), 'ERR_INVALID_ARG_VALUE', /six hex bytes/);
  throwsArgError(t, () => parseMac('01:00:5e:00:00:01'), 'ERR_INVALID_ARG_VALUE', /multicast/);
});

t.test('transmit: header and frame gathered from the chain in one write, used with length 0', async (t) => {
  const d = driver(t);
  d.init();
  d.dirty.takeRanges();
  const data = frame(100, 1);
  // The header alone, then the frame split across two buffers, as Linux may lay it out.
  d.ram.set(data.subarray(0, 30), BUFFERS + 0x100);
  d.ram.set(data.subarray(30), BUFFERS + 0x800);
  d.ram.fill(0, BUFFERS, BUFFERS + NET_HDR_BYTES);
  d.view.setUint16(BUFFERS + 10, 7, true); // num_buffers means nothing on transmit
  const head = d.add(1, [[BUFFERS, NET_HDR_BYTES, 0], [BUFFERS + 0x100, 30, 0], [BUFFERS + 0x800, 70, 0]]);
  d.device.notified();
  t.equal(d.tap.sent.length, 1);
  t.same([...d.tap.sent[0]!], [...new Uint8Array(NET_HDR_BYTES), ...data], 'a zero header, then the frame');
  t.same(d.takeUsed(1), [[head, 0]]);
  t.equal(d.takeInterrupt(), Interrupt.UsedBuffer);
  t.same(d.dirty.takeRanges(), [{ firstPage: 0x16, pageCount: 1 }], 'only the used ring is written');

  // Header and frame in one buffer; then a frame asking for a checksum offload; then a runt.
  d.ram.fill(0, BUFFERS, BUFFERS + NET_HDR_BYTES);
  d.ram.set(data, BUFFERS + NET_HDR_BYTES);
  d.add(1, [[BUFFERS, NET_HDR_BYTES + 100, 0]]);
  d.ram[BUFFERS + 0x1000] = 1; // VIRTIO_NET_HDR_F_NEEDS_CSUM
  d.add(1, [[BUFFERS + 0x1000, NET_HDR_BYTES + 60, 0]]);
  d.add(1, [[BUFFERS + 0x2000, NET_HDR_BYTES + 10, 0]]);
  d.device.notified();
  t.equal(d.tap.sent.length, 2, 'the offload and the runt frames are dropped');
  t.same([...d.tap.sent[1]!.subarray(NET_HDR_BYTES)], [...data]);
  t.equal(d.takeUsed(1).length, 3, 'every chain comes back');
  t.match(d.logs, [/offload that was not negotiated/, /dropped a transmitted frame of 10 bytes/]);

  // The TAP down in its namespace: the frame is lost, logged once, and the queue goes on.
  d.tap.fail = Object.assign(new Error('EIO'), { code: 'EIO' });
  d.add(1, [[BUFFERS, NET_HDR_BYTES + 100, 0]]);
  d.add(1, [[BUFFERS, NET_HDR_BYTES + 100, 0]]);
  d.device.notified();
  t.equal(d.takeUsed(1).length, 2);
  t.equal(d.logs.filter((line) => /the TAP tap0 refused a frame: EIO/.test(line)).length, 1);
  t.equal(d.status & Status.NeedsReset, 0);
});

t.test('receive: one frame per chain straight into the guest buffers; the TAP unwatched while no buffer is posted', async (t) => {
  const d = driver(t);
  d.init();
  d.device.notified();
  t.notOk(d.device.watching, 'no buffer posted: the TAP is not watched');
  const frames = [frame(60, 1), frame(1514, 2), frame(200, 3)];
  d.tap.incoming.push(...frames.map(fromTap));
  // Two chains: one buffer of 2 KiB; a header buffer and a data buffer (the layout of older Linux).
  const first = d.add(0, [[BUFFERS, 2048, F_WRITE]]);
  const second = d.add(0, [[BUFFERS + 0x1000, NET_HDR_BYTES, F_WRITE], [BUFFERS + 0x2000, 1514, F_WRITE]]);
  d.ram.fill(0xee, BUFFERS, BUFFERS + 0x3000);
  d.dirty.takeRanges();
  d.device.notified();
  t.ok(d.device.watching, 'buffers posted: the TAP is watched');
  d.readable();
  t.same(d.takeUsed(0), [[first, NET_HDR_BYTES + 60], [second, NET_HDR_BYTES + 1514]]);
  t.same([...d.ram.subarray(BUFFERS, BUFFERS + NET_HDR_BYTES)], [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0], 'header with num_buffers = 1');
  t.same(d.ram.subarray(BUFFERS + NET_HDR_BYTES, BUFFERS + NET_HDR_BYTES + 60), frames[0]);
  t.equal(d.ram[BUFFERS + NET_HDR_BYTES + 60], 0xee, 'nothing written past the frame');
  t.same([...d.ram.subarray(BUFFERS + 0x1000, BUFFERS + 0x1000 + NET_HDR_BYTES)], [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
  t.same(d.ram.subarray(BUFFERS + 0x2000, BUFFERS + 0x2000 + 1514), frames[1]);
  t.equal(d.takeInterrupt(), Interrupt.UsedBuffer);
  t.same(d.dirty.takeRanges(), [
    { firstPage: 0x12, pageCount: 1 }, { firstPage: 0x40, pageCount: 3 },
  ], 'the used ring and the buffers written are dirty');
  t.notOk(d.device.watching, 'out of buffers: the TAP is left alone, the third frame waits in it');
  t.equal(d.tap.incoming.length, 1);

  const third = d.add(0, [[BUFFERS, 2048, F_WRITE]]);
  d.add(0, [[BUFFERS + 0x1000, 2048, F_WRITE]]);
  d.device.notified();
  t.ok(d.device.watching);
  d.readable();
  t.same(d.takeUsed(0), [[third, NET_HDR_BYTES + 200]], 'the waiting frame arrives once the guest posts a buffer');
  t.same(d.ram.subarray(BUFFERS + NET_HDR_BYTES, BUFFERS + NET_HDR_BYTES + 200), frames[2]);
  t.ok(d.device.watching, 'a buffer left: the TAP stays watched');
  t.equal(d.status & Status.NeedsReset, 0);
});

t.test('receive: a frame larger than the posted buffer is dropped and the buffer kept for the next', async (t) => {
  const d = driver(t);
  d.init();
  const head = d.add(0, [[BUFFERS, NET_HDR_BYTES + 100, F_WRITE]]);
  d.tap.incoming.push(fromTap(frame(101, 1)), fromTap(frame(150, 2)), fromTap(frame(100, 3)));
  d.device.notified();
  d.readable();
  t.same(d.takeUsed(0), [[head, NET_HDR_BYTES + 100]], 'the frame that fits lands in the same chain');
  t.same(d.ram.subarray(BUFFERS + NET_HDR_BYTES, BUFFERS + NET_HDR_BYTES + 100), frame(100, 3));
  t.equal(d.logs.length, 1, 'logged once for both');
  t.match(d.logs[0], /dropped a received frame of more than 100 bytes/);
  t.equal(d.status & Status.NeedsReset, 0);
});

t.test('hostile rings: NEEDS_RESET, the TAP unwatched, a reset brings the device back', async (t) => {
  const cases: [string, (d: Driver) => void, RegExp][] = [
    ['a device-readable receive buffer', (d) => d.add(0, [[BUFFERS, 2048, 0]]), /queue 0: a receive chain with a device-readable buffer/],
    ['a receive buffer too short for the header', (d) => d.add(0, [[BUFFERS, 8, F_WRITE]]), /too short for the 12-byte header/],
    ['a receive buffer outside RAM', (d) => d.add(0, [[RAM_BYTES - 100, 2048, F_WRITE]]), /outside guest RAM/],
    ['a device-writable transmit buffer', (d) => d.add(1, [[BUFFERS, 100, F_WRITE]]), /queue 1: a transmit chain with a device-writable buffer/],
    ['a transmit buffer outside RAM', (d) => d.add(1, [[0xf000_0000, 100, 0]]), /outside guest RAM/],
    ['the available index too far ahead', (d) => d.view.setUint16(RINGS[1][1] + 2, QUEUE_SIZE + 1, true), /moved 17 entries ahead/],
  ];
  for (const [name, corrupt, message] of cases) {
    const d = new Driver();
    d.init();
    d.tap.incoming.push(fromTap(frame(60, 1)));
    corrupt(d);
    d.device.notified();
    d.readable();
    t.ok(d.status & Status.NeedsReset, `${name}: NEEDS_RESET`);
    t.ok(d.takeInterrupt() & Interrupt.ConfigChange, `${name}: a config-change interrupt`);
    t.match(d.logs.at(-1), message, `${name}: says why`);
    t.notOk(d.device.watching, `${name}: the TAP is not watched`);
    // The guest resets and starts over: frames flow again.
    d.init();
    const head = d.add(0, [[BUFFERS, 2048, F_WRITE]]);
    d.device.notified();
    d.readable();
    const used = d.takeUsed(0);
    t.same(used.at(-1), [head, NET_HDR_BYTES + 60], `${name}: recovered after a reset`);
    d.close();
  }
});

t.test('parking stops watching the TAP until resumed and notified', async (t) => {
  const d = driver(t);
  d.init();
  d.add(0, [[BUFFERS, 2048, F_WRITE]]);
  d.device.notified();
  t.ok(d.device.watching);
  d.device.parking();
  t.notOk(d.device.watching);
  d.device.notified();
  t.notOk(d.device.watching, 'a notify while parked does nothing');
  d.device.resumed(true);
  d.device.notified();
  t.ok(d.device.watching);
  d.tap.incoming.push(fromTap(frame(60, 9)));
  d.readable();
  t.equal(d.takeUsed(0).length, 1);
  // A driver reset (status 0) between frames: the device stops watching at the next look.
  d.write32(Reg.Status, 0);
  d.readable();
  t.notOk(d.device.watching);
});

t.test('a TAP that fails to read: logged once, the TAP left alone, the buffer kept for later', async (t) => {
  const d = driver(t);
  d.init();
  const head = d.add(0, [[BUFFERS, 2048, F_WRITE]]);
  d.device.notified();
  d.tap.readFail = Object.assign(new Error('EBADFD'), { code: 'EBADFD' });
  d.readable();
  t.notOk(d.device.watching);
  t.match(d.logs, [/reading the TAP tap0 failed: EBADFD/]);
  t.same(d.takeUsed(0), []);
  d.tap.readFail = null;
  d.tap.incoming.push(fromTap(frame(60, 4)));
  d.device.notified();
  d.readable();
  t.same(d.takeUsed(0), [[head, NET_HDR_BYTES + 60]], 'the next notify watches again, and the same buffer takes the frame');
  t.equal(d.status & Status.NeedsReset, 0);
});
