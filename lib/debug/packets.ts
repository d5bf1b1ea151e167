// The GDB remote serial protocol's framing (gdb's manual, "Overview" of Remote Protocol):
// `$DATA#CS` with CS the modulo-256 sum of DATA's bytes in two hex digits, `+`/`-` acks until
// QStartNoAckMode, `}` escaping (the byte XOR 0x20) of `}` `#` `$` `*` in binary data, and a
// bare 0x03 for an interrupt. A debugger is a peer we do not trust: a packet longer than
// MAX_PACKET_BYTES is dropped (its end skipped) and reported, never buffered.

/** The largest packet (DATA, escaped) we accept and send; announced in qSupported as PacketSize. */
export const MAX_PACKET_BYTES = 16384;

const DOLLAR = 0x24;
const HASH = 0x23;
const ESCAPE = 0x7d;
const STAR = 0x2a;
const INTERRUPT = 0x03;

export type PacketEvent =
  /** A whole packet with a good checksum: its data, unescaped only where the command says (X). */
  | { kind: 'packet'; data: Buffer }
  /** A packet whose checksum does not match (a NAK is due in ack mode). */
  | { kind: 'bad-checksum' }
  /** A packet longer than MAX_PACKET_BYTES, dropped. */
  | { kind: 'oversized' }
  /** Ctrl-C from the debugger (0x03 outside a packet). */
  | { kind: 'interrupt' }
  | { kind: 'ack' }
  | { kind: 'nak' };

/** The sum of `bytes` modulo 256. */
export function checksum(bytes: Uint8Array): number {
  let sum = 0;
  for (const byte of bytes) sum = (sum + byte) & 0xff;
  return sum;
}

/** `$DATA#CS` for a reply; DATA must already be escaped where it carries binary bytes. */
export function framePacket(data: string | Uint8Array): Buffer {
  const body = typeof data === 'string' ? Buffer.from(data, 'latin1') : Buffer.from(data);
  return Buffer.concat([Buffer.from('$'), body, Buffer.from(`#${checksum(body).toString(16).padStart(2, '0')}`)]);
}

/** Escapes `}` `#` `$` `*` in binary data (replies and X packets). */
export function escapeBinary(bytes: Uint8Array): Buffer {
  const out: number[] = [];
  for (const byte of bytes) {
    if (byte === ESCAPE || byte === HASH || byte === DOLLAR || byte === STAR) out.push(ESCAPE, byte ^ 0x20);
    else out.push(byte);
  }
  return Buffer.from(out);
}

/** Undoes escapeBinary(); null when the data ends inside an escape. */
export function unescapeBinary(bytes: Uint8Array): Buffer | null {
  const out = Buffer.alloc(bytes.length);
  let length = 0;
  for (let i = 0; i < bytes.length; i++) {
    if (bytes[i] === ESCAPE) {
      if (++i >= bytes.length) return null;
      out[length++] = bytes[i]! ^ 0x20;
    } else {
      out[length++] = bytes[i]!;
    }
  }
  return out.subarray(0, length);
}

const enum State {
  /** Between packets: acks, interrupts and noise. */
  Idle,
  Data,
  /** Dropping an oversized packet until its `#`. */
  Skipping,
  Checksum,
}

/**
 * Splits the debugger's byte stream into events. Push bytes as they arrive; it keeps at most one
 * packet's worth of data, so a peer that never ends a packet costs MAX_PACKET_BYTES, no more.
 */
export class PacketReader {
  readonly #data = Buffer.alloc(MAX_PACKET_BYTES);
  #length = 0;
  #state = State.Idle;
  #sum = 0;
  #checksumDigits = '';
  #oversized = false;

  /** True while a packet has begun and not ended (a peer that disconnects now left one half sent). */
  get midPacket(): boolean {
    return this.#state !== State.Idle;
  }

  push(chunk: Uint8Array): PacketEvent[] {
    const events: PacketEvent[] = [];
    for (const byte of chunk) {
      switch (this.#state) {
        case State.Idle:
          if (byte === DOLLAR) this.#begin();
          else if (byte === INTERRUPT) events.push({ kind: 'interrupt' });
          else if (byte === 0x2b) events.push({ kind: 'ack' });
          else if (byte === 0x2d) events.push({ kind: 'nak' });
          // Anything else between packets is noise: ignored.
          break;
        case State.Data:
        case State.Skipping:
          if (byte === HASH) {
            this.#state = State.Checksum;
            this.#checksumDigits = '';
          } else if (byte === DOLLAR) {
            // A new packet starts before the last ended: the last was garbage.
            events.push({ kind: 'bad-checksum' });
            this.#begin();
          } else if (this.#state === State.Data) {
            this.#sum = (this.#sum + byte) & 0xff;
            if (this.#length === MAX_PACKET_BYTES) {
              this.#state = State.Skipping;
              this.#oversized = true;
            } else {
              this.#data[this.#length++] = byte;
            }
          }
          break;
        case State.Checksum:
          this.#checksumDigits += String.fromCharCode(byte);
          if (this.#checksumDigits.length < 2) break;
          this.#state = State.Idle;
          if (this.#oversized) events.push({ kind: 'oversized' });
          else if (/^[0-9a-fA-F]{2}$/.test(this.#checksumDigits) && parseInt(this.#checksumDigits, 16) === this.#sum) {
            events.push({ kind: 'packet', data: Buffer.from(this.#data.subarray(0, this.#length)) });
          } else events.push({ kind: 'bad-checksum' });
          break;
      }
    }
    return events;
  }

  #begin(): void {
    this.#state = State.Data;
    this.#length = 0;
    this.#sum = 0;
    this.#oversized = false;
  }
}

/** Hex digits of `bytes`. */
export function toHex(bytes: Uint8Array): string {
  return Buffer.from(bytes).toString('hex');
}

/** Bytes of an even-length string of hex digits; null if it is not one. */
export function fromHex(text: string): Buffer | null {
  if (text.length % 2 !== 0 || !/^[0-9a-fA-F]*$/.test(text)) return null;
  return Buffer.from(text, 'hex');
}

/** A hex number as gdb writes addresses and lengths; null if `text` is not one (or over 64 bits). */
export function parseHexNumber(text: string): bigint | null {
  if (!/^[0-9a-fA-F]{1,16}$/.test(text)) return null;
  return BigInt(`0x${text}`);
}
