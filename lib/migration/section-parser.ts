// The one parser of the section framing (format.ts): it takes a stream's bytes as they come, in
// whatever pieces, and hands over each section once its length limit and CRC have checked out.
// It is pushed bytes by the destination of a migration (from its socket's read buffer) and pulled
// through by SectionReader (section-reader.ts) for snapshot files and the source's replies, which
// asks it how many bytes it wants next.
//
// Every length is checked against its limit before anything is allocated. Pages sections go one
// of two ways:
//   - whole (no writePages in the target): like any other section, the payload handed over once
//     its CRC has checked out; decodePages() (pages.ts) checks and applies it later.
//   - streamed (writePages): the whole range table is checked first (every range inside guest
//     RAM, data lengths adding up), then page data goes from the caller's bytes straight to guest
//     RAM as it arrives (one copy). A section whose CRC then fails has already written there.
//     That is safe only where the RAM is not in use until the stream has ended intact, as with an
//     incoming migration: a bad section fails it and the machine being built is thrown away; the
//     guest never runs on what it wrote. Zero ranges, which may free memory, are applied only
//     once their section has checked out.
// A live Pages section (PAGES_SECTION_LIVE, pages.ts: sent from a running guest's RAM without a
// copy) is streamed only: its own CRC covers all but the data, which has a CRC of its own. A
// section whose own CRC fails fails the stream; one whose data's CRC fails (the guest wrote a page
// as it was sent) leaves its pages owed: the source sends every such page again (it is dirty
// there, and the destination asks for them: pagesOwed()), and the stream fails at a Postcopy or
// End section while a page is owed.
import { argTypeError, outOfRangeError } from '../kvm/errors.js';
import { crc32c } from './checksum.js';
import { MigrationError, MigrationErrorCode as Code, streamError } from './errors.js';
import {
  MAX_SECTION_PAYLOAD_BYTES, SECTION_HEADER_BYTES, SectionType, sectionTypeName, viewOf, type Section, type SectionName, type SectionTypeNumber,
} from './format.js';
import { PAGES_SECTION_LIVE, PAGE_RANGE_BYTES, decodePageTable, pageTableBytes, type DecodedPages, type PageTable } from './pages.js';

export interface SectionParserTarget {
  /** Every section but streamed Pages, whole and checked; its payload is valid only during the call. */
  section(section: Section): void;
  /**
   * With this, Pages sections are streamed: `data` (valid only during the call) belongs at
   * `guestPhysAddr`. May be called several times per range. Needs memoryBytes and zeroPages.
   */
  writePages?(guestPhysAddr: number, data: Uint8Array): void;
  /** Guest RAM size: every streamed Pages range must lie below it. */
  memoryBytes?: number;
  /** `byteLength` bytes from `guestPhysAddr` are zero pages (their section has checked out). */
  zeroPages?(guestPhysAddr: number, byteLength: number): void;
  /** A streamed Pages section has ended and checked out. */
  pagesDone?(counts: DecodedPages): void;
  /**
   * A live Pages section's data failed its CRC: the pages of `table` (zero ranges included) are
   * owed until a section that checks out brings them again (ask the source for them).
   */
  pagesOwed?(table: PageTable): void;
}

const enum Phase {
  Header,
  PageTable,
  PageData,
  /** A live Pages section's data CRC, after its data. */
  DataChecksum,
  Payload,
  Checksum,
  Ended,
}

const CRC_BYTES = 4;

export class SectionParser {
  readonly #target: SectionParserTarget;
  readonly #streamPages: boolean;
  #phase = Phase.Header;
  #failure: Error | undefined;
  /** Bytes of a field (header, table, payload) gathered across pieces. */
  #gather = new Uint8Array(SECTION_HEADER_BYTES);
  /** The CRC after a payload: apart, so that the payload gathered before it stays intact. */
  readonly #trailer = new Uint8Array(CRC_BYTES);
  #gathered = 0;
  #want = SECTION_HEADER_BYTES;
  #type = 0;
  #name: SectionName = 'End';
  #flags = 0;
  #payloadBytes = 0;
  #crc = 0;
  // Page data of the current streamed Pages section.
  #table: PageTable | undefined;
  #range = 0;
  #rangeOffset = 0;
  #dataLeft = 0;
  // A live Pages section: its data's CRC so far, and the one it announces.
  #live = false;
  #dataCrc = 0;
  #announcedDataCrc = 0;
  /** Pages of live sections whose data failed its CRC and has not come again since (one byte a page). */
  #owed: Uint8Array | undefined;
  #owedCount = 0;
  #bytesParsed = 0;

