// Pages sections: guest pages as ranges of guest frames, zero ranges without data.
//
// Payload: u32 rangeCount; per range u64 firstPage (guest frame number), u32 pageCount, u32 flags;
// then the data of the ranges without PAGES_ZERO, in range order. decodePages() checks every
// range of a section against guest RAM before it applies any.
import { PAGE_SIZE } from '../kvm/constants.js';
import { argTypeError, outOfRangeError } from '../kvm/errors.js';
import { encodeLivePagesSection, encodePagesSection } from '../kvm/host.js';
import { MigrationErrorCode as Code, streamError } from './errors.js';
import { SECTION_HEADER_BYTES, SECTION_OVERHEAD_BYTES, SectionType, getU64, sealSection, setU64, viewOf } from './format.js';

const MiB = 1024 * 1024;

const ZERO_PAGE = Buffer.alloc(PAGE_SIZE);
const ZERO_BLOCK_PAGES = 16;
const ZERO_BLOCK = Buffer.alloc(ZERO_BLOCK_PAGES * PAGE_SIZE);
const PAGE_WORDS = PAGE_SIZE / 4;

/** Whether the 4 KiB page at `offset` of `bytes` is all zeros (a memcmp, no allocation). */
export function isZeroPage(bytes: Uint8Array, offset: number): boolean {
  return ZERO_PAGE.compare(bytes, offset, offset + PAGE_SIZE) === 0;
}

/**
 * Calls `onRun(firstPageIndex, pageCount, zero)` for the maximal runs of all-zero and not-all-zero
 * pages of `bytes` (a whole number of pages), in order.
 */
export function forEachPageRun(bytes: Uint8Array, onRun: (firstPageIndex: number, pageCount: number, zero: boolean) => void): void {
  const pageCount = Math.floor(bytes.length / PAGE_SIZE);
  // A page of data mostly shows it in its first bytes: read there, a memcmp only where they are
  // zero (a call per page cost more than the rest of the scan).
  const words = bytes.byteOffset % 4 === 0 ? new Int32Array(bytes.buffer, bytes.byteOffset, (pageCount * PAGE_SIZE) / 4) : null;
  let runStart = 0;
  let runZero = false;
  let page = 0;
  while (page < pageCount) {
    let zero: boolean;
    let step = 1;
    if (words !== null && (words[page * PAGE_WORDS] !== 0 || words[page * PAGE_WORDS + 1] !== 0)) {
      zero = false;
    } else if (page + ZERO_BLOCK_PAGES <= pageCount && ZERO_BLOCK.compare(bytes, page * PAGE_SIZE, (page + ZERO_BLOCK_PAGES) * PAGE_SIZE) === 0) {
      // Idle guest RAM is mostly zero: test 64 KiB at once before testing pages one by one.
      zero = true;
      step = ZERO_BLOCK_PAGES;
    } else {
      zero = isZeroPage(bytes, page * PAGE_SIZE);
    }
    if (page === 0) runZero = zero;
    else if (zero !== runZero) {
      onRun(runStart, page - runStart, runZero);
      runStart = page;
      runZero = zero;
    }
    page += step;
  }
  if (pageCount > 0) onRun(runStart, pageCount - runStart, runZero);
}

/** Range flag: every page of the range is zero; no data follows for it. */
export const PAGES_ZERO = 1;
/**
 * Section flag: a live Pages section, sent from a running guest's RAM without a copy. Its payload
 * is the table and the data as above, then u32 CRC-32C of the data; the section's CRC covers all
 * but the data. The guest may write a page as it goes out, so a data CRC that fails leaves its
 * pages owed, not the stream failed: they come again (see section-parser.ts). Only to a
 * destination whose greeting says it reads them (handshake.ts), and never with post-copy.
 */
