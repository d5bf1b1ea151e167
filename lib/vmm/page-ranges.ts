// Guest pages as ranges of frame numbers: what dirty tracking reports and what snapshots and
// migrations send. Counting, merging, and the pages of guest RAM that may hold data.
import { PAGE_SIZE } from '../kvm/constants.js';
import type { GuestMemory } from '../kvm/memory.js';

/** Guest pages by guest frame number (guest physical address / PAGE_SIZE). */
export interface PageRange {
  firstPage: number;
  pageCount: number;
}

export function pageCountOf(ranges: readonly PageRange[]): number {
  let pages = 0;
  for (const range of ranges) pages += range.pageCount;
  return pages;
}

/** Sorted, coalesced union of two sets of ranges. */
export function unionRanges(a: readonly PageRange[], b: readonly PageRange[]): PageRange[] {
  const all = [...a, ...b].sort((x, y) => x.firstPage - y.firstPage);
  const merged: PageRange[] = [];
  for (const range of all) {
    if (range.pageCount === 0) continue;
    const last = merged.at(-1);
    if (last && range.firstPage <= last.firstPage + last.pageCount) {
      last.pageCount = Math.max(last.pageCount, range.firstPage + range.pageCount - last.firstPage);
    } else {
      merged.push({ firstPage: range.firstPage, pageCount: range.pageCount });
    }
  }
  return merged;
}

/**
 * The pages of guest RAM that may hold data: the whole of it, unless the mapping can say which
 * pages were never touched (untouched memfd pages are holes, and reading them would allocate them).
 */
export function populatedPageRanges(memory: GuestMemory): PageRange[] {
  const populated = (memory as { populatedRanges?: () => [number, number][] }).populatedRanges;
  if (typeof populated !== 'function') return [{ firstPage: 0, pageCount: memory.size / PAGE_SIZE }];
  return populated.call(memory).map(([offset, length]) => ({
    firstPage: Math.floor(offset / PAGE_SIZE),
    pageCount: Math.ceil((offset + length) / PAGE_SIZE) - Math.floor(offset / PAGE_SIZE),
  }));
}
