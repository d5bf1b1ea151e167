// The sections of a stream parsed as its bytes arrive, in whatever pieces the socket hands over,
// for the destination of a migration: page data goes from the socket's read buffer straight to
// guest RAM (one copy), instead of being assembled into a section first and copied again.
//
// Checks are those of SectionReader + decodePages(): every length against its limit before
// anything is allocated, a Pages section's whole range table (every range inside guest RAM, data
// lengths adding up) before any of its data is placed, and every section's CRC. The one
// difference: a Pages section's data is placed in guest RAM as it arrives, so a section whose CRC
// then fails has already written there. That is safe only where the RAM is not in use until the
// stream has ended intact, as with an incoming migration: a bad section fails the migration and
// the machine being built is thrown away; the guest never runs on what it wrote. Zero ranges, which
// may free memory, are applied only once their section has checked out.
import { crc32c } from './checksum.js';
import {
  MAX_SECTION_PAYLOAD_BYTES, PAGE_RANGE_BYTES, SECTION_HEADER_BYTES, SectionType, StreamError, decodePageTable, pageTableBytes, sectionName,
  viewOf, type DecodedPages, type PageTable, type Section, type SectionName, type SectionTypeNumber,
} from './stream.js';

export interface SectionParserTarget {
  /** Guest RAM size: every Pages range must lie below it. */
  memoryBytes: number;
  /** `data` (valid only during the call) belongs at `guestPhysAddr`. May be called several times per range. */
  writePages(guestPhysAddr: number, data: Uint8Array): void;
  /** `byteLength` bytes from `guestPhysAddr` are zero pages (their section has checked out). */
  zeroPages(guestPhysAddr: number, byteLength: number): void;
  /** A Pages section has ended and checked out. */
  pagesDone?(counts: DecodedPages): void;
  /** Any other section, whole and checked; its payload is valid only during the call. */
  section(section: Section): void;
}

const enum Phase {
  Header,
  PageTable,
  PageData,
  Payload,
  Checksum,
  Ended,
}

const TYPE_NAMES = new Set<string>(Object.keys(SectionType));

export class SectionParser {
  readonly #target: SectionParserTarget;
  #phase = Phase.Header;
  #failure: Error | undefined;
  /** Bytes of a small field (header, CRC, table, non-page payload) gathered across pieces. */
  #gather = new Uint8Array(SECTION_HEADER_BYTES);
  /** The CRC after a payload: apart, so that the payload gathered before it stays intact. */
  readonly #trailer = new Uint8Array(4);
  #gathered = 0;
  #want = SECTION_HEADER_BYTES;
  #type = 0;
  #name: SectionName = 'End';
  #flags = 0;
  #payloadBytes = 0;
  #crc = 0;
  // Page data of the current Pages section.
  #table: PageTable | undefined;
  #range = 0;
  #rangeOffset = 0;
  #dataLeft = 0;
  #bytesParsed = 0;

