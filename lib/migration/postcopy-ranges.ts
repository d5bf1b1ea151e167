// Page sets of post-copy: which pages the destination lacks, as a byte per page, and the range
// lists that carry them in Postcopy and PageRequest sections.
//
// Payload: u32 rangeCount; per range u64 firstPage, u32 pageCount, u32 reserved (0).
import { argTypeError, outOfRangeError } from '../kvm/errors.js';
import type { PageRange } from '../vmm/page-ranges.js';
import { MigrationErrorCode as Code, streamError } from './errors.js';
import { getU64, setU64, viewOf } from './format.js';

const RANGE_BYTES = 16;

export function encodePageRanges(ranges: readonly PageRange[]): Uint8Array {
  if (!Array.isArray(ranges)) throw argTypeError('ranges must be an array of { firstPage, pageCount }');
  const payload = new Uint8Array(4 + ranges.length * RANGE_BYTES);
  const view = viewOf(payload);
  view.setUint32(0, ranges.length, true);
  ranges.forEach(({ firstPage, pageCount }, i) => {
    if (!Number.isSafeInteger(firstPage) || firstPage < 0 || !Number.isInteger(pageCount) || pageCount < 1 || pageCount > 0xffffffff) {
      throw outOfRangeError(`ranges[${i}] must be { firstPage >= 0, pageCount 1..2^32-1 }, got ${firstPage}+${pageCount}`);
    }
    setU64(view, 4 + i * RANGE_BYTES, firstPage);
    view.setUint32(4 + i * RANGE_BYTES + 8, pageCount, true);
  });
  return payload;
}

/** The ranges of a payload, each checked to lie within `pageCount` pages. */
export function decodePageRanges(payload: Uint8Array, memoryPages: number, what: string): PageRange[] {
  if (payload.length < 4) throw streamError(Code.Format, `${what}: ${payload.length} bytes, too short for its range count`);
  const view = viewOf(payload);
  const count = view.getUint32(0, true);
  if (payload.length !== 4 + count * RANGE_BYTES) throw streamError(Code.Format, `${what}: ${count} ranges announced in ${payload.length} bytes`);
  const ranges: PageRange[] = [];
  for (let i = 0; i < count; i++) {
    const at = 4 + i * RANGE_BYTES;
    const firstPage = getU64(view, at);
    const pageCount = view.getUint32(at + 8, true);
    if (view.getUint32(at + 12, true) !== 0) throw streamError(Code.Format, `${what}: range ${i} has a non-zero reserved field`);
    if (firstPage < 0 || pageCount === 0 || firstPage > memoryPages || pageCount > memoryPages - firstPage) {
      throw streamError(Code.Format, `${what}: range ${i} (${pageCount} pages from page ${firstPage}) lies outside guest RAM (${memoryPages} pages)`);
    }
    ranges.push({ firstPage, pageCount });
  }
  return ranges;
}

/** A set of pages, a byte each: the pages one side still owes or lacks. */
export class PageSet {
  readonly #pages: Uint8Array;
  #count = 0;

  constructor(pageCount: number) {
    this.#pages = new Uint8Array(pageCount);
  }

  get size(): number {
    return this.#count;
  }

  get pageCount(): number {
    return this.#pages.length;
  }

  has(page: number): boolean {
    return this.#pages[page] === 1;
  }

  addRanges(ranges: readonly PageRange[]): void {
    for (const { firstPage, pageCount } of ranges) {
      const span = this.#pages.subarray(firstPage, firstPage + pageCount);
      if (span.indexOf(1) < 0) {
        // None of them there yet (the usual case): at once.
        span.fill(1);
        this.#count += span.length;
      } else {
        for (let page = firstPage; page < firstPage + pageCount; page++) this.add(page);
      }
    }
  }

  add(page: number): void {
    if (this.#pages[page] === 0) {
      this.#pages[page] = 1;
      this.#count++;
    }
  }

  /** Removes the page; true if it was there. */
  delete(page: number): boolean {
    if (this.#pages[page] !== 1) return false;
    this.#pages[page] = 0;
    this.#count--;
    return true;
  }

  clear(): void {
    this.#pages.fill(0);
    this.#count = 0;
  }

  /** The first page at or after `from` (wrapping around) that is in the set, or -1. */
  nextFrom(from: number): number {
    if (this.#count === 0) return -1;
    const at = this.#pages.indexOf(1, from);
    return at >= 0 ? at : this.#pages.indexOf(1);
  }

  /** The set as sorted, coalesced ranges. */
  ranges(): PageRange[] {
    const ranges: PageRange[] = [];
    let page = this.#pages.indexOf(1);
    while (page >= 0) {
      let end = page + 1;
      while (end < this.#pages.length && this.#pages[end] === 1) end++;
      ranges.push({ firstPage: page, pageCount: end - page });
      page = this.#pages.indexOf(1, end);
    }
    return ranges;
  }
}

/** Sorted pages as coalesced ranges. */
export function rangesOfPages(pages: readonly number[]): PageRange[] {
  const sorted = [...new Set(pages)].sort((a, b) => a - b);
  const ranges: PageRange[] = [];
  for (const page of sorted) {
    const last = ranges.at(-1);
    if (last && last.firstPage + last.pageCount === page) last.pageCount++;
    else ranges.push({ firstPage: page, pageCount: 1 });
  }
  return ranges;
}

/** The p-th percentile (0..100) of `values` (nearest rank); 0 when empty. */
export function percentile(values: readonly number[], p: number): number {
  if (values.length === 0) return 0;
  const sorted = [...values].sort((a, b) => a - b);
  const rank = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
  return sorted[rank]!;
}
