// A 16550A UART (COM1: ports 0x3f8-0x3ff, IRQ 4). Its registers live in shared memory so that any
// vCPU thread can run the device, and the main thread can feed it input. Transmitted bytes go
// straight to an fd from the thread that wrote them, or into a ring the main thread drains.
// Register behaviour follows the 16550A data sheet as Linux's 8250 driver probes it: THRE
// interrupt on enabling ETBEI with an empty THR, IIR priorities, loopback through MCR bit 4.
import { writeSync } from 'node:fs';
import type { PortDevice } from './bus-device.js';
import { ByteRing, type ByteRingShared } from './byte-ring.js';

export const COM1_BASE = 0x3f8;
export const COM1_IRQ = 4;
export const SERIAL_PORTS = 8;

// Register offsets.
const RBR_THR_DLL = 0;
const IER_DLM = 1;
const IIR_FCR = 2;
const LCR = 3;
const MCR = 4;
const LSR = 5;
const MSR = 6;
const SCR = 7;
/** Something to Atomics.wait on for a short sleep. */
const SLEEP = new Int32Array(new SharedArrayBuffer(4));

const IER_RDI = 0x01; // received data available
const IER_THRI = 0x02; // transmitter holding register empty
const IIR_NO_INT = 0x01;
const IIR_THRI = 0x02;
const IIR_RDI = 0x04;
const IIR_FIFO_ENABLED = 0xc0;
const FCR_ENABLE = 0x01;
const FCR_CLEAR_RX = 0x02;
const LCR_DLAB = 0x80;
const MCR_LOOP = 0x10;
const LSR_DR = 0x01;
const LSR_THRE = 0x20;
const LSR_TEMT = 0x40;

// Shared state, one Int32 each.
const S_LOCK = 0;
const S_IER = 1;
const S_LCR = 2;
const S_MCR = 3;
const S_SCR = 4;
const S_DLL = 5;
const S_DLM = 6;
const S_FCR = 7;
const S_THRE_PENDING = 8;
const S_IRQ_LEVEL = 9;
const S_TX_BYTES = 10;
const STATE_INTS = 11;

export interface SerialShared {
  readonly state: SharedArrayBuffer;
  readonly input: ByteRingShared;
  /** Where transmitted bytes go: an fd, or a ring that the main thread drains. */
  readonly output: { fd: number } | { ring: ByteRingShared };
}

/** The 16550A UART's registers and pending input, for snapshots and migrations. */
export interface SerialState {
  ier: number; lcr: number; mcr: number; scr: number; dll: number; dlm: number; fcr: number; threPending: number;
  input: number[];
}

export class Serial implements PortDevice {
  readonly name = 'serial';
  readonly #state: Int32Array;
  readonly #input: ByteRing;
  readonly #outputFd: number;
  readonly #outputRing: ByteRing | null;
  readonly #setIrq: (level: boolean) => void;
  readonly #byte = Buffer.alloc(1);

  /** `setIrq` drives the UART's interrupt line (vm.setIrqLine on the in-kernel irqchip). */
  constructor(shared: SerialShared, setIrq: (level: boolean) => void) {
    this.#state = new Int32Array(shared.state);
    this.#input = new ByteRing(shared.input);
    if ('fd' in shared.output) {
      this.#outputFd = shared.output.fd;
      this.#outputRing = null;
    } else {
      this.#outputFd = -1;
      this.#outputRing = new ByteRing(shared.output.ring);
    }
    this.#setIrq = setIrq;
  }

  static createShared(output: { fd: number } | { ring: ByteRingShared }): SerialShared {
    const state = new SharedArrayBuffer(STATE_INTS * 4);
    const ints = new Int32Array(state);
    ints[S_DLL] = 12; // 9600 baud, as the BIOS leaves it
    ints[S_LCR] = 0x03; // 8N1
    ints[S_MCR] = 0x08; // OUT2
    return { state, input: ByteRing.create(4096).shared, output };
  }

