// The source side of post-copy (see postcopy-destination.ts for the other): the guest runs at the
// destination now and is paused here for good; every page the destination lacks goes out, those
// a fault waits on (PageRequest) ahead of the background stream; the destination says End (with
// its figures) once it has every page, and this side's End acknowledges it. If the connection breaks, this side
// reconnects and resumes: the destination says which pages it still lacks, and they go again.
// This side never resumes the guest: the destination has run it.
import type { Socket } from 'node:net';
import { setTimeout as delay } from 'node:timers/promises';
import { PAGE_SIZE } from '../kvm/constants.js';
import type { PageRange } from '../vmm/page-ranges.js';
import { MigrationError, MigrationErrorCode as Code } from './errors.js';
import { SectionType, decodeErrorSection, encodeEnd, encodeHeader, encodeSection, type Section } from './format.js';
import { encodePages } from './pages.js';
import { PeerReplies } from './peer-replies.js';
import { PageSet, decodePageRanges, encodePageRanges } from './postcopy-ranges.js';
import { enlargeSocketBuffers } from './socket-buffers.js';
import { connectForMigration, type MigrationAddress } from './transport.js';
import { SectionBufferPool } from './writers.js';
import type { MigrationStats, PostcopyStats } from './types.js';

export const DEFAULT_POSTCOPY_RECOVERY_MS = 60_000;
// What a requested page waits behind: the background stream's section being written, the socket's
// user-space queue and its kernel buffers. Small (256 KiB, 256 KiB and 512 KiB, from 1 MiB, 1 MiB
// and 4 MiB): fault latency p50 0.4-0.5 ms from 0.9-1.5 ms in bench:postcopy side by side, the
// stream's rate within its noise (bench/README.md).
/** Pages per background section. */
const BACKGROUND_BATCH_PAGES = 64;
/** User-space queue on the socket above which the stream waits until what it wrote reaches the kernel. */
const QUEUE_LIMIT_BYTES = 256 * 1024;
/** The post-copy connection's kernel buffers (unix sockets; TCP sizes its own). */
const SOCKET_BUFFER_BYTES = 512 * 1024;
const RECONNECT_INTERVAL_MS = 100;

export function newPostcopyStats(missingPages: number): PostcopyStats {
  return {
    missingPages, requests: 0, pagesOnDemand: 0, pagesBackground: 0, faults: 0,
    faultLatencyMs: { p50: 0, p90: 0, p99: 0, max: 0 }, durationMs: 0, recoveries: 0,
  };
}

export interface PostcopySourceOptions {
  address: MigrationAddress;
  addressText: string;
  token: string | undefined;
  timeoutMs: number;
  recoveryMs: number;
  memoryBytes: number;
  vcpuCount: number;
  /** The first connection's stream id: a resumed connection names the same stream. */
  streamId: Uint8Array;
  onProgress: () => void;
}

/**
 * Sends `missing` (the pages the destination lacks as its guest starts) over `socket`, serving
 * its requests first, until it has every page; reconnects after a break. Resolves once the
 * destination has said it has every page; rejects (EPOSTCOPY) when it cannot be reached again
 * within `recoveryMs`, or refuses.
 */
