// The POST diagnostic port (0x80). Firmware writes progress codes to it and Linux writes to it
// for I/O delays (outb_p), so a VMM must accept writes there; it keeps the last code and a count.
import type { PortDevice } from './bus-device.js';

export const POST_CODE_PORT = 0x80;
const LAST_CODE = 0;
const WRITES = 1;

export class PostCode implements PortDevice {
  readonly name = 'post-code';
  readonly #state: Int32Array;

  constructor(shared: SharedArrayBuffer) {
    this.#state = new Int32Array(shared);
  }

  static createShared(): SharedArrayBuffer {
    return new SharedArrayBuffer(8);
  }

  get lastCode(): number {
    return Atomics.load(this.#state, LAST_CODE);
  }

  get writes(): number {
    return Atomics.load(this.#state, WRITES) >>> 0;
  }

  read(_offset: number, _size: number): number {
    return Atomics.load(this.#state, LAST_CODE);
  }

  write(_offset: number, _size: number, value: number): void {
    Atomics.store(this.#state, LAST_CODE, value & 0xff);
    Atomics.add(this.#state, WRITES, 1);
  }

  saveState(): PostCodeState {
    return { lastCode: this.lastCode, writes: this.writes };
  }

  restoreState(state: PostCodeState): void {
    Atomics.store(this.#state, LAST_CODE, state.lastCode & 0xff);
    Atomics.store(this.#state, WRITES, state.writes | 0);
  }
}

/** The POST code port's state: the last code written and how many writes. */
export interface PostCodeState {
  lastCode: number;
  writes: number;
}
