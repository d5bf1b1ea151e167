// The destination side of post-copy: the guest runs here before its every page has arrived. The
// pages it lacks are holes in its memfd, registered with a userfaultfd: a vCPU (or device thread)
// that touches one blocks in the kernel until the page is placed. This thread (the main one,
// whose event loop also reads the connection) serves the faults: a page the source owes is
// requested (PageRequest) and placed with UFFDIO_COPY when it comes, a hole the source never had
// data for is placed as a zero page. Every other missing page arrives through the source's
// background stream and is placed the same way, only once its section has checked out.
//
// Why the main thread: the vCPU and virtio threads are the ones that fault, and none of them may
// serve its own fault; the main thread never touches guest RAM while post-copy runs (nothing here
// reads or writes it except through UFFDIO_COPY/ZEROPAGE), and it holds the socket already.
//
// A broken connection pauses the guest (a vCPU blocked in a fault stays so until its page comes),
// and this side listens again at its address for the source to resume: it answers with the
// pages it still lacks, and asks again for those its faults wait on.
import type { Socket } from 'node:net';
import { setTimeout as delay } from 'node:timers/promises';
import { PAGE_SIZE } from '../kvm/constants.js';
import { watchFd, type FdWatch } from '../kvm/fd-watch.js';
import type { GuestMemory } from '../kvm/memory.js';
import { Userfaultfd } from '../kvm/userfaultfd.js';
import type { Machine } from '../vmm/machine.js';
import type { PageRange } from '../vmm/page-ranges.js';
import { MigrationError, MigrationErrorCode as Code } from './errors.js';
import { SectionType, encodeEnd, encodeErrorSection, encodeHeader, encodeSection, hexId, type StreamHeader } from './format.js';
import { PageSet, decodePageRanges, encodePageRanges, percentile, rangesOfPages } from './postcopy-ranges.js';
import { newPostcopyStats } from './postcopy-source.js';
import type { SectionParserTarget } from './section-parser.js';
import { SectionReader } from './section-reader.js';
import { enlargeSocketBuffers } from './socket-buffers.js';
import { socketSource } from './sources.js';
import { listenForMigration, parseMigrationAddress } from './transport.js';
import type { PostcopyStats } from './types.js';
import { writeChunks } from './writers.js';

/** What PostcopyPages needs of its userfaultfd (a Userfaultfd; a test's stand-in fails on purpose). */
export type PostcopyUffd = Pick<Userfaultfd, 'fd' | 'readFaults' | 'copy' | 'zero' | 'close'>;

let openUffd: (memory: GuestMemory) => PostcopyUffd = (memory) => Userfaultfd.register(memory);

/**
 * A test seam (not exported from the package): how PostcopyPages opens its userfaultfd from now
 * on, so that a test can inject a uffd error; null restores Userfaultfd.register.
 */
export function setPostcopyUffdOpener(opener: ((memory: GuestMemory) => PostcopyUffd) | null): void {
  openUffd = opener ?? ((memory) => Userfaultfd.register(memory));
}

let directPlacement = true;

/**
 * A benchmark's seam (not exported from the package): with false, page data is always copied to
 * a staging buffer before it is placed (as before read buffers were lent), for a side-by-side run.
 */
export function setPostcopyDirectPlacement(enabled: boolean): void {
  directPlacement = enabled;
}

/** Read buffers lent to a connection (see readBuffer()): their size, and how many a section may hold at most. */
const LENT_BUFFER_BYTES = 1024 * 1024;
const MAX_HELD_BUFFERS = 8;