  constructor(target: SectionParserTarget) {
    if (typeof target !== 'object' || target === null || typeof target.section !== 'function') {
      throw argTypeError('target must have section()');
    }
    this.#streamPages = target.writePages !== undefined;
    if (this.#streamPages) {
      if (typeof target.writePages !== 'function' || typeof target.zeroPages !== 'function') {
        throw argTypeError('a target that streams pages must have writePages() and zeroPages()');
      }
      const { memoryBytes } = target;
      if (typeof memoryBytes !== 'number' || !Number.isSafeInteger(memoryBytes) || memoryBytes <= 0 || memoryBytes % 4096 !== 0) {
        throw outOfRangeError(`target.memoryBytes must be a positive multiple of 4096, got ${String(memoryBytes)}`);
      }
    }
    this.#target = target;
  }

  /** True once the End section has been parsed. */
  get ended(): boolean {
    return this.#phase === Phase.Ended;
  }

  /** Bytes parsed so far. */
  get bytesParsed(): number {
    return this.#bytesParsed;
  }

  /**
   * How many bytes complete what the parser waits for (a section header; a payload with the CRC
   * after it; ...): what a reader pulls next. 0 once the stream has ended.
   */
  get bytesWanted(): number {
    switch (this.#phase) {
      case Phase.Ended: return 0;
      case Phase.PageData: return this.#dataLeft + (this.#live ? 4 : 0) + CRC_BYTES;
      case Phase.DataChecksum:
      case Phase.Payload: return this.#want - this.#gathered + CRC_BYTES;
      default: return this.#want - this.#gathered;
    }
  }

  /** What the parser waits for, for an error message when the stream stops short. */
  get waitingFor(): string {
    switch (this.#phase) {
      case Phase.Header: return 'a section header';
      case Phase.Ended: return 'nothing (the stream has ended)';
      default: return `a ${this.#name} section`;
    }
  }