export const PAGES_SECTION_LIVE = 1;
export const PAGE_RANGE_BYTES = 16;
/** Default data per Pages section: big enough to amortize, small enough to interleave. */
export const DEFAULT_PAGES_DATA_BYTES = 2 * MiB;
const MAX_PAGES_DATA_BYTES = 32 * MiB;
const MAX_RANGES_PER_SECTION = 65536;
/** Pages read from the caller's memory at a time. */
const READ_BLOCK_PAGES = 256;
const MAX_RANGE_PAGES = 0xffffffff;

export interface EncodePagesOptions {
  /** Page data per section at most (a multiple of PAGE_SIZE). Default 2 MiB. */
  maxDataBytesPerSection?: number;
  /**
   * The destination's RAM is known to be zero where these pages go (the first full pass): zero
   * pages are then left out of the stream altogether. Otherwise (later passes, diff snapshots) they
   * are sent as zero ranges, because the destination may hold older data there.
   */
  destinationZeroed?: boolean;
  /** When given, every range must lie below this guest RAM size. */
  memoryBytes?: number;
  /**
   * Where each section is built: a buffer of exactly `byteLength` bytes, every one of which will
   * be written. Default: a new Uint8Array. A sender that recycles its buffers once written avoids
   * faulting in fresh memory for every section.
   */
  allocate?: (byteLength: number) => Uint8Array;
}

export interface EncodedPages {
  /** Complete Pages sections, each in its own buffer. */
  sections: Uint8Array[];
  /** Non-zero pages, sent with their data. */
  pagesSent: number;
  /** Pages found all-zero: sent as zero ranges, or left out with destinationZeroed. */
  zeroPages: number;
  /** Total size of `sections`. */
  bytes: number;
}

interface PendingRange {
  firstPage: number;
  pageCount: number;
  zero: boolean;
  data: Uint8Array[];
}

/**
 * Encodes the pages of `ranges` into Pages sections. `read(guestPhysAddr, byteLength)` returns the
 * bytes there, as a view that stays valid until encodePages() returns (a view of guest RAM). Data
 * is copied into the section buffers, and each section's CRC covers the copy, so the guest may
 * change its pages afterwards without invalidating the stream.
 */