  constructor(target: SectionParserTarget) {
    if (typeof target !== 'object' || target === null || typeof target.writePages !== 'function' ||
      typeof target.zeroPages !== 'function' || typeof target.section !== 'function') {
      throw new TypeError('target must have writePages(), zeroPages() and section()');
    }
    const { memoryBytes } = target;
    if (typeof memoryBytes !== 'number' || !Number.isSafeInteger(memoryBytes) || memoryBytes <= 0 || memoryBytes % 4096 !== 0) {
      throw new RangeError(`target.memoryBytes must be a positive multiple of 4096, got ${String(memoryBytes)}`);
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

  /** What the parser waits for, for an error message when the stream stops short. */
  get waitingFor(): string {
    switch (this.#phase) {
      case Phase.Header: return 'a section header';
      case Phase.Ended: return 'nothing (the stream has ended)';
      default: return `a ${this.#name} section`;
    }
  }

  /**
   * Parses `bytes` (valid only during the call). Throws a StreamError for a malformed stream, and
   * again on every later call.
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
      if (this.#phase === Phase.Ended) throw new StreamError('EFORMAT', `${bytes.length - at} bytes follow the stream's End section`);
      if (this.#phase === Phase.PageData) {
        const take = this.#pageData(bytes, at);
        at += take;
        this.#bytesParsed += take;
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
        this.#expect(4);
        return;
      case Phase.Checksum: return this.#checksum(viewOf(field).getUint32(0, true));
      default: throw new Error(`SectionParser: no field in phase ${this.#phase}`);
    }
  }

  #header(head: Uint8Array): void {
    const view = viewOf(head);
    const type = view.getUint16(0, true);
    const flags = view.getUint16(2, true);
    const length = view.getUint32(4, true);
    const name = sectionName(type);
    if (!TYPE_NAMES.has(name)) throw new StreamError('EFORMAT', `unknown section type ${type}`);
    const max = MAX_SECTION_PAYLOAD_BYTES[name as SectionName];
    if (length > max) throw new StreamError('ETOOBIG', `a ${name} section of ${length} bytes is over the ${max}-byte limit`);
    this.#type = type;
    this.#name = name as SectionName;
    this.#flags = flags;
    this.#payloadBytes = length;
    this.#crc = crc32c(head);
    if (type === SectionType.Pages && length >= 4) {
      this.#phase = Phase.PageTable;
      this.#expect(4);
    } else if (length > 0) {
      this.#phase = Phase.Payload;
      this.#expect(length);
    } else {
      this.#phase = Phase.Checksum;
      this.#expect(4);
    }
  }

  /** First the range count (4 bytes), then the whole table, then the data streams. */
  #pageTable(field: Uint8Array): void {
    if (field.length === 4) {
      const tableBytes = pageTableBytes(field);
      if (tableBytes > this.#payloadBytes) {
        const count = (tableBytes - 4) / PAGE_RANGE_BYTES;
        throw new StreamError('EFORMAT', `a Pages section announces ${count} ranges (${tableBytes} bytes of table) but holds ${this.#payloadBytes} bytes`);
      }
      if (tableBytes > 4) {
        const count = field.slice(0, 4);
        this.#expect(tableBytes);
        this.#gather.set(count, 0);
        this.#gathered = 4;
        return;
      }
    }
    const table = decodePageTable(field, this.#payloadBytes, this.#target.memoryBytes);
    this.#crc = crc32c(field, this.#crc);
    this.#table = table;
    this.#range = 0;
    this.#rangeOffset = 0;
    this.#dataLeft = this.#payloadBytes - table.tableBytes;
    this.#skipZeroRanges();
    if (this.#dataLeft === 0) {
      this.#phase = Phase.Checksum;
      this.#expect(4);
    } else {
      this.#phase = Phase.PageData;
    }
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
      this.#crc = crc32c(piece, this.#crc);
      this.#target.writePages(table.addrs[this.#range] + this.#rangeOffset, piece);
      taken += take;
      this.#dataLeft -= take;
      this.#rangeOffset += take;
      if (this.#rangeOffset === table.lengths[this.#range]) {
        this.#range++;
        this.#rangeOffset = 0;
        this.#skipZeroRanges();
      }
    }
    if (this.#dataLeft === 0) {
      this.#phase = Phase.Checksum;
      this.#expect(4);
    }
    return taken;
  }

  #checksum(expected: number): void {
    if (this.#crc !== expected) throw new StreamError('ECHECKSUM', `checksum mismatch in ${this.#name} section`);
    const table = this.#table;
    this.#table = undefined;
    this.#phase = Phase.Header;
    const payloadBytes = this.#payloadBytes;
    const payload = this.#type === SectionType.Pages ? new Uint8Array(0) : this.#gather.subarray(0, payloadBytes);
    this.#expect(SECTION_HEADER_BYTES);
    if (this.#type === SectionType.Pages) {
      if (payloadBytes < 4) throw new StreamError('EFORMAT', `a Pages section of ${payloadBytes} bytes is too short for its range count`);
      for (let i = 0; i < table!.rangeCount; i++) {
        if (table!.dataOffsets[i] < 0) this.#target.zeroPages(table!.addrs[i], table!.lengths[i]);
      }
      this.#target.pagesDone?.({ pages: table!.pages, zeroPages: table!.zeroPages });
      return;
    }
    if (this.#type === SectionType.End) this.#phase = Phase.Ended;
    this.#target.section({ type: this.#type as SectionTypeNumber, name: this.#name, flags: this.#flags, payload });
  }
}
