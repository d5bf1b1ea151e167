// Live Pages sections (PAGES_SECTION_LIVE): the source sends a running guest's pages from its RAM
// without a copy, so a page the guest writes as it goes out fails the data's CRC. The parser must
// place what a copied section places, leave such pages owed (and say so) rather than fail, clear
// them when a section that checks out brings them again, and fail the stream at End or Postcopy
// while any is owed; anything else wrong with a live section fails at once.
import t from 'tap';
import { PAGE_SIZE } from '../../lib/kvm/constants.js';
import { encodeLivePagesSection } from '../../lib/kvm/host.js';
import { SectionType, encodeEnd, encodeSection } from '../../lib/migration/format.js';
import { MAX_BATCH_SECTION_BYTES, encodeLivePageBatch, encodePageBatch, type PageTable } from '../../lib/migration/pages.js';
import { SectionParser, type SectionParserTarget } from '../../lib/migration/section-parser.js';
import { encodePageRanges } from '../../lib/migration/postcopy-ranges.js';
import { expectMigrationError } from '../helpers/migration-errors.js';
import { concat, ramWith as ramWithPages } from '../helpers/page-streams.js';

const MEMORY_PAGES = 64;
const MEMORY_BYTES = MEMORY_PAGES * PAGE_SIZE;

interface Received {
  memory: Uint8Array;
  owed: [number, number][][];
  pagesDone: number;
  sections: string[];
}

function receiver(): { target: SectionParserTarget; received: Received } {
  const received: Received = { memory: new Uint8Array(MEMORY_BYTES), owed: [], pagesDone: 0, sections: [] };
  const target: SectionParserTarget = {
    memoryBytes: MEMORY_BYTES,
    writePages: (guestPhysAddr, data) => received.memory.set(data, guestPhysAddr),
    zeroPages: (guestPhysAddr, byteLength) => received.memory.fill(0, guestPhysAddr, guestPhysAddr + byteLength),
    pagesDone: () => void received.pagesDone++,
    pagesOwed: (table: PageTable) => {
      const ranges: [number, number][] = [];
      for (let i = 0; i < table.rangeCount; i++) ranges.push([table.addrs[i]! / PAGE_SIZE, table.lengths[i]! / PAGE_SIZE]);
      received.owed.push(ranges);
    },
    section: (section) => void received.sections.push(section.name),
  };
  return { target, received };
}

const ramWith = (dataPages: number[]): Uint8Array => ramWithPages(MEMORY_BYTES, dataPages);

/** Feeds `bytes` in pieces of 1..`maxPiece` bytes (a fixed pattern, so that a failure repeats). */
function feed(parser: SectionParser, bytes: Uint8Array, maxPiece: number): void {
  for (let at = 0, i = 0; at < bytes.length; i++) {
    const take = 1 + ((i * 7919) % maxPiece);
    parser.push(bytes.subarray(at, at + take));
    at += take;
  }
}

const DATA_PAGES = [0, 1, 2, 5, 9, 10, 33, 63];

t.test('a live section places exactly what a copied one does, fed whole or in pieces', async (t) => {
  const ram = ramWith(DATA_PAGES);
  for (const destinationZeroed of [true, false]) {
    const live = encodeLivePageBatch(ram, [{ firstPage: 0, pageCount: MEMORY_PAGES }], destinationZeroed);
    const copied = encodePageBatch(ram, [{ firstPage: 0, pageCount: MEMORY_PAGES }], destinationZeroed, new Uint8Array(MAX_BATCH_SECTION_BYTES));
    t.equal(live.pagesSent, copied.pagesSent, 'the same data pages');
    t.equal(live.zeroPages, copied.zeroPages, 'the same zero pages');
    t.equal(live.bytes, copied.section.length + 4, 'its length: the copied section\'s and the data\'s CRC');
    t.equal(live.chunks.filter((chunk) => chunk.buffer === ram.buffer).length, 5, 'the data as views of guest RAM itself: one per run of data pages');
    for (const maxPiece of [1 << 20, 4097, 13]) {
      const { target, received } = receiver();
      // Where the destination's RAM starts zeroed, so does this one; otherwise it holds junk.
      if (!destinationZeroed) received.memory.fill(0xee);
      const parser = new SectionParser(target);
      feed(parser, concat([...live.chunks, encodeEnd()]), maxPiece);
      t.ok(parser.ended, `ended (zeroed ${destinationZeroed}, pieces up to ${maxPiece})`);
      t.same(received.memory, ram, 'guest RAM as the source has it');
      t.same(received.owed, [], 'nothing owed');
      t.equal(parser.owedPages, 0);
      t.equal(received.pagesDone, 1);
    }
  }
  const empty = encodeLivePageBatch(new Uint8Array(MEMORY_BYTES), [{ firstPage: 0, pageCount: MEMORY_PAGES }], true);
  t.same([empty.chunks, empty.bytes, empty.pagesSent, empty.zeroPages], [[], 0, 0, MEMORY_PAGES], 'zero pages to a zeroed destination: nothing to send');
});