export function encodePages(
  ranges: readonly PageRangeLike[],
  read: (guestPhysAddr: number, byteLength: number) => Uint8Array,
  options: EncodePagesOptions = {},
): EncodedPages {
  if (!Array.isArray(ranges)) throw argTypeError('ranges must be an array of { firstPage, pageCount }');
  if (typeof read !== 'function') throw argTypeError('read must be a function');
  const maxData = options.maxDataBytesPerSection ?? DEFAULT_PAGES_DATA_BYTES;
  if (!Number.isInteger(maxData) || maxData < PAGE_SIZE || maxData > MAX_PAGES_DATA_BYTES || maxData % PAGE_SIZE !== 0) {
    throw outOfRangeError(`maxDataBytesPerSection must be a multiple of ${PAGE_SIZE} from ${PAGE_SIZE} to ${MAX_PAGES_DATA_BYTES}, got ${maxData}`);
  }
  let memoryPages = Math.floor(Number.MAX_SAFE_INTEGER / PAGE_SIZE);
  if (options.memoryBytes !== undefined) {
    const { memoryBytes } = options;
    if (!Number.isSafeInteger(memoryBytes) || memoryBytes < 0 || memoryBytes % PAGE_SIZE !== 0) {
      throw outOfRangeError(`memoryBytes must be a multiple of ${PAGE_SIZE}, got ${memoryBytes}`);
    }
    memoryPages = memoryBytes / PAGE_SIZE;
  }
  const destinationZeroed = options.destinationZeroed === true;
  const allocate = options.allocate;
  if (allocate !== undefined && typeof allocate !== 'function') throw argTypeError('allocate must be a function');

  const result: EncodedPages = { sections: [], pagesSent: 0, zeroPages: 0, bytes: 0 };
  let pending: PendingRange[] = [];
  let pendingDataBytes = 0;

  const flush = (): void => {
    if (pending.length === 0) return;
    const sectionBytes = SECTION_OVERHEAD_BYTES + 4 + pending.length * PAGE_RANGE_BYTES + pendingDataBytes;
    const section = allocate ? allocate(sectionBytes) : new Uint8Array(sectionBytes);
    if (!(section instanceof Uint8Array) || section.length !== sectionBytes) throw outOfRangeError(`allocate(${sectionBytes}) must return a Uint8Array of that length`);
    const view = viewOf(section);
    let entry = SECTION_HEADER_BYTES;
    view.setUint32(entry, pending.length, true);
    entry += 4;
    let dataAt = entry + pending.length * PAGE_RANGE_BYTES;
    for (const range of pending) {
      setU64(view, entry, range.firstPage);
      view.setUint32(entry + 8, range.pageCount, true);
      view.setUint32(entry + 12, range.zero ? PAGES_ZERO : 0, true);
      entry += PAGE_RANGE_BYTES;
      for (const chunk of range.data) {
        section.set(chunk, dataAt);
        dataAt += chunk.length;
      }
    }
    sealSection(section, SectionType.Pages, 0);
    result.sections.push(section);
    result.bytes += section.length;
    pending = [];
    pendingDataBytes = 0;
  };

  const addZero = (firstPage: number, pageCount: number): void => {
    result.zeroPages += pageCount;
    if (destinationZeroed) return;
    const last = pending.at(-1);
    if (last?.zero && last.firstPage + last.pageCount === firstPage && last.pageCount + pageCount <= MAX_RANGE_PAGES) {
      last.pageCount += pageCount;
      return;
    }
    if (pending.length === MAX_RANGES_PER_SECTION) flush();
    pending.push({ firstPage, pageCount, zero: true, data: [] });
  };

  const addData = (firstPage: number, data: Uint8Array): void => {
    result.pagesSent += data.length / PAGE_SIZE;
    let offset = 0;
    while (offset < data.length) {
      const room = maxData - pendingDataBytes;
      if (room === 0 || pending.length === MAX_RANGES_PER_SECTION) {
        flush();
        continue;
      }
      const take = Math.min(room, data.length - offset);
      const chunk = data.subarray(offset, offset + take);
      const page = firstPage + offset / PAGE_SIZE;
      const last = pending.at(-1);
      if (last && !last.zero && last.firstPage + last.pageCount === page) {
        last.pageCount += take / PAGE_SIZE;
        last.data.push(chunk);
      } else {
        pending.push({ firstPage: page, pageCount: take / PAGE_SIZE, zero: false, data: [chunk] });
      }
      pendingDataBytes += take;
      offset += take;
    }
  };

  ranges.forEach((range, index) => {
    const { firstPage, pageCount } = checkPageRange(range, `ranges[${index}]`);
    if (firstPage + pageCount > memoryPages) {
      throw outOfRangeError(`ranges[${index}] (pages ${firstPage}..${firstPage + pageCount - 1}) lies beyond guest RAM (${memoryPages} pages)`);
    }
    const endPage = firstPage + pageCount;
    for (let blockPage = firstPage; blockPage < endPage; blockPage += READ_BLOCK_PAGES) {
      const blockPages = Math.min(READ_BLOCK_PAGES, endPage - blockPage);
      const bytes = read(blockPage * PAGE_SIZE, blockPages * PAGE_SIZE);
      if (!(bytes instanceof Uint8Array) || bytes.length !== blockPages * PAGE_SIZE) {
        throw outOfRangeError(`read(${blockPage * PAGE_SIZE}, ${blockPages * PAGE_SIZE}) must return a Uint8Array of ${blockPages * PAGE_SIZE} bytes`);
      }
      forEachPageRun(bytes, (runIndex, runPages, zero) => {
        if (zero) addZero(blockPage + runIndex, runPages);
        else addData(blockPage + runIndex, bytes.subarray(runIndex * PAGE_SIZE, (runIndex + runPages) * PAGE_SIZE));
      });
    }
  });
  flush();
  return result;
}

