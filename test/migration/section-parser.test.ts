// The incremental section parser of the migration destination: fed the bytes of a stream in any
// pieces, it must place exactly the pages decodePages() would, deliver the other sections intact,
// and refuse every malformed stream with the StreamError SectionReader would give.
import { randomBytes } from 'node:crypto';
import t from 'tap';
import { SectionParser, type SectionParserTarget } from '../../lib/migration/section-parser.js';
import {
  MAX_SECTION_PAYLOAD_BYTES, SectionType, decodePagesInto, encodeEnd, encodeErrorSection, encodePages, encodeSection, viewOf,
} from '../../lib/migration/stream.js';
import { PAGE_SIZE } from '../../lib/kvm/constants.js';
import { crc32c } from '../../lib/migration/checksum.js';
import { expectStreamError } from '../helpers/stream-errors.js';

const MEMORY_BYTES = 64 * PAGE_SIZE;

interface Received {
  memory: Uint8Array;
  sections: { name: string; payload: number[] }[];
  pagesDone: { pages: number; zeroPages: number }[];
  /** Zero ranges in the order they were applied, as [guestPhysAddr, byteLength]. */
  zeroRanges: [number, number][];
}

function receiver(initial?: Uint8Array): { target: SectionParserTarget; received: Received } {
  const received: Received = { memory: initial ? initial.slice() : new Uint8Array(MEMORY_BYTES), sections: [], pagesDone: [], zeroRanges: [] };
  const target: SectionParserTarget = {
    memoryBytes: MEMORY_BYTES,
    writePages: (guestPhysAddr, data) => received.memory.set(data, guestPhysAddr),
    zeroPages: (guestPhysAddr, byteLength) => {
      received.zeroRanges.push([guestPhysAddr, byteLength]);
      received.memory.fill(0, guestPhysAddr, guestPhysAddr + byteLength);
    },
    pagesDone: (counts) => received.pagesDone.push(counts),
    section: (section) => received.sections.push({ name: section.name, payload: [...section.payload] }),
  };
  return { target, received };
}

/** Guest RAM with random pages at `dataPages` and zeros elsewhere. */
function ramWith(dataPages: number[]): Uint8Array {
  const ram = new Uint8Array(MEMORY_BYTES);
  for (const page of dataPages) ram.set(randomBytes(PAGE_SIZE), page * PAGE_SIZE);
  return ram;
}

const concat = (chunks: Uint8Array[]): Uint8Array => new Uint8Array(Buffer.concat(chunks));

/** A stream body: Pages sections of `ram` (all of it, zero pages as zero ranges), a state-like section, End. */
function streamOf(ram: Uint8Array, maxDataBytesPerSection = 8 * PAGE_SIZE): Uint8Array {
  const pages = encodePages([{ firstPage: 0, pageCount: MEMORY_BYTES / PAGE_SIZE }], (a, l) => ram.subarray(a, a + l), { maxDataBytesPerSection });
  return concat([...pages.sections, encodeSection(SectionType.Sync, new Uint8Array(0)), encodeErrorSection('not really'), encodeEnd()]);
}

function feed(parser: SectionParser, bytes: Uint8Array, pieceBytes: (index: number) => number): void {
  let at = 0;
  for (let i = 0; at < bytes.length; i++) {
    const take = Math.max(1, pieceBytes(i));
    parser.push(bytes.subarray(at, at + take));
    at += take;
  }
}

t.test('any split of the stream places the same pages and delivers the same sections', async (t) => {
  const ram = ramWith([0, 1, 2, 7, 8, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 63]);
  const stream = streamOf(ram);
  // What decodePagesInto gives for the same sections, page by page: the reference.
  const splits: [string, (i: number) => number][] = [
    ['whole', () => stream.length],
    ['1 byte', () => 1],
    ['7 bytes', () => 7],
    ['4093 bytes', () => 4093],
    ['pages', () => PAGE_SIZE],
    ['random', () => 1 + Math.floor(Math.random() * 9000)],
  ];
  for (const [name, split] of splits) {
    // Stale data everywhere: zero ranges must clear it, data ranges overwrite it.
    const { target, received } = receiver(new Uint8Array(MEMORY_BYTES).fill(0x5a));
    const parser = new SectionParser(target);
    feed(parser, stream, split);
    t.ok(parser.ended, `${name}: ended`);
    t.equal(parser.bytesParsed, stream.length, `${name}: every byte parsed`);
    t.ok(Buffer.from(received.memory).equals(Buffer.from(ram)), `${name}: guest RAM equals the source's`);
    t.same(received.sections.map((s) => s.name), ['Sync', 'Error', 'End'], `${name}: sections in order`);
    t.same(Buffer.from(received.sections[1].payload).toString(), 'not really', `${name}: payload intact`);
    t.same(received.pagesDone.reduce((sum, c) => sum + c.pages, 0), 17, `${name}: 17 pages with data`);
    t.same(received.pagesDone.reduce((sum, c) => sum + c.zeroPages, 0), 64 - 17, `${name}: the rest as zero ranges`);
  }
});