t.test('a page written as it goes out: owed and asked for, cleared when it comes again, and only then may the stream end', async (t) => {
  const ram = ramWith(DATA_PAGES);
  const batch = [{ firstPage: 0, pageCount: 16 }];
  const live = encodeLivePageBatch(ram, batch, true);
  // The guest writes page 9 after its CRC was taken, before the socket copied it.
  ram.fill(0x5a, 9 * PAGE_SIZE, 9 * PAGE_SIZE + 100);
  const { target, received } = receiver();
  const parser = new SectionParser(target);
  feed(parser, concat(live.chunks), 1000);
  t.same(received.owed, [[[0, 3], [5, 1], [9, 2]]], 'the section\'s ranges are owed, and said so once');
  t.equal(parser.owedPages, 6);
  t.equal(received.pagesDone, 1, 'the section counts as parsed');

  // The next round brings page 9 (dirty at the source): a copied section, or a live one.
  const again = encodeLivePageBatch(ram, [{ firstPage: 9, pageCount: 1 }], false);
  parser.push(concat(again.chunks));
  t.equal(parser.owedPages, 5, 'page 9 is no longer owed');
  await expectMigrationError(t, () => parser.push(encodeEnd()), 'ECHECKSUM',
    '5 pages failed their checksum in a live Pages section and were not sent again before the End section');

  // The same stream, with every owed page sent again (as the source does when asked).
  const second = receiver();
  const complete = new SectionParser(second.target);
  feed(complete, concat(live.chunks), 1000);
  const { section } = encodePageBatch(ram, [{ firstPage: 0, pageCount: 3 }, { firstPage: 5, pageCount: 1 }, { firstPage: 9, pageCount: 2 }], false, new Uint8Array(MAX_BATCH_SECTION_BYTES));
  complete.push(section);
  t.equal(complete.owedPages, 0);
  complete.push(encodeEnd());
  t.ok(complete.ended, 'the stream ends');
  t.same(second.received.memory.subarray(0, 16 * PAGE_SIZE), ram.subarray(0, 16 * PAGE_SIZE), 'with the page as the guest last wrote it');
});

t.test('owed pages fail the stream at a Postcopy section too', async (t) => {
  const ram = ramWith(DATA_PAGES);
  const live = encodeLivePageBatch(ram, [{ firstPage: 30, pageCount: 4 }], true);
  ram[33 * PAGE_SIZE] ^= 1;
  const { target } = receiver();
  const parser = new SectionParser(target);
  parser.push(concat(live.chunks));
  await expectMigrationError(t, () => parser.push(encodeSection(SectionType.Postcopy, encodePageRanges([{ firstPage: 33, pageCount: 1 }]))), 'ECHECKSUM',
    /^1 pages failed their checksum in a live Pages section and were not sent again before the Postcopy section$/);
});

t.test('anything else wrong with a live section fails the stream at once', async (t) => {
  const ram = ramWith(DATA_PAGES);
  const live = () => encodeLivePageBatch(ram, [{ firstPage: 0, pageCount: 16 }], true);

  // Its table, or the data's CRC itself: the section's own CRC covers them.
  for (const [what, chunk, at] of [['a range\'s first page', 0, 12], ['the data\'s CRC', -1, 0]] as const) {
    const { chunks } = live();
    const target = chunks.at(chunk)!;
    const tampered = chunks.map((c) => (c === target ? new Uint8Array(c) : c));
    tampered.at(chunk)![at] ^= 1;
    const parser = new SectionParser(receiver().target);
    await expectMigrationError(t, () => parser.push(concat(tampered)), 'ECHECKSUM', 'checksum mismatch in Pages section');
    t.equal(parser.owedPages, 0, `${what} changed: not owed, failed`);
  }

  // Where pages are not streamed (a snapshot file, the source's replies), none is taken: its CRC
  // leaves the data out, and a Pages section with flags that does check out is refused.
  await expectMigrationError(t, () => new SectionParser({ section: () => {} }).push(concat(live().chunks)), 'ECHECKSUM', 'checksum mismatch in Pages section');
  await expectMigrationError(t, () => new SectionParser({ section: () => {} }).push(encodeSection(SectionType.Pages, new Uint8Array(4), 1)), 'EFORMAT',
    'a Pages section has flags 0x1: only a live migration\'s destination reads live ones');

  // Flags it does not know.
  const { chunks } = live();
  const head = new Uint8Array(chunks[0]!);
  head[2] = 3;
  await expectMigrationError(t, () => new SectionParser(receiver().target).push(concat([head, ...chunks.slice(1)])), 'EFORMAT', 'a Pages section has unknown flags 0x3');

  // Too short to hold its range count and the data's CRC.
  const short = encodeSection(SectionType.Pages, new Uint8Array(4), 1);
  await expectMigrationError(t, () => new SectionParser(receiver().target).push(short), 'EFORMAT', /a live Pages section of 4 bytes is too short/);
});

t.test('encodeLivePagesSection() checks its arguments', async (t) => {
  const ram = ramWith(DATA_PAGES);
  const ranges = new Float64Array([0, MEMORY_PAGES]);
  const out = new Uint8Array(8 + 4 + MEMORY_PAGES * 16 + 8);
  t.throws(() => encodeLivePagesSection(ram, ranges, 1, true, out, SectionType.Pages, new Float64Array(2)), { name: 'RangeError', message: /dataRuns is too short/ });
  t.throws(() => encodeLivePagesSection(ram, ranges, 1, true, new Uint8Array(16), SectionType.Pages, new Float64Array(128)), { name: 'RangeError', message: /out holds 16 bytes/ });
  t.throws(() => encodeLivePagesSection(ram, ranges, 1, true, out, SectionType.Pages, [] as unknown as Float64Array), { name: 'TypeError', message: 'dataRuns must be a Float64Array' });
  t.throws(() => encodeLivePagesSection(ram, new Float64Array([60, 8]), 1, true, out, SectionType.Pages, new Float64Array(128)), { name: 'RangeError', message: /lies outside guest RAM/ });
});
