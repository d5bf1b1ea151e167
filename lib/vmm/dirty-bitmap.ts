// The VMM's own dirty bitmap: one bit per guest page, in a SharedArrayBuffer that every vCPU
// thread marks. KVM's dirty log sees only the guest's writes; what our own code writes to guest
// RAM (a device filling a read buffer, a loader) must be marked here, or migration loses it.
import { PAGE_SIZE } from '../kvm/constants.js';
import type { PageRange } from './page-ranges.js';
import { argTypeError, argValueError, outOfRangeError } from '../kvm/errors.js';

/** Pages a bitmap may cover: 8 TiB of guest-physical space (a 256 MiB bitmap). */
export const MAX_BITMAP_PAGES = 2 ** 31;

/** 32-bit words for `pageCount` bits. */
export const bitmapWords = (pageCount: number): number => Math.ceil(pageCount / 32);

function checkPageCount(pageCount: unknown): number {
  if (typeof pageCount !== 'number') throw argTypeError(`pageCount must be a number, got ${typeof pageCount}`);
  if (!Number.isInteger(pageCount) || pageCount < 0 || pageCount > MAX_BITMAP_PAGES) {
    throw outOfRangeError(`pageCount must be an integer 0..${MAX_BITMAP_PAGES}, got ${pageCount}`);
  }
  return pageCount;
}

function checkCount(value: unknown, name: string): number {
  if (typeof value !== 'number') throw argTypeError(`${name} must be a number, got ${typeof value}`);
  if (!Number.isSafeInteger(value) || value < 0) throw outOfRangeError(`${name} must be a non-negative integer, got ${value}`);
  return value;
}

/**
 * A bitmap of guest frame numbers (guest-physical address / 4096) that any thread may mark
 * without a lock: bits are set with Atomics.or and taken with Atomics.exchange, so a mark that
 * races with takeRanges() lands either in this take or in the next one, never nowhere.
 */
export class DirtyBitmap {
  /** Pass this (and pageCount) to another thread, which calls DirtyBitmap.attach(). */
  readonly shared: SharedArrayBuffer;
  readonly pageCount: number;
  readonly #words: Int32Array;

  private constructor(shared: SharedArrayBuffer, pageCount: number) {
    this.shared = shared;
    this.pageCount = pageCount;
    this.#words = new Int32Array(shared);
  }

  /** A clean bitmap of `pageCount` pages. */
  static create(pageCount: number): DirtyBitmap {
    checkPageCount(pageCount);
    return new DirtyBitmap(new SharedArrayBuffer(bitmapWords(pageCount) * 4), pageCount);
  }

  /** The bitmap behind `shared` (another thread's `bitmap.shared`), for the same pageCount. */
  static attach(shared: SharedArrayBuffer, pageCount: number): DirtyBitmap {
    if (!(shared instanceof SharedArrayBuffer)) throw argTypeError('shared must be a SharedArrayBuffer (bitmap.shared)');
    checkPageCount(pageCount);
    const bytes = bitmapWords(pageCount) * 4;
    if (shared.byteLength !== bytes) {
      throw argValueError(`shared must be ${bytes} bytes for ${pageCount} pages, got ${shared.byteLength}`);
    }
    return new DirtyBitmap(shared, pageCount);
  }

  /** Marks every page that [guestPhysAddr, guestPhysAddr + lengthBytes) touches. */
  mark(guestPhysAddr: number, lengthBytes: number): void {
    checkCount(guestPhysAddr, 'guestPhysAddr');
    checkCount(lengthBytes, 'lengthBytes');
    if (lengthBytes === 0) return;
    const endAddr = guestPhysAddr + lengthBytes;
    if (endAddr > this.pageCount * PAGE_SIZE) {
      throw outOfRangeError(
        `[0x${guestPhysAddr.toString(16)}, 0x${endAddr.toString(16)}) is outside the dirty bitmap (${this.pageCount} pages, up to 0x${(this.pageCount * PAGE_SIZE).toString(16)})`,
      );
    }
    this.#set(Math.floor(guestPhysAddr / PAGE_SIZE), Math.floor((endAddr - 1) / PAGE_SIZE) + 1);
  }

  /** Marks pages [firstPage, firstPage + pageCount). */
  markPages(firstPage: number, pageCount: number): void {
    checkCount(firstPage, 'firstPage');
    checkCount(pageCount, 'pageCount');
    if (pageCount === 0) return;
    if (firstPage + pageCount > this.pageCount) {
      throw outOfRangeError(`pages [${firstPage}, ${firstPage + pageCount}) are outside the dirty bitmap (${this.pageCount} pages)`);
    }
    this.#set(firstPage, firstPage + pageCount);
  }