  /**
   * Parses `bytes` (valid only during the call). Throws a MigrationError for a malformed stream,
   * and again on every later call.
   */
  push(bytes: Uint8Array): void {
    if (this.#failure) throw this.#failure;
    try {
      this.#push(bytes);
    } catch (error) {
      this.#failure = error as Error;
      throw error;
    }
  }

  #push(bytes: Uint8Array): void {
    let at = 0;
    while (at < bytes.length) {
      if (this.#phase === Phase.Ended) throw streamError(Code.Format, `${bytes.length - at} bytes follow the stream's End section`);
      if (this.#phase === Phase.PageData) {
        const take = this.#pageData(bytes, at);
        at += take;
        this.#bytesParsed += take;
        continue;
      }
      // A whole payload and its CRC in these bytes: checked where it lies, without a copy.
      if (this.#phase === Phase.Payload && this.#gathered === 0 && bytes.length - at >= this.#want + CRC_BYTES) {
        const payload = bytes.subarray(at, at + this.#want);
        const expected = viewOf(bytes).getUint32(at + this.#want, true);
        const take = this.#want + CRC_BYTES;
        at += take;
        this.#bytesParsed += take;
        this.#crc = crc32c(payload, this.#crc);
        this.#sectionComplete(expected, payload);
        continue;
      }
      const take = Math.min(this.#want - this.#gathered, bytes.length - at);
      (this.#phase === Phase.Checksum ? this.#trailer : this.#gather).set(bytes.subarray(at, at + take), this.#gathered);
      this.#gathered += take;
      at += take;
      this.#bytesParsed += take;
      if (this.#gathered === this.#want) this.#fieldComplete();
    }
  }

  #expect(byteCount: number): void {
    if (this.#phase !== Phase.Checksum && this.#gather.length < byteCount) this.#gather = new Uint8Array(Math.max(byteCount, 2 * this.#gather.length));
    this.#gathered = 0;
    this.#want = byteCount;
  }

  #fieldComplete(): void {
    const field = (this.#phase === Phase.Checksum ? this.#trailer : this.#gather).subarray(0, this.#want);
    switch (this.#phase) {
      case Phase.Header: return this.#header(field);
      case Phase.PageTable: return this.#pageTable(field);
      case Phase.Payload:
        this.#crc = crc32c(field, this.#crc);
        this.#phase = Phase.Checksum;
        this.#expect(CRC_BYTES);
        return;
      case Phase.DataChecksum:
        this.#crc = crc32c(field, this.#crc);
        this.#announcedDataCrc = viewOf(field).getUint32(0, true);
        this.#phase = Phase.Checksum;
        this.#expect(CRC_BYTES);
        return;
      case Phase.Checksum: return this.#sectionComplete(viewOf(field).getUint32(0, true), this.#gather.subarray(0, this.#payloadBytes));
      default: throw new MigrationError(Code.InvalidState, `SectionParser: no field in phase ${this.#phase}`);
    }
  }

  #header(head: Uint8Array): void {
    const view = viewOf(head);
    const type = view.getUint16(0, true);
    const flags = view.getUint16(2, true);
    const length = view.getUint32(4, true);
    const name = sectionTypeName(type);
    if (!name) throw streamError(Code.Format, `unknown section type ${type}`);
    const max = MAX_SECTION_PAYLOAD_BYTES[name];
    if (length > max) throw streamError(Code.TooBig, `a ${name} section of ${length} bytes is over the ${max}-byte limit`);
    this.#type = type;
    this.#name = name;
    this.#flags = flags;
    this.#payloadBytes = length;
    this.#crc = crc32c(head);
    // Streamed, a Pages section's flags say how to read it; whole, they are checked once its CRC
    // has (a live one fails that: its CRC leaves the data out).
    this.#live = this.#streamPages && type === SectionType.Pages && (flags & PAGES_SECTION_LIVE) !== 0;
    if (this.#streamPages && type === SectionType.Pages) {
      if ((flags & ~PAGES_SECTION_LIVE) !== 0) throw streamError(Code.Format, `a Pages section has unknown flags 0x${flags.toString(16)}`);
      if (this.#live && length < 8) throw streamError(Code.Format, `a live Pages section of ${length} bytes is too short for its range count and data CRC`);
    }
    if (type === SectionType.Pages && this.#streamPages && length >= 4) {
      this.#phase = Phase.PageTable;
      this.#expect(4);
    } else if (length > 0) {
      this.#phase = Phase.Payload;
      this.#expect(length);
    } else {
      this.#phase = Phase.Checksum;
      this.#expect(CRC_BYTES);
    }
  }

  /** First the range count (4 bytes), then the whole table, then the data streams. */
  #pageTable(field: Uint8Array): void {
    if (field.length === 4) {
      const tableBytes = pageTableBytes(field);
      if (tableBytes > this.#payloadBytes) {
        const count = (tableBytes - 4) / PAGE_RANGE_BYTES;
        throw streamError(Code.Format, `a Pages section announces ${count} ranges (${tableBytes} bytes of table) but holds ${this.#payloadBytes} bytes`);
      }
      if (tableBytes > 4) {
        const count = field.slice(0, 4);
        this.#expect(tableBytes);
        this.#gather.set(count, 0);
        this.#gathered = 4;
        return;
      }
    }
    // A live section's data CRC follows its data: the table accounts for the rest.
    const dataEnd = this.#payloadBytes - (this.#live ? 4 : 0);
    const table = decodePageTable(field, dataEnd, this.#target.memoryBytes!);
    this.#crc = crc32c(field, this.#crc);
    this.#dataCrc = 0;
    this.#table = table;
    this.#range = 0;
    this.#rangeOffset = 0;
    this.#dataLeft = dataEnd - table.tableBytes;
    this.#skipZeroRanges();
    if (this.#dataLeft === 0) this.#afterPageData();
    else this.#phase = Phase.PageData;
  }

  #afterPageData(): void {
    this.#phase = this.#live ? Phase.DataChecksum : Phase.Checksum;
    this.#expect(this.#live ? 4 : CRC_BYTES);
  }

  #skipZeroRanges(): void {
    const table = this.#table!;
    while (this.#range < table.rangeCount && table.dataOffsets[this.#range] < 0) this.#range++;
  }

  /** Places page data from `bytes` at `at` on; returns how many bytes it took. */
  #pageData(bytes: Uint8Array, at: number): number {
    const table = this.#table!;
    let taken = 0;
    while (this.#dataLeft > 0 && at + taken < bytes.length) {
      const rangeLeft = table.lengths[this.#range] - this.#rangeOffset;
      const take = Math.min(rangeLeft, bytes.length - at - taken);
      const piece = bytes.subarray(at + taken, at + taken + take);
      if (this.#live) this.#dataCrc = crc32c(piece, this.#dataCrc);
      else this.#crc = crc32c(piece, this.#crc);
      this.#target.writePages!(table.addrs[this.#range] + this.#rangeOffset, piece);
      taken += take;
      this.#dataLeft -= take;
      this.#rangeOffset += take;
      if (this.#rangeOffset === table.lengths[this.#range]) {
        this.#range++;
        this.#rangeOffset = 0;
        this.#skipZeroRanges();
      }
    }
    if (this.#dataLeft === 0) this.#afterPageData();
    return taken;
  }

  /** Marks the pages of `table` owed (`owed`), or no longer owed. */
  #owe(table: PageTable, owed: boolean): void {
    const marks = (this.#owed ??= new Uint8Array(this.#target.memoryBytes! / 4096));
    for (let i = 0; i < table.rangeCount; i++) {
      const first = table.addrs[i] / 4096;
      const end = first + table.lengths[i] / 4096;
      for (let page = first; page < end; page++) {
        if (marks[page] === (owed ? 0 : 1)) {
          marks[page] = owed ? 1 : 0;
          this.#owedCount += owed ? 1 : -1;
        }
      }
    }
  }

  /** Pages owed by live Pages sections whose data failed its CRC (see the top of this file). */
  get owedPages(): number {
    return this.#owedCount;
  }

  /** The section's CRC came in: check it, then hand the section over. */
  #sectionComplete(expected: number, payload: Uint8Array): void {
    if (this.#crc !== expected) throw streamError(Code.Checksum, `checksum mismatch in ${this.#name} section`);
    const table = this.#table;
    this.#table = undefined;
    this.#phase = Phase.Header;
    const payloadBytes = this.#payloadBytes;
    this.#expect(SECTION_HEADER_BYTES);
    if (this.#type === SectionType.Pages && this.#streamPages) {
      if (payloadBytes < 4) throw streamError(Code.Format, `a Pages section of ${payloadBytes} bytes is too short for its range count`);
      if (this.#live && this.#dataCrc !== this.#announcedDataCrc) {
        // The guest wrote some of these pages as they were sent: they are owed, zero ranges too.
        this.#owe(table!, true);
        this.#target.pagesOwed?.(table!);
      } else {
        for (let i = 0; i < table!.rangeCount; i++) {
          if (table!.dataOffsets[i] < 0) this.#target.zeroPages!(table!.addrs[i], table!.lengths[i]);
        }
        if (this.#owedCount > 0) this.#owe(table!, false);
      }
      this.#target.pagesDone?.({ pages: table!.pages, zeroPages: table!.zeroPages });
      return;
    }
    if (this.#type === SectionType.Pages && this.#flags !== 0) {
      throw streamError(Code.Format, `a Pages section has flags 0x${this.#flags.toString(16)}: only a live migration's destination reads live ones`);
    }
    if ((this.#type === SectionType.End || this.#type === SectionType.Postcopy) && this.#owedCount > 0) {
      throw streamError(Code.Checksum, `${this.#owedCount} pages failed their checksum in a live Pages section and were not sent again before the ${this.#name} section`);
    }
    if (this.#type === SectionType.End) this.#phase = Phase.Ended;
    this.#target.section({ type: this.#type as SectionTypeNumber, name: this.#name, flags: this.#flags, payload });
  }
}