  /** Bytes the guest has transmitted since creation. */
  get transmittedBytes(): number {
    return Atomics.load(this.#state, S_TX_BYTES);
  }

  #lock(): void {
    while (Atomics.compareExchange(this.#state, S_LOCK, 0, 1) !== 0) Atomics.wait(this.#state, S_LOCK, 1, 1);
  }
  #unlock(): void {
    Atomics.store(this.#state, S_LOCK, 0);
    Atomics.notify(this.#state, S_LOCK, 1);
  }

  read(offset: number, _size: number): number {
    this.#lock();
    try {
      const s = this.#state;
      const dlab = (s[S_LCR]! & LCR_DLAB) !== 0;
      switch (offset) {
        case RBR_THR_DLL: {
          if (dlab) return s[S_DLL]!;
          const byte = this.#input.shift();
          this.#updateIrq();
          return byte < 0 ? 0 : byte;
        }
        case IER_DLM:
          return dlab ? s[S_DLM]! : s[S_IER]!;
        case IIR_FCR: {
          const fifo = s[S_FCR]! & FCR_ENABLE ? IIR_FIFO_ENABLED : 0;
          const ier = s[S_IER]!;
          if (ier & IER_RDI && this.#input.length > 0) return IIR_RDI | fifo;
          if (ier & IER_THRI && s[S_THRE_PENDING]) {
            // Reading IIR with THRI as the source clears it (16550A: "THRE interrupt reset").
            s[S_THRE_PENDING] = 0;
            this.#updateIrq();
            return IIR_THRI | fifo;
          }
          return IIR_NO_INT | fifo;
        }
        case LCR:
          return s[S_LCR]!;
        case MCR:
          return s[S_MCR]!;
        case LSR:
          // We transmit at once, so the transmitter is always empty.
          return LSR_THRE | LSR_TEMT | (this.#input.length > 0 ? LSR_DR : 0);
        case MSR: {
          const mcr = s[S_MCR]!;
          if (mcr & MCR_LOOP) {
            // Loopback: DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD.
            return ((mcr & 0x01) << 5) | ((mcr & 0x02) << 3) | ((mcr & 0x04) << 4) | ((mcr & 0x08) << 4);
          }
          return 0xb0; // DCD, DSR, CTS: a terminal is attached
        }
        case SCR:
          return s[S_SCR]!;
        default:
          return 0xff;
      }
    } finally {
      this.#unlock();
    }
  }

  write(offset: number, _size: number, value: number): void {
    const byte = value & 0xff;
    this.#lock();
    try {
      const s = this.#state;
      const dlab = (s[S_LCR]! & LCR_DLAB) !== 0;
      switch (offset) {
        case RBR_THR_DLL:
          if (dlab) {
            s[S_DLL] = byte;
          } else {
            if (s[S_MCR]! & MCR_LOOP) this.#input.push(byte);
            else this.#transmit(byte);
            s[S_TX_BYTES] = (s[S_TX_BYTES]! + 1) | 0;
            s[S_THRE_PENDING] = 1;
          }
          break;
        case IER_DLM:
          if (dlab) {
            s[S_DLM] = byte;
          } else {
            const enablingThri = (byte & IER_THRI) !== 0 && (s[S_IER]! & IER_THRI) === 0;
            s[S_IER] = byte & 0x0f;
            if (enablingThri) s[S_THRE_PENDING] = 1;
          }
          break;
        case IIR_FCR:
          if (byte & FCR_CLEAR_RX) this.#input.drain();
          s[S_FCR] = byte & FCR_ENABLE;
          break;
        case LCR:
          s[S_LCR] = byte;
          break;
        case MCR:
          s[S_MCR] = byte & 0x1f;
          break;
        case SCR:
          s[S_SCR] = byte;
          break;
        default:
          break; // LSR and MSR are read-only
      }
      this.#updateIrq();
    } finally {
      this.#unlock();
    }
  }

  /** Queues bytes from the host (keyboard) for the guest; returns how many fitted. */
  receive(bytes: Uint8Array): number {
    this.#lock();
    try {
      let accepted = 0;
      while (accepted < bytes.length && this.#input.push(bytes[accepted]!)) accepted++;
      this.#updateIrq();
      return accepted;
    } finally {
      this.#unlock();
    }
  }

  #transmit(byte: number): void {
    if (this.#outputRing) {
      this.#outputRing.pushBlocking(byte);
      return;
    }
    this.#byte[0] = byte;
    // An fd another process set non-blocking (a shared terminal, a pipe read slowly) may say
    // EAGAIN: wait a little for room rather than drop the byte.
    for (let attempt = 0; attempt < 200; attempt++) {
      try {
        writeSync(this.#outputFd, this.#byte, 0, 1);
        return;
      } catch (error) {
        if ((error as NodeJS.ErrnoException).code !== 'EAGAIN') return;
        Atomics.wait(SLEEP, 0, 0, 1);
      }
    }
    // A closed terminal or pipe (or one that stays full) must not stop the guest: the byte is lost, as on hardware.
  }

  #updateIrq(): void {
    const s = this.#state;
    const ier = s[S_IER]!;
    const level = ((ier & IER_RDI) !== 0 && this.#input.length > 0) || ((ier & IER_THRI) !== 0 && s[S_THRE_PENDING] !== 0) ? 1 : 0;
    if (level !== s[S_IRQ_LEVEL]) {
      s[S_IRQ_LEVEL] = level;
      this.#setIrq(level === 1);
    }
  }

  saveState(): SerialState {
    this.#lock();
    try {
      const s = this.#state;
      const input: number[] = [];
      for (let byte = this.#input.shift(); byte >= 0; byte = this.#input.shift()) input.push(byte);
      for (const byte of input) this.#input.push(byte);
      return {
        ier: s[S_IER]!, lcr: s[S_LCR]!, mcr: s[S_MCR]!, scr: s[S_SCR]!, dll: s[S_DLL]!, dlm: s[S_DLM]!, fcr: s[S_FCR]!,
        threPending: s[S_THRE_PENDING]!, input,
      };
    } finally {
      this.#unlock();
    }
  }

  restoreState(state: SerialState): void {
    this.#lock();
    try {
      const s = this.#state;
      s[S_IER] = state.ier; s[S_LCR] = state.lcr; s[S_MCR] = state.mcr; s[S_SCR] = state.scr;
      s[S_DLL] = state.dll; s[S_DLM] = state.dlm; s[S_FCR] = state.fcr; s[S_THRE_PENDING] = state.threPending;
      this.#input.drain();
      for (const byte of state.input) this.#input.push(byte);
      this.#updateIrq();
    } finally {
      this.#unlock();
    }
  }
}
