// A source is often a process that has never migrated. Without this, its first migration runs the
// code that takes dirty pages, batches and encodes them, reads the destination's replies, and saves
// and encodes the machine's state, interpreted, and V8 compiles it during the transfer, on compiler
// threads that take the CPU the transfer needs (one CPU for a pinned source).
import type { Socket } from 'node:net';
import { PassThrough } from 'node:stream';
import { PAGE_SIZE } from '../kvm/constants.js';
import { machineInternals, type Machine } from '../vmm/machine.js';
import { DirtyBitmap, orLogWords, takeWordRanges } from '../vmm/dirty-bitmap.js';
import { unionRanges, type PageRange } from '../vmm/page-ranges.js';
import { SectionType, encodeHeader, encodeSection, encodeSync } from './format.js';
import { rehearseHandshake } from './handshake.js';
import { PeerReplies } from './peer-replies.js';
import { decodePageRanges, encodePageRanges } from './postcopy-ranges.js';
import { PageSender } from './send.js';
import { newMigrationStats } from './stats.js';
import { warmUpStateEncoding } from './state-sections.js';
import { SectionBufferPool, writeChunks } from './writers.js';

/**
 * Pages the made-up dirty bitmap covers: a 64 MiB guest's. (A 256 MiB guest's made each round
 * 6-17 ms of work; the rehearsal then had not ended when a migration began 100 ms after the
 * machine's start, and that migration took 7-12 ms longer: bench/README.md.)
 */
const BITMAP_PAGES = 16384;
/** The made-up guest RAM the rehearsal encodes from. */
const RAM_PAGES = 256;
/**
 * Rounds of harvesting and encoding. Measured here (pinned to one CPU, idle 256 MiB guest): a
 * process's first migration took 14-15 ms without this, 10.5 ms with it, later ones 6.5 ms
 * (bench/README.md).
 */
const ROUNDS = 8;

let rehearsed: Promise<boolean> | null = null;

/** Set once a migration has begun in this process: a rehearsal then only takes its CPU. */
let cutShort = false;

/**
 * Ends the rehearsal of warmUpMigrationSource() at its next slice, for good: a migration has
 * begun, and runs (and compiles) the real code itself.
 */
export function cutSourceWarmUpShort(): void {
  cutShort = true;
}

class WarmUpCutShort extends Error {}

/**
 * The warm-up's work cut into slices of a few ms, the event loop served between them: run in one
 * go, the first machine a process starts held it up for 77-102 ms here (cold code).
 */
class Slices {
  static readonly MS = 4;
  #started = performance.now();