t.test('page data and zero ranges go where decodePages() puts them', async (t) => {
  const ram = ramWith([3, 4, 5, 20]);
  const sections = encodePages([{ firstPage: 2, pageCount: 20 }], (a, l) => ram.subarray(a, a + l), {}).sections;
  const expected = new Uint8Array(MEMORY_BYTES).fill(0x11);
  decodePagesInto(sections[0].subarray(8, sections[0].length - 4), expected);
  const { target, received } = receiver(new Uint8Array(MEMORY_BYTES).fill(0x11));
  new SectionParser(target).push(sections[0]);
  t.ok(Buffer.from(received.memory).equals(Buffer.from(expected)));
  // Ranges: page 2 zero, 3..5 data, 6..19 zero, 20 data, 21 zero.
  t.same(received.zeroRanges, [[2 * PAGE_SIZE, PAGE_SIZE], [6 * PAGE_SIZE, 14 * PAGE_SIZE], [21 * PAGE_SIZE, PAGE_SIZE]]);
  t.same(received.pagesDone, [{ pages: 4, zeroPages: 16 }]);
});

/** A section with `payload` and a correct CRC. */
function sealed(type: number, payload: Uint8Array, length = payload.length): Uint8Array {
  const section = new Uint8Array(8 + payload.length + 4);
  const view = viewOf(section);
  view.setUint16(0, type, true);
  view.setUint32(4, length, true);
  section.set(payload, 8);
  view.setUint32(8 + payload.length, crc32c(section.subarray(0, 8 + payload.length)), true);
  return section;
}

function pagesPayload(ranges: [number, number, number][], dataBytes: number): Uint8Array {
  const payload = new Uint8Array(4 + ranges.length * 16 + dataBytes).fill(0x77, 4 + ranges.length * 16);
  const view = viewOf(payload);
  view.setUint32(0, ranges.length, true);
  ranges.forEach(([firstPage, pageCount, flags], i) => {
    view.setBigUint64(4 + i * 16, BigInt(firstPage), true);
    view.setUint32(4 + i * 16 + 8, pageCount, true);
    view.setUint32(4 + i * 16 + 12, flags, true);
  });
  return payload;
}