/** The most pages encodePageBatch() takes at once: one section's worth of data (2 MiB). */
export const MAX_BATCH_PAGES = DEFAULT_PAGES_DATA_BYTES / PAGE_SIZE;
/** The largest section encodePageBatch() makes: MAX_BATCH_PAGES pages of data, as many ranges. */
export const MAX_BATCH_SECTION_BYTES = SECTION_OVERHEAD_BYTES + 4 + MAX_BATCH_PAGES * (PAGE_RANGE_BYTES + PAGE_SIZE);

/** What encodePageBatch() made: `section` is empty when there was nothing to send. */
export interface EncodedBatch {
  section: Uint8Array;
  pagesSent: number;
  zeroPages: number;
}

/**
 * encodePages() of at most MAX_BATCH_PAGES pages of `ram`, byte for byte the same section, made
 * natively into `out` (MAX_BATCH_SECTION_BYTES at least): the zero-page scan, the copy and the CRC
 * in one pass over the data, which the source's JavaScript otherwise spent as much time around as
 * in. The section is a view of `out`.
 */
export function encodePageBatch(ram: Uint8Array, batch: readonly PageRangeLike[], destinationZeroed: boolean, out: Uint8Array): EncodedBatch {
  checkedRangePairs(batch);
  const [sectionBytes, pagesSent, zeroPages] = encodePagesSection(ram, rangePairs, batch.length, destinationZeroed, out, SectionType.Pages);
  return { section: out.subarray(0, sectionBytes), pagesSent, zeroPages };
}

let rangePairs = new Float64Array(64);

/** `batch` checked, into rangePairs as (firstPage, pageCount) pairs; its page count. */
function checkedRangePairs(batch: readonly PageRangeLike[]): number {
  let pages = 0;
  if (rangePairs.length < 2 * batch.length) rangePairs = new Float64Array(2 * batch.length);
  for (let i = 0; i < batch.length; i++) {
    const { firstPage, pageCount } = checkPageRange(batch[i]!, `batch[${i}]`);
    rangePairs[2 * i] = firstPage;
    rangePairs[2 * i + 1] = pageCount;
    pages += pageCount;
  }
  if (pages > MAX_BATCH_PAGES) throw outOfRangeError(`a batch holds at most ${MAX_BATCH_PAGES} pages, got ${pages}`);
  return pages;
}

/** What encodeLivePageBatch() made: no chunks when there was nothing to send. */
export interface EncodedLiveBatch {
  /** The section in order: header and table, views of guest RAM, the data's CRC and the section's. */
  chunks: Uint8Array[];
  /** Their total length. */
  bytes: number;
  pagesSent: number;
  zeroPages: number;
}

/**
 * encodePageBatch() as a live Pages section (PAGES_SECTION_LIVE): the data is not copied but sent
 * from `ram` itself, as views of it, with a CRC taken from it first. Only for a stream read as a
 * migration's destination reads it, and only while the views stay mapped until written.
 */
export function encodeLivePageBatch(ram: Uint8Array, batch: readonly PageRangeLike[], destinationZeroed: boolean): EncodedLiveBatch {
  const pages = checkedRangePairs(batch);
  // Header, table (a range a page at most) and the 8 bytes after the data.
  const head = new Uint8Array(SECTION_HEADER_BYTES + 4 + pages * PAGE_RANGE_BYTES + 8);
  const [headBytes, pagesSent, zeroPages, dataRunCount] = encodeLivePagesSection(ram, rangePairs, batch.length, destinationZeroed, head, SectionType.Pages, liveDataRuns);
  if (headBytes === 0) return { chunks: [], bytes: 0, pagesSent, zeroPages };
  const chunks: Uint8Array[] = [head.subarray(0, headBytes)];
  let bytes = headBytes + 8;
  for (let i = 0; i < dataRunCount; i++) {
    const offset = liveDataRuns[2 * i]!;
    const length = liveDataRuns[2 * i + 1]!;
    chunks.push(ram.subarray(offset, offset + length));
    bytes += length;
  }
  chunks.push(head.subarray(headBytes, headBytes + 8));
  return { chunks, bytes, pagesSent, zeroPages };
}

