// The remote protocol's framing: checksums, acks, interrupts, escapes, and what a hostile peer
// gets for garbage and oversized packets.
import t from 'tap';
import {
  MAX_PACKET_BYTES, PacketReader, checksum, escapeBinary, framePacket, fromHex, parseHexNumber, unescapeBinary,
} from '../../lib/debug/packets.js';

t.test('a frame is $DATA#CS with the modulo-256 sum in two hex digits', async (t) => {
  t.equal(framePacket('OK').toString(), '$OK#9a');
  t.equal(framePacket('').toString(), '$#00');
  t.equal(checksum(Buffer.from('qSupported')), 0x37);
});

t.test('the reader splits packets, acks and interrupts, across chunk boundaries', async (t) => {
  const reader = new PacketReader();
  const events = [
    ...reader.push(Buffer.from('+$g#6')),
    ...reader.push(Buffer.from('7-\x03junk$m100,4#')),
  ];
  t.equal(reader.midPacket, true, 'inside a packet until its checksum');
  events.push(...reader.push(Buffer.from('5e')));
  t.same(events.map((e) => (e.kind === 'packet' ? `packet:${e.data.toString()}` : e.kind)), ['ack', 'packet:g', 'nak', 'interrupt', 'packet:m100,4']);
  t.equal(reader.midPacket, false);
});

t.test('a bad checksum, bad digits, or a packet cut by a new $ are reported, not delivered', async (t) => {
  const reader = new PacketReader();
  const kinds = reader.push(Buffer.from('$g#00$g#zz$abc$g#67')).map((e) => e.kind);
  t.same(kinds, ['bad-checksum', 'bad-checksum', 'bad-checksum', 'packet']);
});

t.test('an oversized packet is dropped whole and reported once; the next one is read', async (t) => {
  const reader = new PacketReader();
  const huge = Buffer.alloc(MAX_PACKET_BYTES * 3, 0x41);
  const events = [...reader.push(Buffer.from('$M0,1:')), ...reader.push(huge), ...reader.push(Buffer.from('#00$?#3f'))];
  t.same(events.map((e) => e.kind), ['oversized', 'packet']);
  t.equal(MAX_PACKET_BYTES, 16384);
  // Exactly the maximum still fits.
  const fits = Buffer.alloc(MAX_PACKET_BYTES, 0x30);
  const [event] = reader.push(framePacket(fits));
  t.equal(event?.kind, 'packet');
});

t.test('binary escapes cover } # $ * and round-trip every byte', async (t) => {
  const all = Buffer.from(Array.from({ length: 256 }, (_, i) => i));
  const escaped = escapeBinary(all);
  for (const special of [0x23, 0x24, 0x2a]) t.notOk(escaped.includes(special), `no raw 0x${special.toString(16)}`);
  t.same(escapeBinary(Buffer.from('a}b')), Buffer.from([0x61, 0x7d, 0x5d, 0x62]));
  t.same(unescapeBinary(escaped), all);
  t.equal(unescapeBinary(Buffer.from([0x61, 0x7d])), null, 'an escape at the end is refused');
});

t.test('hex helpers refuse what is not hex', async (t) => {
  t.same(fromHex('00ff'), Buffer.from([0, 0xff]));
  t.equal(fromHex('0'), null);
  t.equal(fromHex('zz'), null);
  t.equal(parseHexNumber('ffffffff80000000'), 0xffffffff80000000n);
  t.equal(parseHexNumber('10000000000000000'), null, 'over 64 bits');
  t.equal(parseHexNumber(''), null);
  t.equal(parseHexNumber('-1'), null);
});