t.test('malformed streams end in the StreamError that says what is wrong, and nothing is placed before the table checks out', async (t) => {
  const cases: [string, Uint8Array, string, string | RegExp][] = [
    ['unknown type', sealed(99, new Uint8Array(0)), 'EFORMAT', 'unknown section type 99'],
    ['over the limit', (() => {
      const head = new Uint8Array(8);
      viewOf(head).setUint16(0, SectionType.VmState, true);
      viewOf(head).setUint32(4, MAX_SECTION_PAYLOAD_BYTES.VmState + 1, true);
      return head;
    })(), 'ETOOBIG', `a VmState section of ${MAX_SECTION_PAYLOAD_BYTES.VmState + 1} bytes is over the ${MAX_SECTION_PAYLOAD_BYTES.VmState}-byte limit`],
    ['range outside RAM', sealed(SectionType.Pages, pagesPayload([[63, 2, 0]], 2 * PAGE_SIZE)), 'EFORMAT', 'Pages range 0 (2 pages from page 0x3f) lies outside guest RAM (0x40 pages)'],
    ['range beyond 2^53', sealed(SectionType.Pages, (() => {
      const payload = pagesPayload([[0, 1, 0]], PAGE_SIZE);
      viewOf(payload).setBigUint64(4, 0xffffffffffffffffn, true);
      return payload;
    })()), 'EFORMAT', /lies outside guest RAM/],
    ['unknown flags', sealed(SectionType.Pages, pagesPayload([[0, 1, 6]], PAGE_SIZE)), 'EFORMAT', 'Pages range 0 has unknown flags 0x6'],
    ['empty range', sealed(SectionType.Pages, pagesPayload([[0, 0, 0]], 0)), 'EFORMAT', 'Pages range 0 is empty'],
    ['data short of the ranges', sealed(SectionType.Pages, pagesPayload([[0, 2, 0]], PAGE_SIZE)), 'EFORMAT', `a Pages section's ranges announce ${2 * PAGE_SIZE} bytes of page data but it holds ${PAGE_SIZE}`],
    ['table longer than the section', sealed(SectionType.Pages, (() => {
      const payload = new Uint8Array(20);
      viewOf(payload).setUint32(0, 1000, true);
      return payload;
    })()), 'EFORMAT', 'a Pages section announces 1000 ranges (16004 bytes of table) but holds 20 bytes'],
    ['Pages too short for its count', sealed(SectionType.Pages, new Uint8Array(2)), 'EFORMAT', 'a Pages section of 2 bytes is too short for its range count'],
    ['bad CRC', (() => {
      const section = sealed(SectionType.Pages, pagesPayload([[1, 1, 0]], PAGE_SIZE));
      section[section.length - 1] ^= 1;
      return section;
    })(), 'ECHECKSUM', 'checksum mismatch in Pages section'],
    ['a flipped data byte', (() => {
      const section = sealed(SectionType.Pages, pagesPayload([[1, 1, 0]], PAGE_SIZE));
      section[100] ^= 0x80;
      return section;
    })(), 'ECHECKSUM', 'checksum mismatch in Pages section'],
  ];
  for (const [name, bytes, code, message] of cases) {
    for (const pieces of [bytes.length, 1, 5]) {
      const { target, received } = receiver();
      const parser = new SectionParser(target);
      await expectStreamError(t, () => feed(parser, bytes, () => pieces), code, message);
      // Once failed, it stays failed.
      await expectStreamError(t, () => parser.push(new Uint8Array(1)), code, message);
      if (code === 'EFORMAT' || code === 'ETOOBIG') t.ok(received.memory.every((byte) => byte === 0), `${name}: nothing placed`);
      t.same(received.sections, [], `${name}: no section delivered`);
      t.same(received.zeroRanges, [], `${name}: no zero range applied`);
    }
  }
});

t.test('bytes after End are refused', async (t) => {
  const { target, received } = receiver();
  const parser = new SectionParser(target);
  await expectStreamError(t, () => parser.push(concat([encodeEnd(), new Uint8Array(3)])), 'EFORMAT', '3 bytes follow the stream\'s End section');
  t.same(received.sections.map((s) => s.name), ['End']);
  const later = new SectionParser(receiver().target);
  later.push(encodeEnd());
  t.ok(later.ended);
  await expectStreamError(t, () => later.push(new Uint8Array(1)), 'EFORMAT', '1 bytes follow the stream\'s End section');
});

t.test('a zero range of a section whose CRC fails is not applied', async (t) => {
  const section = sealed(SectionType.Pages, pagesPayload([[4, 2, 1]], 0));
  section[section.length - 2] ^= 0xff;
  const { target, received } = receiver(new Uint8Array(MEMORY_BYTES).fill(9));
  await expectStreamError(t, () => new SectionParser(target).push(section), 'ECHECKSUM', 'checksum mismatch in Pages section');
  t.same(received.zeroRanges, []);
  t.ok(received.memory.every((byte) => byte === 9));
});

t.test('waitingFor names what a stream that stops short was in', async (t) => {
  const { target } = receiver();
  const parser = new SectionParser(target);
  t.equal(parser.waitingFor, 'a section header');
  const section = sealed(SectionType.Pages, pagesPayload([[1, 1, 0]], PAGE_SIZE));
  parser.push(section.subarray(0, 40));
  t.equal(parser.waitingFor, 'a Pages section');
  parser.push(section.subarray(40));
  t.equal(parser.waitingFor, 'a section header');
  parser.push(encodeEnd());
  t.equal(parser.waitingFor, 'nothing (the stream has ended)');
});

t.test('a handler that throws fails the parse', async (t) => {
  const { target } = receiver();
  const parser = new SectionParser({ ...target, section: () => { throw new Error('refused'); } });
  t.throws(() => parser.push(encodeEnd()), { message: 'refused' });
  t.throws(() => parser.push(new Uint8Array(1)), { message: 'refused' });
});

t.test('bad targets are refused', async (t) => {
  const { target } = receiver();
  t.throws(() => new SectionParser(null as never), TypeError);
  t.throws(() => new SectionParser({ ...target, writePages: undefined as never }), TypeError);
  t.throws(() => new SectionParser({ ...target, memoryBytes: 4095 }), RangeError);
  t.throws(() => new SectionParser({ ...target, memoryBytes: 0 }), RangeError);
});