export async function runPostcopySource(
  ram: Uint8Array, missing: readonly PageRange[], first: { socket: Socket; replies: PeerReplies }, stats: MigrationStats, options: PostcopySourceOptions,
): Promise<void> {
  const memoryPages = ram.length / PAGE_SIZE;
  const owed = new PageSet(memoryPages);
  owed.addRanges(missing);
  const postcopy = (stats.postcopy ??= newPostcopyStats(owed.size));
  const started = performance.now();
  let connection: { socket: Socket; replies: PeerReplies } | null = first;
  for (;;) {
    let broke: unknown;
    try {
      await serve(ram, owed, connection!, stats, postcopy, options);
      postcopy.durationMs = performance.now() - started;
      return;
    } catch (error) {
      if (error instanceof MigrationError && error.code === Code.Refused) {
        throw new MigrationError(Code.PostcopyBroken, `post-copy to ${options.addressText} failed: ${error.message}; ${pausedHere(owed)}`, { phase: 'postcopy', cause: error });
      }
      broke = error;
    }
    connection.socket.destroy();
    connection = null;
    // Reconnect and resume until the destination answers, or the time is up.
    const deadline = performance.now() + options.recoveryMs;
    let last: unknown = broke;
    while (connection === null) {
      if (performance.now() >= deadline) {
        throw new MigrationError(Code.PostcopyBroken,
          `post-copy to ${options.addressText} broke (${(broke as Error)?.message ?? String(broke)}) and the destination could not be reached again within ` +
          `${options.recoveryMs} ms (${(last as Error)?.message ?? String(last)}); ${pausedHere(owed)}`, { phase: 'postcopy', cause: broke });
      }
      try {
        connection = await resume(owed, options, Math.max(1, Math.min(options.timeoutMs, deadline - performance.now())));
        postcopy.recoveries++;
        options.onProgress();
      } catch (error) {
        if (error instanceof MigrationError && error.code === Code.Refused) {
          throw new MigrationError(Code.PostcopyBroken, `post-copy to ${options.addressText} could not resume: ${error.message}; ${pausedHere(owed)}`, { phase: 'postcopy', cause: error });
        }
        last = error;
        await delay(RECONNECT_INTERVAL_MS);
      }
    }
  }
}

function pausedHere(owed: PageSet): string {
  return `the destination may run the guest (it was sent there to run), so it cannot resume here: it stays paused here with its memory ` +
    `(a destination that ran it holds it paused, lacking up to ${owed.size} pages only this side has)`;
}

/** A new connection that resumes the stream: the destination answers with the pages it lacks. */
async function resume(owed: PageSet, options: PostcopySourceOptions, timeoutMs: number): Promise<{ socket: Socket; replies: PeerReplies }> {
  const socket = await connectForMigration(options.address, { token: options.token, timeoutMs });
  socket.on('error', () => {});
  try {
    enlargeSocketBuffers(socket);
    const replies = new PeerReplies(socket);
    socket.write(encodeHeader({ kind: 'migration', memoryBytes: options.memoryBytes, vcpuCount: options.vcpuCount, streamId: options.streamId }));
    socket.write(encodeSection(SectionType.Postcopy, new Uint8Array(0)));
    const answer = await withTimeout(replies.next(), timeoutMs, 'its answer to the resume');
    if (answer.type === SectionType.Error) throw new MigrationError(Code.Refused, `the destination refused: ${decodeErrorSection(answer.payload)}`);
    if (answer.type !== SectionType.Postcopy) throw new MigrationError(Code.Format, `the destination answered a resume with a ${answer.name} section`);
    const lacking = decodePageRanges(answer.payload, owed.pageCount, 'the destination\'s answer to a resume');
    owed.clear();
    owed.addRanges(lacking);
    return { socket, replies };
  } catch (error) {
    socket.destroy();
    throw error;
  }
}

