// A destination is a fresh process: without this, the code that takes the page stream in (the
// section parser, the page table checks, the CRC calls) would run interpreted, and be compiled by
// V8's background threads, during the transfer itself, on CPUs the source needs as well.
import { PassThrough } from 'node:stream';
import { PAGE_SIZE } from '../kvm/constants.js';
import { SectionType, checkHeader, encodeHeader, encodeSync } from './format.js';
import { encodeLivePageBatch, encodePages } from './pages.js';
import { SectionParser } from './section-parser.js';
import { SectionReader } from './section-reader.js';
import { socketSource } from './sources.js';
import { checkShape, decodeConfigSection, encodeConfigSection } from './state-sections.js';
import { writeChunks } from './writers.js';

const WARM_UP_RAM_BYTES = 1024 * 1024;
const WARM_UP_SECTION_BYTES = 64 * 1024;
/** Pieces the warm-up stream is pushed in: some cut sections in two, some hold several whole. */
const WARM_UP_PIECES = [24 * 1024, 4096 + 20, 200 * 1024, 1000];
/**
 * Measured here: parsing and checking 64 MiB of pages in 4 MiB reads took 7-9 ms (9.5-13 ms of CPU
 * with V8's compiler threads) in a fresh process, 5.5 ms (5.5 ms of CPU) after this warm-up of
 * about 5-8 ms; more rounds did not do better.
 */
const WARM_UP_ROUNDS = 6;
/** Live sections in the warm-up stream, each round. */
const LIVE_WARM_UP_SECTIONS = 4;

let warmedUp = false;

/**
 * Runs a small made-up page stream (zero and data ranges, copied and live sections, a Sync, in
 * pieces of several sizes) through a SectionParser that streams pages into nothing, once per
 * process.
 */
export function warmUpPageStream(): void {
  if (warmedUp) return;
  warmedUp = true;
  const ram = new Uint8Array(WARM_UP_RAM_BYTES);
  // Runs of data pages between runs of zero pages, as in a guest's RAM.
  for (let page = 0; page < ram.length / PAGE_SIZE; page++) if (page % 8 < 5) ram.fill(page & 0xff || 1, page * PAGE_SIZE, (page + 1) * PAGE_SIZE);
  const pages = encodePages([{ firstPage: 0, pageCount: ram.length / PAGE_SIZE }], (at, length) => ram.subarray(at, at + length), {
    maxDataBytesPerSection: WARM_UP_SECTION_BYTES,
  });
  // And a few as live sections (a source of this build sends its pre-copy rounds and last pages
  // so): more made the warm-up's compiling run on into the first migration.
  const live: Uint8Array[] = [];
  const sectionPages = WARM_UP_SECTION_BYTES / PAGE_SIZE;
  for (let section = 0; section < LIVE_WARM_UP_SECTIONS; section++) {
    live.push(...encodeLivePageBatch(ram, [{ firstPage: section * sectionPages, pageCount: sectionPages }], section % 2 === 0).chunks);
  }
  const stream = Buffer.concat([...pages.sections, ...live, encodeSync()]);
  for (let round = 0; round < WARM_UP_ROUNDS; round++) {
    const parser = new SectionParser({
      memoryBytes: ram.length,
      writePages: () => {},
      zeroPages: () => {},
      pagesDone: () => {},
      section: () => {},
    });
    const piece = WARM_UP_PIECES[round % WARM_UP_PIECES.length]!;
    for (let at = 0; at < stream.length; at += piece) parser.push(stream.subarray(at, at + piece));
  }
  void warmUpStreamStart();
}

/**
 * The stream's start as a destination takes it (the header and the Config section read from a
 * socket and checked; the same two written), over a stream in memory: the first migration a
 * process receives then runs compiled code there. From the source connected to the stream
 * announced at the destination: 0.8-1.3 ms with it, 1.8-3.0 without (medians of 7, busy host).
 * Settles within a few turns of the event loop; never rejects.
 */
async function warmUpStreamStart(): Promise<void> {
  const wire = new PassThrough();
  const source = socketSource(wire, 1000);
  try {
    const shape = { memoryBytes: WARM_UP_RAM_BYTES, vcpus: 1, irqchip: true };
    const header = { kind: 'migration' as const, memoryBytes: shape.memoryBytes, vcpuCount: shape.vcpus };
    await writeChunks(wire, [encodeHeader(header), encodeConfigSection({ machine: shape })]);
    const reader = new SectionReader(source);
    checkHeader(await reader.readHeader(), { kind: 'migration', memoryBytes: shape.memoryBytes, vcpuCount: shape.vcpus });
    const config = await reader.next();
    if (config.type === SectionType.Config) checkShape(decodeConfigSection(config, 'a warm-up').machine, 'a warm-up');
    source.detach();
  } catch {
    // Only a warm-up.
  } finally {
    source.close();
    wire.destroy();
  }
}
