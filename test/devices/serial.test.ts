// The 16550A model on its own, driven register by register the way Linux's 8250 driver probes and
// uses it: scratch and loopback tests, divisor latch, IIR priorities, THRE and receive interrupts.
import t from 'tap';
import { Serial } from '../../lib/devices/serial.js';
import { ByteRing } from '../../lib/devices/byte-ring.js';

const RBR = 0, IER = 1, IIR = 2, LCR = 3, MCR = 4, LSR = 5, MSR = 6, SCR = 7;

function uart() {
  const output = ByteRing.create(256);
  const irq: boolean[] = [];
  const serial = new Serial(Serial.createShared({ ring: output.shared }), (level) => irq.push(level));
  const transmitted = () => Buffer.from(output.drain()).toString('latin1');
  return { serial, irq, transmitted };
}

t.test('transmits what the guest writes to THR and counts it', async (t) => {
  const { serial, transmitted } = uart();
  for (const byte of Buffer.from('ok\n')) serial.write(RBR, 1, byte);
  t.equal(transmitted(), 'ok\n');
  t.equal(serial.transmittedBytes, 3);
  t.equal(serial.read(LSR, 1), 0x60, 'THRE and TEMT: the transmitter is always empty');
});

t.test('the scratch register and the divisor latch', async (t) => {
  const { serial, transmitted } = uart();
  serial.write(SCR, 1, 0xa5);
  t.equal(serial.read(SCR, 1), 0xa5);
  t.equal(serial.read(LCR, 1), 0x03, '8N1 at reset');
  serial.write(LCR, 1, 0x83); // DLAB
  t.same([serial.read(RBR, 1), serial.read(IER, 1)], [12, 0], '9600 baud divisor');
  serial.write(RBR, 1, 1);
  serial.write(IER, 1, 0);
  t.same([serial.read(RBR, 1), serial.read(IER, 1)], [1, 0], '115200 baud divisor');
  serial.write(LCR, 1, 0x03);
  t.equal(transmitted(), '', 'divisor writes transmit nothing');
});

t.test('loopback: MCR bits appear in MSR, transmitted bytes come back as received', async (t) => {
  const { serial, transmitted } = uart();
  t.equal(serial.read(MSR, 1), 0xb0, 'DCD, DSR, CTS without loopback');
  serial.write(MCR, 1, 0x10 | 0x0a); // LOOP | OUT2 | RTS
  t.equal(serial.read(MSR, 1), 0x90, 'RTS -> CTS, OUT2 -> DCD');
  serial.write(MCR, 1, 0x1f);
  t.equal(serial.read(MSR, 1), 0xf0);
  serial.write(RBR, 1, 0x55);
  t.equal(serial.read(LSR, 1) & 1, 1, 'data ready');
  t.equal(serial.read(RBR, 1), 0x55);
  t.equal(serial.read(LSR, 1) & 1, 0);
  t.equal(transmitted(), '', 'loopback sends nothing out');
});

t.test('THRE interrupt: raised on enabling it, cleared by reading IIR, raised again by a write', async (t) => {
  const { serial, irq } = uart();
  t.equal(serial.read(IIR, 1), 0x01, 'no interrupt pending');
  serial.write(IER, 1, 0x02);
  t.same(irq, [true], 'the line goes up');
  t.equal(serial.read(IIR, 1), 0x02, 'THRE is the source');
  t.same(irq, [true, false], 'reading IIR clears it');
  t.equal(serial.read(IIR, 1), 0x01);
  serial.write(RBR, 1, 0x41);
  t.same(irq, [true, false, true], 'transmitting empties THR again');
  serial.write(IER, 1, 0);
  t.same(irq, [true, false, true, false], 'disabling drops the line');
});

t.test('receive interrupt: input raises it, has priority over THRE, and clears when drained', async (t) => {
  const { serial, irq } = uart();
  serial.write(IIR, 1, 0x07); // FCR: enable and clear the FIFOs
  serial.write(IER, 1, 0x03);
  serial.read(IIR, 1);
  irq.length = 0;
  t.equal(serial.receive(Buffer.from('hi')), 2);
  t.same(irq, [true]);
  t.equal(serial.read(IIR, 1), 0xc4, 'received data, with FIFO bits');
  t.equal(serial.read(LSR, 1) & 1, 1);
  t.equal(serial.read(RBR, 1), 'h'.charCodeAt(0));
  t.equal(serial.read(RBR, 1), 'i'.charCodeAt(0));
  t.same(irq, [true, false]);
  t.equal(serial.read(RBR, 1), 0, 'an empty receiver reads 0');
  serial.receive(Buffer.from('x'));
  serial.write(IIR, 1, 0x03); // FCR: clear the receive FIFO
  t.equal(serial.read(LSR, 1) & 1, 0, 'cleared');
});

t.test('input beyond the receive buffer is refused, not lost silently', async (t) => {
  const { serial } = uart();
  const accepted = serial.receive(new Uint8Array(5000).fill(0x61));
  t.equal(accepted, 4096);
});

t.test('saveState and restoreState carry registers and pending input', async (t) => {
  const a = uart();
  a.serial.write(LCR, 1, 0x1b);
  a.serial.write(IER, 1, 0x01);
  a.serial.write(SCR, 1, 0x7e);
  a.serial.receive(Buffer.from('abc'));
  const state = a.serial.saveState();
  t.same(state.input, [0x61, 0x62, 0x63]);
  t.equal(a.serial.read(RBR, 1), 0x61, 'saving leaves the input in place');
  const b = uart();
  b.serial.restoreState(state);
  t.same([b.serial.read(LCR, 1), b.serial.read(IER, 1), b.serial.read(SCR, 1)], [0x1b, 0x01, 0x7e]);
  t.same(b.irq, [true], 'pending input raises the restored line');
  t.same([b.serial.read(RBR, 1), b.serial.read(RBR, 1), b.serial.read(RBR, 1)], [0x61, 0x62, 0x63]);
});

t.test('the POST code port keeps the last code and counts writes', async (t) => {
  const { PostCode } = await import('../../lib/devices/post-code.js');
  const shared = PostCode.createShared();
  const port = new PostCode(shared);
  port.write(0, 1, 0x1ab);
  port.write(0, 1, 0x42);
  const other = new PostCode(shared); // another vCPU thread's view
  t.same([other.lastCode, other.writes, other.read(0, 1)], [0x42, 2, 0x42]);
});
