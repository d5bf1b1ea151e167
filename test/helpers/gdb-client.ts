// A debugger's side of a GDB remote connection, spoken without gdb: raw bytes out, acks and reply
// packets in (for the stub's tests).
import net from 'node:net';
import type { GdbServer } from '../../lib/index.js';
import { framePacket } from '../../lib/debug/packets.js';

/** A debugger's side of the connection: raw bytes out, acks and reply packets in. */
export class Client {
  readonly socket: net.Socket;
  readonly #replies: string[] = [];
  #acks = '';
  /** The reply being read: its data, then its two checksum digits. */
  #packet: string | null = null;
  #checksumDigits = -1;
  #wake: (() => void) | null = null;

  private constructor(socket: net.Socket) {
    this.socket = socket;
    socket.on('data', (chunk: Buffer) => {
      for (const char of chunk.toString('latin1')) this.#take(char);
      this.#wake?.();
    });
  }

  #take(char: string): void {
    if (this.#checksumDigits >= 0) {
      if (++this.#checksumDigits === 2) {
        this.#replies.push(this.#packet!);
        this.#packet = null;
        this.#checksumDigits = -1;
      }
    } else if (this.#packet !== null) {
      if (char === '#') this.#checksumDigits = 0;
      else this.#packet += char;
    } else if (char === '$') {
      this.#packet = '';
    } else if (char === '+' || char === '-') {
      this.#acks += char;
    }
  }

  static async connect(server: GdbServer | string): Promise<Client> {
    const port = Number((typeof server === 'string' ? server : server.address).split(':').pop());
    const socket = net.connect({ host: '127.0.0.1', port });
    await new Promise((resolve, reject) => socket.once('connect', resolve).once('error', reject));
    return new Client(socket);
  }

  send(bytes: string | Buffer): void {
    this.socket.write(typeof bytes === 'string' ? Buffer.from(bytes, 'latin1') : bytes);
  }

  /** Sends a packet and resolves with the next reply's data. */
  async request(data: string | Buffer): Promise<string> {
    this.send(framePacket(data));
    return this.reply();
  }

  /** The next reply packet's data. */
  async reply(): Promise<string> {
    while (this.#replies.length === 0) await this.#more();
    return this.#replies.shift()!;
  }

  /** The acks and naks received so far (taken). */
  acks(): string {
    const acks = this.#acks;
    this.#acks = '';
    return acks;
  }

  async #more(): Promise<void> {
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error('no reply')), 10_000);
      this.#wake = () => {
        clearTimeout(timer);
        this.#wake = null;
        resolve();
      };
    });
  }
}