/** The pages of a guest that runs here while some are still missing. */
export class PostcopyPages {
  readonly #memory: GuestMemory;
  readonly #lacking: PageSet;
  readonly #uffd: PostcopyUffd;
  readonly #watch: FdWatch;
  /** Pages faults wait on, and when each fault was read. */
  readonly #waiting = new Map<number, number>();
  readonly #latencies: number[] = [];
  #faults = 0;
  #requests = 0;
  readonly #started = performance.now();
  #durationMs = 0;
  #closed = false;
  /** A streamed Pages section's data, placed only once its CRC has checked out. */
  #staging = new Uint8Array(2 * 1024 * 1024 + PAGE_SIZE);
  #staged: { addr: number; offset: number; length: number }[] = [];
  #stagedBytes = 0;
  /**
   * Whole pages of a streamed section left where they were read (a buffer lent by readBuffer()),
   * placed from there once the section checks out: one copy less than staging.
   */
  #direct: { addr: number; data: Uint8Array }[] = [];
  readonly #lent = new WeakMap<ArrayBufferLike, Uint8Array>();
  readonly #held = new Set<Uint8Array>();
  readonly #free: Uint8Array[] = [];
  #lastLent: Uint8Array | null = null;
  /** Where requests go: the connection's writer, or nothing while there is none. */
  request: ((ranges: PageRange[]) => void) | null = null;
  /** Called once every page is there. */
  onComplete: () => void = () => {};
  /** Called if placing a page fails (a uffd error): the guest cannot go on. */
  onFailure: (error: Error) => void = () => {};
  /** The uffd error that stopped post-copy here, if one did. */
  failure: Error | null = null;

  /**
   * Drops the `lacking` pages the memfd holds (stale pre-copy data) and registers the whole
   * memory: from here on, only this object writes guest RAM.
   */
  constructor(memory: GuestMemory, lacking: readonly PageRange[]) {
    this.#memory = memory;
    this.#lacking = new PageSet(memory.size / PAGE_SIZE);
    this.#lacking.addRanges(lacking);
    // Only where the memfd has data (none at all after post-copy at once): a hole faults already.
    for (const [offset, length] of memory.populatedRanges()) {
      for (const range of intersect(lacking, offset / PAGE_SIZE, (offset + length) / PAGE_SIZE)) {
        memory.dontneed(range.firstPage * PAGE_SIZE, range.pageCount * PAGE_SIZE);
      }
    }
    this.#uffd = openUffd(memory);
    this.#watch = watchFd(this.#uffd.fd, () => this.#onFaults());
  }

  get lackingCount(): number {
    return this.#lacking.size;
  }

  lacking(): PageRange[] {
    return this.#lacking.ranges();
  }

