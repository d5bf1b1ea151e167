// The one parser of the section framing: fed the bytes of a stream in any pieces, it must place
// exactly the pages decodePages() would (streamed), or hand Pages sections over whole (for
// SectionReader), deliver the other sections intact, say how many bytes complete what it waits
// for, and refuse every malformed stream with the MigrationError that says what is wrong.
import t from 'tap';
import { SectionParser, type SectionParserTarget } from '../../lib/migration/section-parser.js';
import { MAX_SECTION_PAYLOAD_BYTES, SectionType, encodeEnd, encodeErrorSection, encodeSection, viewOf } from '../../lib/migration/format.js';
import { decodePagesInto, encodePages } from '../../lib/migration/pages.js';
import { PAGE_SIZE } from '../../lib/kvm/constants.js';
import { crc32c } from '../../lib/migration/checksum.js';
import { expectMigrationError } from '../helpers/migration-errors.js';
import { concat, ramWith as ramWithPages } from '../helpers/page-streams.js';

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

const ramWith = (dataPages: number[]): Uint8Array => ramWithPages(MEMORY_BYTES, dataPages);

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

t.test('malformed streams end in the MigrationError that says what is wrong, and nothing is placed before the table checks out', async (t) => {
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
      await expectMigrationError(t, () => feed(parser, bytes, () => pieces), code, message);
      // Once failed, it stays failed.
      await expectMigrationError(t, () => parser.push(new Uint8Array(1)), code, message);
      if (code === 'EFORMAT' || code === 'ETOOBIG') t.ok(received.memory.every((byte) => byte === 0), `${name}: nothing placed`);
      t.same(received.sections, [], `${name}: no section delivered`);
      t.same(received.zeroRanges, [], `${name}: no zero range applied`);
    }
  }
});

t.test('bytes after End are refused', async (t) => {
  const { target, received } = receiver();
  const parser = new SectionParser(target);
  await expectMigrationError(t, () => parser.push(concat([encodeEnd(), new Uint8Array(3)])), 'EFORMAT', '3 bytes follow the stream\'s End section');
  t.same(received.sections.map((s) => s.name), ['End']);
  const later = new SectionParser(receiver().target);
  later.push(encodeEnd());
  t.ok(later.ended);
  await expectMigrationError(t, () => later.push(new Uint8Array(1)), 'EFORMAT', '1 bytes follow the stream\'s End section');
});

t.test('a zero range of a section whose CRC fails is not applied', async (t) => {
  const section = sealed(SectionType.Pages, pagesPayload([[4, 2, 1]], 0));
  section[section.length - 2] ^= 0xff;
  const { target, received } = receiver(new Uint8Array(MEMORY_BYTES).fill(9));
  await expectMigrationError(t, () => new SectionParser(target).push(section), 'ECHECKSUM', 'checksum mismatch in Pages section');
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
  const typeError = { name: 'TypeError', code: 'ERR_INVALID_ARG_TYPE' };
  const rangeError = { name: 'RangeError', code: 'ERR_OUT_OF_RANGE' };
  t.throws(() => new SectionParser(null as never), typeError);
  t.throws(() => new SectionParser({ ...target, section: undefined as never }), typeError);
  t.throws(() => new SectionParser({ ...target, zeroPages: undefined }), { ...typeError, message: 'a target that streams pages must have writePages() and zeroPages()' });
  t.throws(() => new SectionParser({ ...target, memoryBytes: 4095 }), rangeError);
  t.throws(() => new SectionParser({ ...target, memoryBytes: 0 }), rangeError);
  t.throws(() => new SectionParser({ ...target, memoryBytes: undefined }), rangeError);
  t.doesNotThrow(() => new SectionParser({ section: () => {} }), 'without writePages: Pages come whole, no RAM size needed');
});

t.test('without writePages, Pages sections come whole, exactly as encoded, in any split', async (t) => {
  const ram = ramWith([0, 5, 6, 40]);
  const pages = encodePages([{ firstPage: 0, pageCount: MEMORY_BYTES / PAGE_SIZE }], (a, l) => ram.subarray(a, a + l), { maxDataBytesPerSection: 2 * PAGE_SIZE });
  const stream = concat([...pages.sections, encodeEnd()]);
  for (const pieceBytes of [stream.length, 1, 4093]) {
    const whole: { name: string; payload: Uint8Array }[] = [];
    const parser = new SectionParser({ section: (section) => whole.push({ name: section.name, payload: section.payload.slice() }) });
    feed(parser, stream, () => pieceBytes);
    t.same(whole.map((section) => section.name), [...pages.sections.map(() => 'Pages'), 'End'], `${pieceBytes}-byte pieces: every section`);
    pages.sections.forEach((section, index) => {
      t.ok(Buffer.from(whole[index].payload).equals(Buffer.from(section.subarray(8, section.length - 4))), `${pieceBytes}-byte pieces: Pages section ${index} intact`);
    });
    const placed = new Uint8Array(MEMORY_BYTES).fill(0x5a);
    for (const section of whole.slice(0, -1)) decodePagesInto(section.payload, placed);
    t.ok(Buffer.from(placed).equals(Buffer.from(ram)), `${pieceBytes}-byte pieces: decodePages() of them gives the source's RAM`);
  }
});

t.test('bytesWanted: a section header, then its payload with the CRC after it; 0 after End', async (t) => {
  const sections: string[] = [];
  const parser = new SectionParser({ section: (section) => sections.push(section.name) });
  const error = encodeErrorSection('twelve bytes');
  t.equal(parser.bytesWanted, 8, 'a section header');
  t.equal(parser.waitingFor, 'a section header');
  parser.push(error.subarray(0, 3));
  t.equal(parser.bytesWanted, 5, 'the rest of the header');
  parser.push(error.subarray(3, 8));
  t.equal(parser.bytesWanted, 12 + 4, 'the payload and its CRC');
  t.equal(parser.waitingFor, 'a Error section');
  parser.push(error.subarray(8, 15));
  t.equal(parser.bytesWanted, 5 + 4, 'the rest of the payload and its CRC');
  parser.push(error.subarray(15, 21));
  t.equal(parser.bytesWanted, 3, 'the rest of the CRC');
  parser.push(error.subarray(21));
  t.same(sections, ['Error']);
  const end = encodeEnd();
  parser.push(end.subarray(0, 8));
  t.equal(parser.bytesWanted, 4, 'an empty payload: its CRC');
  parser.push(end.subarray(8));
  t.equal(parser.bytesWanted, 0, 'nothing after End');
  t.ok(parser.ended);
  // Streamed Pages: the table, then all the data and the CRC.
  const { target } = receiver();
  const streamed = new SectionParser(target);
  const ram = ramWith([1, 2]);
  const [section] = encodePages([{ firstPage: 1, pageCount: 2 }], (a, l) => ram.subarray(a, a + l), {}).sections;
  streamed.push(section.subarray(0, 8));
  t.equal(streamed.bytesWanted, 4, 'the range count');
  streamed.push(section.subarray(8, 12));
  t.equal(streamed.bytesWanted, 16, 'the range table');
  streamed.push(section.subarray(12, 28));
  t.equal(streamed.bytesWanted, 2 * PAGE_SIZE + 4, 'the page data and the CRC');
  streamed.push(section.subarray(28, 28 + PAGE_SIZE));
  t.equal(streamed.bytesWanted, PAGE_SIZE + 4);
});