  /**
   * Resolves at once within a slice, else on the event loop's next turn (and a new slice); throws
   * WarmUpCutShort once cutSourceWarmUpShort() has been called.
   */
  async next(): Promise<void> {
    if (cutShort) throw new WarmUpCutShort();
    if (performance.now() - this.#started < Slices.MS) return;
    await new Promise<void>((resolve) => setImmediate(resolve));
    if (cutShort) throw new WarmUpCutShort();
    this.#started = performance.now();
  }
}

/**
 * Runs the source's pure-JavaScript work once per process (later calls return the first one's
 * promise) over made-up pages and an in-memory connection: the handshake, dirty bitmaps taken
 * into ranges, pages batched and encoded (copied and live sections), a PageRequest's ranges
 * decoded, the destination's replies read. Touches no machine and no socket. Resolves with whether
 * every step ran through (false also if cut short); never rejects (a real migration says what is
 * wrong).
 */
export function warmUpMigrationSource(): Promise<boolean> {
  rehearsed ??= (async () => {
    try {
      await rehearseHandshake();
      const ram = new Uint8Array(RAM_PAGES * PAGE_SIZE);
      // Data pages between zero pages, as in a guest's RAM.
      for (let page = 0; page < RAM_PAGES; page++) if (page % 8 < 5) ram.fill(page & 0xff || 1, page * PAGE_SIZE, (page + 1) * PAGE_SIZE);
      const slices = new Slices();
      for (let round = 0; round < ROUNDS; round++) await rehearsePages(ram, round, slices);
      return await rehearseReplies();
    } catch {
      return false;
    }
  })();
  return rehearsed;
}

/**
 * `machine`'s state saved as a migration's stop saves it (each vCPU kicked and saved where it runs,
 * the guest not paused) and encoded the rounds a process's first migration would otherwise run
 * (warmUpStateEncoding()). Only while it runs; resolves with whether a state was saved, never
 * rejects.
 */
export async function warmUpStateSaving(machine: Machine): Promise<boolean> {
  if (machine.state !== 'running') return false;
  try {
    const internals = machineInternals(machine);
    if ((await warmUpStateEncoding(internals.warmUpSave())) === null) return false;
    // Then the stop itself, once, in a pause the guest does not see.
    return await internals.warmUpPause();
  } catch {
    return false;
  }
}

async function rehearsePages(ram: Uint8Array, round: number, slices: Slices): Promise<void> {
  // A harvest: pages marked by the VMM and logged by KVM, taken into ranges, with pages the
  // destination asked for again.
  const bitmap = DirtyBitmap.create(BITMAP_PAGES);
  for (let page = round; page < BITMAP_PAGES; page += 97) bitmap.markPages(page, 1 + (page % 40));
  const pending = new Int32Array(BITMAP_PAGES / 32);
  for (let word = round; word < pending.length; word += 5) pending[word] = word % 3 === 0 ? -1 : 0x0f0f0f0f;
  // A memory slot's dirty log as KVM returns it, read by chunks into the same bitmap or only
  // looked at (as tracking starts), the slot starting at a word of the bitmap or within one.
  const log = new Int32Array(BITMAP_PAGES / 32 - 1);
  for (let word = round; word < log.length; word += 7) log[word] = word % 2 === 0 ? -1 : 0x00ff00f0;
  for (let chunk = 0; chunk * 64 < log.length; chunk++) {
    orLogWords(log, chunk * 64, Math.min(chunk * 64 + 64, log.length), chunk % 2 === 0 ? pending : null, chunk % 4 < 2 ? 0 : 16);
  }
  await slices.next();
  // Four takes a round (the later ones find nothing left): V8 optimizes a function on about its
  // ninth call here, and that compile, though it runs off the main thread, held up the call that
  // set it off by 2-3 ms (a first migration's first harvest, when ROUNDS calls came before it).
  for (let take = 0; take < 4; take++) bitmap.takeInto(pending);
  const asked = decodePageRanges(encodePageRanges([{ firstPage: 3, pageCount: 9 }, { firstPage: 1000, pageCount: 64 }]), BITMAP_PAGES, 'a rehearsal');
  const harvested = unionRanges(takeWordRanges(pending), asked);
  // The pages themselves, from the made-up RAM: ranges of its size, in every shape.
  const ranges: PageRange[] = harvested.map(({ firstPage, pageCount }) => ({ firstPage: firstPage % RAM_PAGES, pageCount: Math.min(pageCount, RAM_PAGES - (firstPage % RAM_PAGES)) }));
  const stats = newMigrationStats(RAM_PAGES * PAGE_SIZE, 'bitmap');
  const buffers = new SectionBufferPool();
  const copied = new PageSender(ram, stats, async () => {}, buffers, false);
  const live = new PageSender(ram, stats, async () => {}, buffers, true);
  for (let at = 0; at + 8 <= ranges.length; at += 8) {
    const batch = unionRanges(ranges.slice(at, at + 4), ranges.slice(at + 4, at + 8));
    for (const chunk of copied.encode(batch, round % 2 === 0)) buffers.release(chunk);
    live.encode(batch, round % 2 === 1);
    if (at % 64 === 0) await slices.next();
  }
  await slices.next();
  // A batch of zero pages only (pages 5-7 of each 8), which is not sent to a zeroed destination.
  const zeroPages = [{ firstPage: 8 * round + 5, pageCount: 3 }];
  for (const chunk of copied.encode(zeroPages, true)) buffers.release(chunk);
  live.encode(zeroPages, true);
}

/**
 * The destination's side as a source reads it: header, acceptance, a PageRequest, a Sync answer.
 * Whether all of it was read as a source expects.
 */
async function rehearseReplies(): Promise<boolean> {
  const wire = new PassThrough();
  const replies = new PeerReplies(wire as unknown as Socket);
  const asked: PageRange[][] = [];
  replies.onPageRequest((section) => asked.push(decodePageRanges(section.payload, BITMAP_PAGES, 'a rehearsal')));
  try {
    await writeChunks(wire, [
      encodeHeader({ kind: 'migration', memoryBytes: BITMAP_PAGES * PAGE_SIZE, vcpuCount: 1 }),
      encodeSection(SectionType.Config, new Uint8Array(0)),
      encodeSection(SectionType.PageRequest, encodePageRanges([{ firstPage: 7, pageCount: 3 }])),
      encodeSync(),
    ]);
    await replies.expectAccept(1000);
    await replies.expectSync(1000);
    return asked.length === 1;
  } catch {
    return false;
  } finally {
    replies.onPageRequest(null);
    wire.destroy();
  }
}
