// Reading a stream one section at a time from a ByteSource (sources.ts): the header, then each
// section as SectionParser (the one parser of the framing) hands it over, each checked in full
// before it is returned. Pages sections come whole; decodePages() checks them.
import { argTypeError } from '../kvm/errors.js';
import { MigrationError, MigrationErrorCode as Code } from './errors.js';
import { HEADER_BYTES, decodeHeader, type Section, type StreamHeader } from './format.js';
import { SectionParser } from './section-parser.js';
import type { ByteSource } from './sources.js';

export class SectionReader {
  readonly #source: ByteSource;
  readonly #parser: SectionParser;
  #header: StreamHeader | undefined;
  #next: Section | undefined;

  constructor(source: ByteSource) {
    if (typeof source !== 'object' || source === null || typeof source.read !== 'function') {
      throw argTypeError('source must be a ByteSource (an object with read(length))');
    }
    this.#source = source;
    // The sources hand out bytes that stay valid: a section's payload is a view of them, no copy.
    this.#parser = new SectionParser({ section: (section) => (this.#next = section) });
  }

  /** The header, once readHeader() has returned. */
  get header(): StreamHeader | undefined {
    return this.#header;
  }

  /** Whether the End section has been read. */
  get ended(): boolean {
    return this.#parser.ended;
  }

  async readHeader(): Promise<StreamHeader> {
    if (this.#header) throw new MigrationError(Code.InvalidState, 'the stream header has already been read');
    const bytes = await this.#source.read(HEADER_BYTES, 'the stream header');
    this.#header = decodeHeader(bytes);
    return this.#header;
  }

  /** The next section, its length limit and CRC checked. After End, there is no next. */
  async next(): Promise<Section> {
    if (!this.#header) throw new MigrationError(Code.InvalidState, 'read the stream header (readHeader()) before its sections');
    if (this.#parser.ended) throw new MigrationError(Code.InvalidState, 'the stream has ended: no section follows End');
    this.#next = undefined;
    // Two reads a section: its header, then its payload with the CRC after it.
    while (this.#next === undefined) {
      this.#parser.push(await this.#source.read(this.#parser.bytesWanted, this.#parser.waitingFor));
    }
    return this.#next;
  }
}