  /** Pages faults wait on now (asked again on a new connection). */
  waiting(): PageRange[] {
    return rangesOfPages([...this.#waiting.keys()]);
  }

  stats(): PostcopyStats {
    const stats = newPostcopyStats(0);
    stats.faults = this.#faults;
    stats.requests = this.#requests;
    stats.faultLatencyMs = {
      p50: percentile(this.#latencies, 50), p90: percentile(this.#latencies, 90), p99: percentile(this.#latencies, 99),
      max: this.#latencies.length ? Math.max(...this.#latencies) : 0,
    };
    stats.durationMs = this.#durationMs || performance.now() - this.#started;
    return stats;
  }

  #onFaults(): void {
    if (this.#closed) return;
    try {
      const now = performance.now();
      const wanted: number[] = [];
      for (const page of this.#uffd.readFaults()) {
        this.#faults++;
        if (this.#lacking.has(page)) {
          if (!this.#waiting.has(page)) {
            this.#waiting.set(page, now);
            wanted.push(page);
          }
        } else {
          // A hole the source never had data for (or a page placed just now: EEXIST, a wake).
          this.#uffd.zero(page, 1);
        }
      }
      if (wanted.length > 0 && this.request) {
        this.#requests++;
        this.request(rangesOfPages(wanted));
      }
    } catch (error) {
      this.#fail(error as Error);
    }
  }

  #fail(error: Error): void {
    this.failure ??= error;
    this.onFailure(error);
  }

  /** #place(), a failure of which ends post-copy here (not a break of the connection: a resume could not help). */
  #placeOrFail(firstPage: number, pageCount: number, data: Uint8Array | null): void {
    try {
      this.#place(firstPage, pageCount, data);
    } catch (error) {
      this.#fail(error as Error);
      throw error;
    }
  }

  /** The parser's target during post-copy: page data staged, placed once its section checks out. */
  readonly target: Pick<SectionParserTarget, 'writePages' | 'zeroPages' | 'pagesDone'> = {
    writePages: (guestPhysAddr, data) => {
      const lent = this.#lent.get(data.buffer);
      if (!lent) return this.#stage(guestPhysAddr, data);
      // Whole pages stay in the lent buffer; a page split across two reads is put together in staging.
      const head = Math.min(data.length, (PAGE_SIZE - (guestPhysAddr % PAGE_SIZE)) % PAGE_SIZE);
      const tail = (data.length - head) % PAGE_SIZE;
      if (head > 0) this.#stage(guestPhysAddr, data.subarray(0, head));
      if (data.length - tail > head) this.#keep(lent, guestPhysAddr + head, data.subarray(head, data.length - tail));
      if (tail > 0) this.#stage(guestPhysAddr + data.length - tail, data.subarray(data.length - tail));
    },
    zeroPages: (guestPhysAddr, byteLength) => this.#placeOrFail(guestPhysAddr / PAGE_SIZE, byteLength / PAGE_SIZE, null),
    pagesDone: () => {
      for (const piece of this.#direct) this.#placeOrFail(piece.addr / PAGE_SIZE, piece.data.length / PAGE_SIZE, piece.data);
      for (const piece of this.#staged) {
        this.#placeOrFail(piece.addr / PAGE_SIZE, piece.length / PAGE_SIZE, this.#staging.subarray(piece.offset, piece.offset + piece.length));
      }
      this.dropStaged();
    },
  };

  /**
   * The buffer a connection's next read goes into (its socket's onread buffer): page data read
   * into it is placed from it with no copy of ours. Null (the caller's own buffer, whose data is
   * staged) once post-copy is over or too many are held by one section.
   */
  readBuffer(): Uint8Array | null {
    if (!directPlacement || this.#closed) return null;
    const last = this.#lastLent;
    if (last && !this.#held.has(last)) return last;
    if (this.#held.size >= MAX_HELD_BUFFERS) return null;
    let next = this.#free.pop();
    if (!next) {
      next = new Uint8Array(LENT_BUFFER_BYTES);
      this.#lent.set(next.buffer, next);
    }
    this.#lastLent = next;
    return next;
  }

  #stage(guestPhysAddr: number, data: Uint8Array): void {
    const end = this.#stagedBytes + data.length;
    if (end > this.#staging.length) {
      const grown = new Uint8Array(Math.max(end, 2 * this.#staging.length));
      grown.set(this.#staging.subarray(0, this.#stagedBytes));
      this.#staging = grown;
    }
    this.#staging.set(data, this.#stagedBytes);
    const last = this.#staged.at(-1);
    if (last && last.addr + last.length === guestPhysAddr && last.offset + last.length === this.#stagedBytes) last.length += data.length;
    else this.#staged.push({ addr: guestPhysAddr, offset: this.#stagedBytes, length: data.length });
    this.#stagedBytes = end;
  }

  #keep(lent: Uint8Array, guestPhysAddr: number, data: Uint8Array): void {
    this.#held.add(lent);
    const last = this.#direct.at(-1);
    if (last && last.data.buffer === data.buffer && last.addr + last.data.length === guestPhysAddr && last.data.byteOffset + last.data.length === data.byteOffset) {
      last.data = new Uint8Array(data.buffer, last.data.byteOffset, last.data.length + data.length);
    } else {
      this.#direct.push({ addr: guestPhysAddr, data });
    }
  }

  /** Forgets page data of a section that will never check out (its connection broke). */
  dropStaged(): void {
    this.#staged = [];
    this.#stagedBytes = 0;
    this.#direct = [];
    for (const buffer of this.#held) if (buffer !== this.#lastLent) this.#free.push(buffer);
    this.#held.clear();
  }

  #place(firstPage: number, pageCount: number, data: Uint8Array | null): void {
    if (this.#closed) return;
    // Only runs of pages still lacking: a page placed already (or zero-filled on a fault) stays.
    let page = firstPage;
    const end = firstPage + pageCount;
    while (page < end) {
      if (!this.#lacking.has(page)) {
        page++;
        continue;
      }
      let runEnd = page + 1;
      while (runEnd < end && this.#lacking.has(runEnd)) runEnd++;
      if (data) this.#uffd.copy(page, data.subarray((page - firstPage) * PAGE_SIZE, (runEnd - firstPage) * PAGE_SIZE));
      else this.#uffd.zero(page, runEnd - page);
      const now = performance.now();
      for (let placed = page; placed < runEnd; placed++) {
        this.#lacking.delete(placed);
        const since = this.#waiting.get(placed);
        if (since !== undefined) {
          this.#latencies.push(now - since);
          this.#waiting.delete(placed);
        }
      }
      page = runEnd;
    }
    if (this.#lacking.size === 0 && this.#durationMs === 0) {
      this.#durationMs = performance.now() - this.#started;
      this.onComplete();
    }
  }

  /** Stops serving faults and unregisters the memory (every page is there, or the machine goes). */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#watch.close();
    this.#uffd.close();
    void this.#memory;
  }
}

/** The parts of sorted `ranges` within pages [first, end). */
function intersect(ranges: readonly PageRange[], first: number, end: number): PageRange[] {
  const parts: PageRange[] = [];
  for (const range of ranges) {
    const from = Math.max(range.firstPage, first);
    const to = Math.min(range.firstPage + range.pageCount, end);
    if (from < to) parts.push({ firstPage: from, pageCount: to - from });
  }
  return parts;
}

/** What the post-copy destination needs of receiveMigration(). */
export interface PostcopyDestinationContext {
  pages: PostcopyPages;
  machine: Machine;
  /** The stream's header: a resumed connection must name the same stream. */
  header: StreamHeader;
  /** Where this side listened (the real port for tcp port 0): it listens there again after a break. */
  address: string;
  token: string | undefined;
  stallTimeoutMs: number;
  recoveryMs: number | undefined;
  log: (message: string) => void;
  /**
   * Parses a connection's stream into `pages.target` from `leftover` on (receive.ts's
   * receiveSections), each read into `pages.readBuffer()` where it gives one.
   */
  receive(socket: Socket, leftover: Uint8Array[], target: SectionParserTarget): { socket: Socket; ended: Promise<void> };
}

/** Raised when post-copy cannot go on: the guest is paused here, the machine on `machine`. */
export class PostcopyPausedError extends MigrationError {
  /** The machine whose guest is paused here (stop() it to give the guest up). */
  readonly machine: Machine;
  /** An EPOSTCOPY error holding the paused `machine`. */
  constructor(message: string, machine: Machine, cause?: unknown) {
    super(Code.PostcopyBroken, message, { phase: 'postcopy', cause });
    this.name = 'PostcopyPausedError';
    this.machine = machine;
  }
}

/**
 * Serves post-copy from the connection the guest's state came on (`socket`, its sections parsed
 * by `sections`) until every page is there, across breaks: resolves then, with the figures sent
 * to the source, or rejects with a PostcopyPausedError (the guest paused here) when the source does
 * not come back within `recoveryMs`.
 */
export async function runPostcopyDestination(
  context: PostcopyDestinationContext, first: { socket: Socket; ended: Promise<void> },
): Promise<PostcopyStats> {
  const { pages, machine } = context;
  let complete!: () => void;
  const completed = new Promise<void>((resolve) => (complete = resolve));
  let fail!: (error: Error) => void;
  const failed = new Promise<never>((_, reject) => (fail = reject));
  failed.catch(() => {});
  pages.onComplete = () => complete();
  pages.onFailure = (error) => fail(error);
  if (pages.lackingCount === 0) complete();
  // A machine stopped meanwhile (its owner gave the guest up): its vCPUs waiting on pages must be
  // let go, or they could never end. Closing the userfaultfd wakes them (on zero pages: the guest
  // is going anyway). Watched until the machine has ended, beyond a failure of post-copy.
  const stopped = new AbortController();
  const stopWatch = setInterval(() => {
    if (machine.state !== 'stopping' && machine.state !== 'stopped') return;
    clearInterval(stopWatch);
    pages.close();
    stopped.abort(new MigrationError(Code.MachineState, 'the machine was stopped during post-copy'));
    fail(new MigrationError(Code.MachineState, 'the machine was stopped during post-copy'));
  }, 50);
  stopWatch.unref();
  let connection: { socket: Socket; ended: Promise<void> } = first;
  for (;;) {
    const socket = connection.socket;
    const send = (chunks: Uint8Array[]) => writeChunks(socket, chunks).catch(() => {});
    pages.request = (ranges) => void send([encodeSection(SectionType.PageRequest, encodePageRanges(ranges))]);
    type Outcome = { done: true } | { done: false; broke: Error; fatal: boolean };
    const outcome: Outcome = await Promise.race([
      completed.then((): Outcome => ({ done: true })),
      // A stream that ends (End) still completes with its last page; one that fails is a break.
      connection.ended.then(() => completed.then((): Outcome => ({ done: true })), (error: Error): Outcome => ({ done: false, broke: error, fatal: false })),
      failed.catch((error: Error): Outcome => ({ done: false, broke: error, fatal: true })),
    ]);
    pages.request = null;
    if (outcome.done) {
      pages.close();
      const stats = pages.stats();
      await writeChunks(socket, [encodeSection(SectionType.Postcopy, new TextEncoder().encode(JSON.stringify(stats))), encodeEnd()]).catch(() => {});
      // The source's End acknowledges ours. Without it the source may not know that every page is
      // here (a break just as ours went): it would reconnect, so listen for that and answer that
      // nothing is lacking, until it acknowledges or the recovery time is up.
      const unacknowledged = await connection.ended.then(() => null, (error: Error) => error);
      if (unacknowledged === null) {
        clearInterval(stopWatch);
        socket.end();
        return stats;
      }
      socket.destroy();
      context.log(`post-copy: every page is here, but the connection broke (${unacknowledged.message}) before the source acknowledged it; ` +
        `waiting on ${context.address} for the source to resume`);
      try {
        connection = await acceptResume(context, unacknowledged, stopped.signal);
      } catch {
        clearInterval(stopWatch);
        context.log(`post-copy: the source did not come back to acknowledge that every page is here${stopped.signal.aborted ? ' (the machine was stopped)' : ''}; ` +
          'it may report EPOSTCOPY, but the guest has all its memory here');
        return stats;
      }
      continue;
    }
    // A uffd error fails the parse too (it surfaces as a broken stream): it is fatal all the same.
    const fatal = outcome.fatal || pages.failure !== null;
    const broke = pages.failure ?? outcome.broke;
    pages.dropStaged();
    if (fatal) {
      // Not the connection: pages cannot be placed here, and a resume could not help. The source
      // hears why at once (it keeps its copy, paused) rather than trying to resume.
      const message = `post-copy failed here: ${broke.message}; the guest is paused here, lacking ${pages.lackingCount} pages`;
      // Half-closed: the source reads why before it sees the connection go (its writes meanwhile
      // do not fail); dropped soon after.
      if (!socket.destroyed) socket.end(encodeErrorSection(message));
      setTimeout(() => socket.destroy(), 1000).unref();
      // A vCPU blocked on a page that cannot come never parks; the machine is paused all the same.
      await Promise.race([pauseGuest(machine), delay(1000, undefined, { ref: false })]);
      throw new PostcopyPausedError(message, machine, broke);
    }
    socket.destroy();
    const wasRunning = machine.state === 'running';
    const pausing = pauseGuest(machine);
    context.log(`post-copy: the connection broke (${broke.message}); the guest is paused, lacking ${pages.lackingCount} pages, until the source resumes on ${context.address}`);
    connection = await acceptResume(context, broke, stopped.signal);
    // Back on a connection: the guest runs again (vCPUs still waiting on a page are asked for again).
    await Promise.race([pausing, new Promise((resolve) => setTimeout(resolve, 0))]);
    try {
      if (wasRunning && (machine.state as string) === 'paused') machine.resume();
    } catch {
      // A quiet pause (the halt watch's) under way: the guest runs on after it.
    }
  }
}


/** Pauses the guest if it runs; resolves once it is (or at once, when a vCPU waits on a page: it parks once the page comes). */
function pauseGuest(machine: Machine): Promise<void> {
  if (machine.state !== 'running') return Promise.resolve();
  const pausing = machine.pause().catch(() => {});
  return pausing;
}

/**
 * Listens at the same address until the source of the same stream connects and resumes (an
 * empty Postcopy section); answers with the pages still lacking, then asks for those faults wait
 * on. Rejects with a PostcopyPausedError when `recoveryMs` passes first.
 */
async function acceptResume(context: PostcopyDestinationContext, broke: Error, signal: AbortSignal): Promise<{ socket: Socket; ended: Promise<void> }> {
  const { pages, header } = context;
  const deadline = context.recoveryMs === undefined ? Infinity : performance.now() + context.recoveryMs;
  const address = parseMigrationAddress(context.address);
  for (;;) {
    const left = deadline - performance.now();
    if (left <= 0) {
      throw new PostcopyPausedError(
        `post-copy broke (${broke.message}) and the source did not resume within ${context.recoveryMs} ms: the guest is paused here, ` +
        `lacking ${pages.lackingCount} pages that only the source has; it can run only once they come (the source keeps them)`, context.machine, broke);
    }
    let socket: Socket;
    try {
      socket = await listenForMigration(address, { token: context.token, timeoutMs: left === Infinity ? undefined : Math.max(1, left), signal });
    } catch (error) {
      if (signal.aborted) throw new PostcopyPausedError(`post-copy broke (${broke.message}) and the machine was stopped while it waited for the source`, context.machine, error);
      if (error instanceof MigrationError && error.code === Code.TimedOut) continue;
      throw new PostcopyPausedError(`post-copy broke (${broke.message}) and listening again on ${context.address} failed: ${(error as Error).message}; the guest is paused here`, context.machine, error);
    }
    socket.on('error', () => {});
    enlargeSocketBuffers(socket);
    const source = socketSource(socket, context.stallTimeoutMs);
    const reader = new SectionReader(source);
    try {
      const resumed = await reader.readHeader();
      if (resumed.kind !== 'migration' || hexId(resumed.streamId) !== hexId(header.streamId)) {
        throw new MigrationError(Code.Mismatch, `stream ${hexId(resumed.streamId)} is not the post-copy this side waits for (${hexId(header.streamId)})`);
      }
      const section = await reader.next();
      if (section.type !== SectionType.Postcopy || section.payload.length !== 0) {
        throw new MigrationError(Code.Format, `a resumed post-copy starts with an empty Postcopy section, not ${section.name}`);
      }
      await writeChunks(socket, [
        encodeHeader({ kind: 'migration', memoryBytes: header.memoryBytes, vcpuCount: header.vcpuCount }),
        encodeSection(SectionType.Postcopy, encodePageRanges(pages.lacking())),
      ]);
      const waiting = pages.waiting();
      if (waiting.length > 0) await writeChunks(socket, [encodeSection(SectionType.PageRequest, encodePageRanges(waiting))]);
      context.log(`post-copy: the source resumed; ${pages.lackingCount} pages to go`);
      const target: SectionParserTarget = { memoryBytes: context.machine.memoryBytes, section: () => {}, ...pages.target } as SectionParserTarget;
      const sections = context.receive(socket, source.detach(), withSections(target));
      sections.ended.catch(() => {});
      return sections;
    } catch (error) {
      context.log(`post-copy: refused a resume: ${(error as Error).message}`);
      await writeChunks(socket, [encodeErrorSection((error as Error).message)]).catch(() => {});
      socket.destroy();
    }
  }
}

/** A resumed connection carries Pages sections and End only. */
function withSections(target: SectionParserTarget): SectionParserTarget {
  return {
    ...target,
    section: (section) => {
      if (section.type === SectionType.Error) throw new MigrationError(Code.Canceled, `the source gave up: ${Buffer.from(section.payload).toString('utf8')}`);
      if (section.type !== SectionType.End) throw new MigrationError(Code.Format, `unexpected ${section.name} section in a resumed post-copy`);
    },
  };
}

/** The ranges of a Postcopy section from the source, checked against guest RAM. */
export function decodeLacking(payload: Uint8Array, memoryBytes: number): PageRange[] {
  return decodePageRanges(payload, memoryBytes / PAGE_SIZE, 'the Postcopy section');
}