  #set(firstPage: number, endPage: number): void {
    const words = this.#words;
    const firstWord = firstPage >>> 5;
    const lastWord = (endPage - 1) >>> 5;
    const firstMask = -1 << (firstPage & 31);
    const lastMask = -1 >>> (31 - ((endPage - 1) & 31));
    if (firstWord === lastWord) {
      Atomics.or(words, firstWord, firstMask & lastMask);
      return;
    }
    Atomics.or(words, firstWord, firstMask);
    for (let word = firstWord + 1; word < lastWord; word++) Atomics.or(words, word, -1);
    Atomics.or(words, lastWord, lastMask);
  }

  /** Takes (and clears) every marked page, as sorted ranges with adjacent pages merged. */
  takeRanges(): PageRange[] {
    const words = this.#words;
    const ranges: PageRange[] = [];
    for (let word = 0; word < words.length; word++) {
      // A plain read to skip clean words: a bit set just after it is taken next time.
      if (words[word] === 0) continue;
      appendWordRuns(ranges, word * 32, Atomics.exchange(words, word, 0));
    }
    return ranges;
  }

  /**
   * Takes (and clears) every marked page into `target`, ORing word i of this bitmap into
   * target[i]: the allocation-free form of takeRanges(). Returns whether any page was marked.
   */
  takeInto(target: Int32Array): boolean {
    const words = this.#words;
    if (!(target instanceof Int32Array) || target.length < words.length) {
      throw argTypeError(`target must be an Int32Array of at least ${words.length} words`);
    }
    let any = false;
    for (let word = 0; word < words.length; word++) {
      if (words[word] === 0) continue;
      target[word]! |= Atomics.exchange(words, word, 0);
      any = true;
    }
    return any;
  }

  /** Whether no page is marked. */
  isEmpty(): boolean {
    const words = this.#words;
    for (let word = 0; word < words.length; word++) if (Atomics.load(words, word) !== 0) return false;
    return true;
  }

  /** Unmarks every page. */
  clear(): void {
    const words = this.#words;
    for (let word = 0; word < words.length; word++) if (words[word] !== 0) Atomics.store(words, word, 0);
  }
}

/** Index of the lowest set bit of a non-zero 32-bit value. */
const lowestBit = (bits: number): number => 31 - Math.clz32(bits & -bits);

/**
 * Appends the set bits of `bits` (bit i = page firstPage + i) to `ranges` as runs, extending the
 * last range when a run continues it. Words must be visited in ascending order.
 */
export function appendWordRuns(ranges: PageRange[], firstPage: number, bits: number): void {
  let remaining = bits | 0;
  if (remaining === -1) {
    // A fully dirty word: the common case of a busy guest.
    const last = ranges.length > 0 ? ranges[ranges.length - 1]! : undefined;
    if (last !== undefined && last.firstPage + last.pageCount === firstPage) last.pageCount += 32;
    else ranges.push({ firstPage, pageCount: 32 });
    return;
  }
  while (remaining !== 0) {
    const start = lowestBit(remaining);
    const shifted = remaining >>> start;
    const run = shifted === 0xffffffff ? 32 : lowestBit(~shifted);
    const page = firstPage + start;
    const last = ranges.length > 0 ? ranges[ranges.length - 1]! : undefined;
    if (last !== undefined && last.firstPage + last.pageCount === page) last.pageCount += run;
    else ranges.push({ firstPage: page, pageCount: run });
    if (start + run >= 32) return;
    remaining &= -1 << (start + run);
  }
}

/** Reads and zeroes a thread-private bitmap (bit i = page i), returning its pages as ranges. */
export function takeWordRanges(words: Int32Array): PageRange[] {
  const ranges: PageRange[] = [];
  for (let word = 0; word < words.length; word++) {
    const bits = words[word]!;
    if (bits === 0) continue;
    words[word] = 0;
    appendWordRuns(ranges, word * 32, bits);
  }
  return ranges;
}

/**
 * ORs words [fromWord, toWord) of a memory slot's dirty log (bit i of word w = the slot's page
 * 32w + i) into `target` (a bitmap by guest frame), the slot starting at frame `firstPage`; with
 * no target, only looks. Whether any of the words had a bit set.
 */
export function orLogWords(words: Int32Array, fromWord: number, toWord: number, target: Int32Array | null, firstPage: number): boolean {
  let dirty = false;
  for (let word = fromWord; word < toWord; word++) {
    const bits = words[word]!;
    if (bits === 0) continue;
    dirty = true;
    if (target !== null) orWord(target, firstPage + word * 32, bits);
  }
  return dirty;
}

/** ORs `bits` (bit i = frame `page` + i) into `target`, across two words unless `page` is a multiple of 32. */
function orWord(target: Int32Array, page: number, bits: number): void {
  const index = page >>> 5;
  const shift = page & 31;
  target[index]! |= bits << shift;
  if (shift !== 0) {
    const carry = bits >>> (32 - shift);
    if (carry !== 0) target[index + 1]! |= carry;
  }
}