/** [byteOffset, byteLength] of each data run of a live section: a run a page at most. */
const liveDataRuns = new Float64Array(2 * MAX_BATCH_PAGES);

/** A PageRange (types.ts), or anything with the same two fields. */
export interface PageRangeLike {
  firstPage: number;
  pageCount: number;
}

function checkPageRange(range: PageRangeLike, name: string): PageRangeLike {
  if (typeof range !== 'object' || range === null) throw argTypeError(`${name} must be { firstPage, pageCount }`);
  const { firstPage, pageCount } = range;
  if (typeof firstPage !== 'number' || !Number.isSafeInteger(firstPage) || firstPage < 0) {
    throw outOfRangeError(`${name}.firstPage must be a non-negative integer, got ${String(firstPage)}`);
  }
  if (typeof pageCount !== 'number' || !Number.isSafeInteger(pageCount) || pageCount < 0 || firstPage + pageCount > Number.MAX_SAFE_INTEGER / PAGE_SIZE) {
    throw outOfRangeError(`${name}.pageCount must be a non-negative integer, got ${String(pageCount)}`);
  }
  return range;
}

/** What applying a stream's page sections to guest memory did: pages with data, zero pages, bytes. */
export interface DecodedPages {
  /** Pages carried with data. */
  pages: number;
  /** Pages of zero ranges. */
  zeroPages: number;
}

/** The range table of a Pages section, checked against guest RAM and the section's length. */
export interface PageTable extends DecodedPages {
  rangeCount: number;
  /** Guest-physical address of each range. */
  addrs: Float64Array;
  /** Byte length of each range. */
  lengths: Float64Array;
  /** Where each range's data starts in the payload; -1 for a zero range. */
  dataOffsets: Float64Array;
  /** Where the table ends (and the page data starts) in the payload. */
  tableBytes: number;
}

/** The table size a Pages payload announces in its first 4 bytes. */
export function pageTableBytes(payloadStart: Uint8Array): number {
  return 4 + viewOf(payloadStart).getUint32(0, true) * PAGE_RANGE_BYTES; // < 2^37: exact
}

function checkMemoryBytes(memoryBytes: number): void {
  if (typeof memoryBytes !== 'number' || !Number.isSafeInteger(memoryBytes) || memoryBytes <= 0 || memoryBytes % PAGE_SIZE !== 0) {
    throw outOfRangeError(`memoryBytes must be a positive multiple of ${PAGE_SIZE}, got ${String(memoryBytes)}`);
  }
}

/**
 * Checks the range table at the start of a Pages payload of `payloadBytes` bytes (`payloadStart`
 * holds at least the table): every range inside a guest RAM of `memoryBytes`, flags known, and the
 * data lengths adding up to exactly the rest of the payload.
 */
