// The source's side of what the destination says on the connection: a stream header, then
// Config (accepted), Sync answers, End (the guest runs there), or Error at any time; PageRequest
// sections too, for the pages of live Pages sections that failed their data's CRC there.
import type { Socket } from 'node:net';
import { MigrationError, MigrationErrorCode as Code } from './errors.js';
import { SectionType, decodeErrorSection, type Section } from './format.js';
import { SectionReader } from './section-reader.js';
import { socketSource } from './sources.js';

const refused = (section: Section): MigrationError => new MigrationError(Code.Refused, `the destination refused: ${decodeErrorSection(section.payload)}`);
const closed = (error: Error): MigrationError => new MigrationError(Code.Closed, `the destination closed the connection (${error.message})`, { cause: error });

/**
 * What the destination says on its side of the connection (a stream header, then sections):
 * Config once it has accepted the stream, End once the guest runs there, Error (with why) at any
 * time. One read is always pending, so an early Error or a closed connection cuts a write short.
 */
export class PeerReplies {
  readonly #reader: SectionReader;
  #pending!: Promise<Section>;
  #failure!: Promise<never>;
  #onPageRequest: ((section: Section) => void) | null = null;

  constructor(socket: Socket) {
    // The destination is silent while pre-copy runs, for as long as that takes: no stall timeout.
    this.#reader = new SectionReader(socketSource(socket, Infinity));
    this.#arm(this.#reader.readHeader().then(() => this.#next()));
  }

  /**
   * From now on PageRequest sections go to `handler` as they come, not to what waits for the next
   * section (null: no longer): a destination asks again for the pages of live Pages sections whose
   * data failed its CRC, ahead of its answer to the Sync that follows them.
   */
  onPageRequest(handler: ((section: Section) => void) | null): void {
    this.#onPageRequest = handler;
  }

  #next(): Promise<Section> {
    return this.#reader.next().then((section) => {
      if (section.type !== SectionType.PageRequest || !this.#onPageRequest) return section;
      this.#onPageRequest(section);
      return this.#next();
    });
  }

  #arm(next: Promise<Section>): void {
    this.#pending = next;
    next.catch(() => {});
    this.#failure = next.then(
      (section) => {
        if (section.type === SectionType.Error) throw refused(section);
        return new Promise<never>(() => {});
      },
      (error: Error) => {
        throw closed(error);
      },
    );
    this.#failure.catch(() => {});
  }

  /** The destination's reason for giving up, if it sends one within `waitMs`. */
  async refusal(waitMs: number): Promise<string | undefined> {
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<undefined>((resolve) => (timer = setTimeout(() => resolve(undefined), waitMs)));
    try {
      const section = await Promise.race([this.#pending.catch(() => undefined), timeout]);
      return section?.type === SectionType.Error ? decodeErrorSection(section.payload) : undefined;
    } finally {
      clearTimeout(timer);
    }
  }

  race<T>(work: Promise<T>): Promise<T> {
    return Promise.race([work, this.#failure]);
  }

  async #expect(type: number, what: string, timeoutMs: number): Promise<void> {
    let timer: NodeJS.Timeout | undefined;
    // Infinity: no timer (a local migration whose state has gone out waits for the verdict).
    const timeout = new Promise<never>((_, reject) => {
      if (Number.isFinite(timeoutMs)) timer = setTimeout(() => reject(new MigrationError(Code.TimedOut, `no answer from the destination within ${timeoutMs} ms (waiting for ${what})`)), timeoutMs);
    });
    try {
      const section = await Promise.race([this.#pending.catch((error: Error) => {
        throw closed(error);
      }), timeout]);
      if (section.type === SectionType.Error) throw refused(section);
      if (section.type !== type) throw new MigrationError(Code.Format, `the destination sent a ${section.name} section while ${what} was due`);
    } finally {
      clearTimeout(timer);
    }
  }

  async expectAccept(timeoutMs: number): Promise<void> {
    await this.#expect(SectionType.Config, 'its acceptance', timeoutMs);
    this.#arm(this.#next());
  }

  async expectSync(timeoutMs: number): Promise<void> {
    await this.#expect(SectionType.Sync, 'its answer to Sync', timeoutMs);
    this.#arm(this.#next());
  }

  /**
   * The next section the destination sends, whatever its type (post-copy's requests, figures and
   * End; an Error too): for the post-copy source, which reads them as they come.
   */
  async next(): Promise<Section> {
    const section = await this.#pending.catch((error: Error) => {
      throw closed(error);
    });
    if (section.type !== SectionType.End && section.type !== SectionType.Error) this.#arm(this.#next());
    return section;
  }

  /** Post-copy: the destination's word that the guest runs there. */
  async expectPostcopy(timeoutMs: number): Promise<void> {
    await this.#expect(SectionType.Postcopy, 'word that the guest runs there (post-copy)', timeoutMs);
    this.#arm(this.#next());
  }

  async expectResumed(timeoutMs: number): Promise<void> {
    await this.#expect(SectionType.End, 'word that the guest runs there', timeoutMs);
  }
}