async function withTimeout<T>(work: Promise<T>, timeoutMs: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new MigrationError(Code.TimedOut, `no answer from the destination within ${timeoutMs} ms (waiting for ${what})`)), timeoutMs);
  });
  try {
    return await Promise.race([work, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** One connection's share: requests first, then the background stream, End; then its End. */
async function serve(
  ram: Uint8Array, owed: PageSet, connection: { socket: Socket; replies: PeerReplies }, stats: MigrationStats, postcopy: PostcopyStats,
  options: PostcopySourceOptions,
): Promise<void> {
  const { socket, replies } = connection;
  enlargeSocketBuffers(socket, SOCKET_BUFFER_BYTES);
  const requests: PageRange[] = [];
  let wake: () => void = () => {};
  let finished = false;
  // The destination's side: requests as they come, its figures, its End (every page there).
  const reading = (async () => {
    for (;;) {
      const section: Section = await replies.next();
      switch (section.type) {
        case SectionType.PageRequest:
          requests.push(...decodePageRanges(section.payload, owed.pageCount, 'a PageRequest section'));
          postcopy.requests++;
          wake();
          break;
        case SectionType.Postcopy:
          takeFigures(postcopy, section.payload);
          break;
        case SectionType.End:
          finished = true;
          wake();
          return;
        case SectionType.Error:
          throw new MigrationError(Code.Refused, `the destination gave up: ${decodeErrorSection(section.payload)}`);
        default:
          throw new MigrationError(Code.Format, `the destination sent a ${section.name} section during post-copy`);
      }
    }
  })();
  reading.catch(() => {});
  const closed = new Promise<never>((_, reject) => {
    const onClose = () => reject(new MigrationError(Code.Closed, 'the connection closed during post-copy'));
    if (socket.destroyed) onClose();
    else socket.once('close', onClose);
  });
  closed.catch(() => {});
  const failure = Promise.race([reading.then(() => new Promise<never>(() => {})), closed]);

  const read = (guestPhysAddr: number, byteLength: number) => ram.subarray(guestPhysAddr, guestPhysAddr + byteLength);
  // Section buffers used again once written: fresh ones cost a page fault per 4 KiB, and GC.
  const buffers = new SectionBufferPool();
  let cursor = 0;
  let allSent = false;
  while (!finished) {
    let batch: PageRange[] = [];
    let onDemand = false;
    while (requests.length > 0 && batch.length === 0) {
      const request = requests.shift()!;
      for (let page = request.firstPage; page < request.firstPage + request.pageCount; page++) {
        if (owed.delete(page)) batch.push({ firstPage: page, pageCount: 1 });
      }
      onDemand = true;
    }
    if (batch.length === 0 && owed.size > 0) {
      onDemand = false;
      const first = owed.nextFrom(cursor);
      let end = first;
      while (end < owed.pageCount && end - first < BACKGROUND_BATCH_PAGES && owed.delete(end)) end++;
      batch = [{ firstPage: first, pageCount: end - first }];
      cursor = end;
    }
    if (batch.length > 0) {
      const encoded = encodePages(batch, read, { memoryBytes: ram.length, allocate: buffers.allocate });
      const pages = batch.reduce((sum, range) => sum + range.pageCount, 0);
      if (onDemand) postcopy.pagesOnDemand += pages;
      else postcopy.pagesBackground += pages;
      stats.bytesTransferred += encoded.bytes;
      stats.pagesTransferred += encoded.pagesSent;
      stats.remainingPages = owed.size;
      let flushed!: () => void;
      const written = new Promise<void>((resolve) => (flushed = resolve));
      const last = encoded.sections.at(-1);
      for (const section of encoded.sections) {
        socket.write(section, () => {
          buffers.release(section);
          if (section === last) flushed();
        });
      }
      await Promise.race([flowControl(socket, () => requests.length > 0, written), failure]);
      continue;
    }
    if (!allSent) {
      allSent = true;
      options.onProgress();
    }
    // Everything has gone: wait for the destination's End (or a request for a page in flight, which
    // is on its way already and needs nothing).
    await Promise.race([new Promise<void>((resolve) => (wake = resolve)), failure]);
    requests.length = 0;
  }
  await reading;
  // Our End acknowledges the destination's: until it comes, a destination that has every page
  // still listens for a resume (to tell a source cut off from its End that nothing is lacking).
  socket.end(encodeEnd());
}

/**
 * Resolves once the socket's queue is short, or at once when a request waits (it goes next).
 * Waits for the last section written to reach the kernel, not for 'drain': Node emits 'drain' only
 * after a write() returned false, that is above the socket's highWaterMark (1 MiB), so with a
 * shorter queue limit a wait for it would never end.
 */
function flowControl(socket: Socket, urgent: () => boolean, written: Promise<void>): Promise<void> {
  if (socket.writableLength <= QUEUE_LIMIT_BYTES || urgent()) return new Promise((resolve) => setImmediate(resolve));
  return written;
}

function takeFigures(postcopy: PostcopyStats, payload: Uint8Array): void {
  try {
    const figures = JSON.parse(Buffer.from(payload.buffer, payload.byteOffset, payload.byteLength).toString('utf8')) as Partial<PostcopyStats>;
    if (typeof figures.faults === 'number') postcopy.faults = figures.faults;
    const latency = figures.faultLatencyMs;
    if (latency && ['p50', 'p90', 'p99', 'max'].every((key) => typeof (latency as Record<string, unknown>)[key] === 'number')) postcopy.faultLatencyMs = { ...latency };
  } catch {
    // Figures are informative: a destination that sends none (or garbage) costs only them.
  }
}