export function decodePageTable(payloadStart: Uint8Array, payloadBytes: number, memoryBytes: number): PageTable {
  checkMemoryBytes(memoryBytes);
  const memoryPages = memoryBytes / PAGE_SIZE;
  if (payloadBytes < 4 || payloadStart.length < 4) throw streamError(Code.Format, `a Pages section of ${payloadBytes} bytes is too short for its range count`);
  const view = viewOf(payloadStart);
  const rangeCount = view.getUint32(0, true);
  const tableEnd = pageTableBytes(payloadStart);
  if (tableEnd > payloadBytes) {
    throw streamError(Code.Format, `a Pages section announces ${rangeCount} ranges (${tableEnd} bytes of table) but holds ${payloadBytes} bytes`);
  }
  if (payloadStart.length < tableEnd) throw outOfRangeError(`payloadStart must hold the whole table (${tableEnd} bytes), got ${payloadStart.length}`);
  const table: PageTable = {
    rangeCount, pages: 0, zeroPages: 0, tableBytes: tableEnd,
    addrs: new Float64Array(rangeCount), lengths: new Float64Array(rangeCount), dataOffsets: new Float64Array(rangeCount),
  };
  let dataAt = tableEnd;
  for (let i = 0; i < rangeCount; i++) {
    const entry = 4 + i * PAGE_RANGE_BYTES;
    const firstPage = getU64(view, entry);
    const pageCount = view.getUint32(entry + 8, true);
    const flags = view.getUint32(entry + 12, true);
    if ((flags & ~PAGES_ZERO) !== 0) throw streamError(Code.Format, `Pages range ${i} has unknown flags 0x${flags.toString(16)}`);
    if (pageCount === 0) throw streamError(Code.Format, `Pages range ${i} is empty`);
    // firstPage is -1 beyond 2^53; both operands below 2^53 keep the subtraction exact.
    if (firstPage < 0 || firstPage > memoryPages || pageCount > memoryPages - firstPage) {
      const first = firstPage < 0 ? `0x${view.getBigUint64(entry, true).toString(16)}` : `0x${firstPage.toString(16)}`;
      throw streamError(Code.Format, `Pages range ${i} (${pageCount} pages from page ${first}) lies outside guest RAM (0x${memoryPages.toString(16)} pages)`);
    }
    table.addrs[i] = firstPage * PAGE_SIZE;
    table.lengths[i] = pageCount * PAGE_SIZE;
    if (flags & PAGES_ZERO) {
      table.dataOffsets[i] = -1;
      table.zeroPages += pageCount;
    } else {
      table.dataOffsets[i] = dataAt;
      dataAt += pageCount * PAGE_SIZE;
      table.pages += pageCount;
    }
  }
  if (dataAt !== payloadBytes) {
    throw streamError(Code.Format, `a Pages section's ranges announce ${dataAt - tableEnd} bytes of page data but it holds ${payloadBytes - tableEnd}`);
  }
  return table;
}

/**
 * Checks a Pages payload in full against a guest RAM of `memoryBytes` (every range inside it, data
 * lengths adding up exactly), then calls `apply` once per range in order: `data` is the range's
 * bytes (a view into `payload`), or null for a range of zero pages (the caller zero-fills
 * `byteLength` bytes). Nothing is applied unless the whole payload is valid.
 */
export function decodePages(
  payload: Uint8Array,
  memoryBytes: number,
  apply: (guestPhysAddr: number, byteLength: number, data: Uint8Array | null) => void,
): DecodedPages {
  if (!(payload instanceof Uint8Array)) throw argTypeError('payload must be a Uint8Array');
  checkMemoryBytes(memoryBytes);
  if (typeof apply !== 'function') throw argTypeError('apply must be a function');
  const table = decodePageTable(payload, payload.length, memoryBytes);
  const { addrs, lengths, dataOffsets } = table;
  for (let i = 0; i < table.rangeCount; i++) {
    const at = dataOffsets[i];
    apply(addrs[i], lengths[i], at < 0 ? null : payload.subarray(at, at + lengths[i]));
  }
  return { pages: table.pages, zeroPages: table.zeroPages };
}

/** decodePages() into guest RAM given as one byte array (its length is the RAM size). */
export function decodePagesInto(payload: Uint8Array, memory: Uint8Array): DecodedPages {
  if (!(memory instanceof Uint8Array)) throw argTypeError('memory must be a Uint8Array');
  return decodePages(payload, memory.length, (guestPhysAddr, byteLength, data) => {
    if (data) memory.set(data, guestPhysAddr);
    else memory.fill(0, guestPhysAddr, guestPhysAddr + byteLength);
  });
}

