// The machine's serial console as a stream it owns: reading it gives the guest's COM1 output
// (when the machine was given no output of its own), writing to it types into COM1. Output that
// nobody reads is kept up to a bound, oldest bytes dropped first: a guest that prints forever
// neither grows the process nor waits for a reader.
import { Duplex } from 'node:stream';

/** Output a console keeps for a reader that has not come (beyond the stream's own buffer). */
export const CONSOLE_BACKLOG_BYTES = 64 * 1024;
/** The readable side's buffer (its highWaterMark), on top of the backlog. */
const READ_BUFFER_BYTES = 16 * 1024;
/** Largest chunk handed to the readable side at once, so that its buffer passes its mark by little. */
const READ_CHUNK_BYTES = 4 * 1024;
/** While the guest's input buffer is full, typed bytes are offered again after this long. */
const INPUT_RETRY_MS = 10;

/** What a console needs of its machine. */
export interface ConsoleLink {
  /** Offers bytes to the guest's COM1; returns how many its input buffer took. */
  type(bytes: Uint8Array): number;
  /** The error for input the machine can no longer take (it has ended), or null while it can. */
  refusal(): Error | null;
}

/** The machine's side of its console: output in, and the end. */
export interface ConsoleFeed {
  /** Output the guest wrote. */
  deliver(bytes: Uint8Array): void;
  /** The machine has ended: the readable side ends after what it holds, input is refused. */
  end(): void;
}

let feedOf!: (console: MachineConsole) => ConsoleFeed;

/**
 * A machine's serial console (COM1), as a Duplex. Reading gives what the guest writes to COM1,
 * when the machine was created without `serial.output` (else nothing), and ends once the machine
 * has stopped and everything it wrote has been read. Writing types into COM1 (as
 * sendSerialInput() does, but waiting while the guest's 16550A input buffer is full instead of
 * dropping). Input the guest has not taken when it ends is dropped; a write after the machine
 * has ended fails with code ERR_MACHINE_STATE (and, as on a closed socket, destroys the stream).
 *
 * Output nobody reads is kept up to CONSOLE_BACKLOG_BYTES (plus the stream's 16 KiB buffer):
 * beyond that the oldest bytes are dropped (counted in droppedBytes), and the guest never waits.
 */
export class MachineConsole extends Duplex {
  readonly #link: ConsoleLink;
  /** Output not yet handed to the readable side, oldest first. */
  readonly #backlog: Buffer[] = [];
  #backlogBytes = 0;
  #droppedBytes = 0;
  /** The reader asked for more (_read) and has not been given its fill since. */
  #wanted = false;
  #outputEnded = false;
  #eofPushed = false;
  /** Typed bytes waiting for room in the guest's input buffer. */
  #pendingInput: { bytes: Uint8Array; callback: (error?: Error | null) => void; timer: NodeJS.Timeout | null } | null = null;

  static {
    feedOf = (console) => ({ deliver: (bytes) => console.#deliver(bytes), end: () => console.#end() });
  }

  private constructor(link: ConsoleLink) {
    super({ readableHighWaterMark: READ_BUFFER_BYTES, allowHalfOpen: true, decodeStrings: true });
    this.#link = link;
  }

  /** Output bytes dropped because nobody read them in time (oldest first). */
  get droppedBytes(): number {
    return this.#droppedBytes;
  }

  /** @internal The stream's hook: the reader wants more output. */
  override _read(): void {
    this.#wanted = true;
    this.#flush();
  }

  /** @internal The stream's hook: types `chunk` into COM1. */
  override _write(chunk: Buffer, _encoding: BufferEncoding, callback: (error?: Error | null) => void): void {
    this.#type(chunk, callback);
  }

  /** @internal The stream's hook: the console is destroyed. */
  override _destroy(error: Error | null, callback: (error?: Error | null) => void): void {
    if (this.#pendingInput?.timer) clearTimeout(this.#pendingInput.timer);
    this.#pendingInput = null;
    this.#backlog.length = 0;
    this.#backlogBytes = 0;
    callback(error);
  }

  #type(bytes: Uint8Array, callback: (error?: Error | null) => void): void {
    this.#pendingInput = null;
    const refusal = this.#link.refusal();
    if (refusal) {
      callback(refusal);
      return;
    }
    const taken = this.#link.type(bytes);
    if (taken === bytes.length) {
      callback();
      return;
    }
    // The guest reads its input buffer without telling us: offer the rest again shortly.
    const rest = bytes.subarray(taken);
    const pending = { bytes: rest, callback, timer: null as NodeJS.Timeout | null };
    pending.timer = setTimeout(() => this.#type(rest, callback), INPUT_RETRY_MS).unref();
    this.#pendingInput = pending;
  }

  #deliver(bytes: Uint8Array): void {
    if (this.#outputEnded || this.destroyed || bytes.length === 0) return;
    this.#backlog.push(Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength));
    this.#backlogBytes += bytes.length;
    if (this.#wanted) this.#flush();
    // Kept for a reader yet to come: the latest bytes only.
    let excess = this.#backlogBytes - CONSOLE_BACKLOG_BYTES;
    while (excess > 0) {
      const oldest = this.#backlog[0]!;
      const dropped = Math.min(oldest.length, excess);
      if (dropped === oldest.length) this.#backlog.shift();
      else this.#backlog[0] = oldest.subarray(dropped);
      this.#backlogBytes -= dropped;
      this.#droppedBytes += dropped;
      excess -= dropped;
    }
  }

  #flush(): void {
    while (this.#wanted && this.#backlog.length > 0) {
      const oldest = this.#backlog[0]!;
      const chunk = oldest.length > READ_CHUNK_BYTES ? oldest.subarray(0, READ_CHUNK_BYTES) : oldest;
      if (chunk === oldest) this.#backlog.shift();
      else this.#backlog[0] = oldest.subarray(chunk.length);
      this.#backlogBytes -= chunk.length;
      this.#wanted = this.push(chunk);
    }
    if (this.#outputEnded && this.#backlog.length === 0) this.#pushEof();
  }

  #pushEof(): void {
    if (this.#eofPushed || this.destroyed) return;
    this.#eofPushed = true;
    this.push(null);
  }

  #end(): void {
    if (this.#outputEnded) return;
    this.#outputEnded = true;
    // Nothing more comes: the reader gets what is held, then the end.
    if (this.#backlog.length === 0) this.#pushEof();
    // Input the guest had not taken is dropped with it (failing that write would destroy the
    // stream, and with it the output not yet read); input written from now on fails.
    const pending = this.#pendingInput;
    this.#pendingInput = null;
    if (pending) {
      if (pending.timer) clearTimeout(pending.timer);
      pending.callback();
    }
  }
}

/** A console for a machine, and the machine's side of it. */
export function createConsole(link: ConsoleLink): { console: MachineConsole; feed: ConsoleFeed } {
  const console = new (MachineConsole as unknown as new (link: ConsoleLink) => MachineConsole)(link);
  return { console, feed: feedOf(console) };
}
