// The Edge/Level Control Registers of the two 8259 PICs (ports 0x4d0, 0x4d1; one bit per IRQ, 1 =
// level-triggered), as on the PIIX: kernels read and write them on every boot. Without the in-kernel
// irqchip nothing here raises interrupts, but a guest reads back what it wrote. With it, KVM's
// PIC answers these ports itself (its elcr is part of the irqchip state) and this device sees none.
import type { PortDevice } from './bus-device.js';

export const ELCR_BASE = 0x4d0;
export const ELCR_PORTS = 2;
/**
 * Bits that can be set: IRQ 0, 1, 2 (timer, keyboard, cascade) on the first PIC and IRQ 8, 13
 * (RTC, FPU) on the second are edge-triggered on a PC, as QEMU's and KVM's PIC masks say.
 */
const ELCR_MASK = [0xf8, 0xde] as const;

export class Elcr implements PortDevice {
  readonly name = 'elcr';
  readonly #registers: Uint8Array;

  constructor(shared: SharedArrayBuffer) {
    this.#registers = new Uint8Array(shared);
  }

  static createShared(): SharedArrayBuffer {
    return new SharedArrayBuffer(ELCR_PORTS);
  }

  read(offset: number, size: number): number {
    let value = 0;
    for (let i = 0; i < size; i++) value |= (offset + i < ELCR_PORTS ? Atomics.load(this.#registers, offset + i) : 0xff) << (8 * i);
    return value >>> 0;
  }

  write(offset: number, size: number, value: number): void {
    for (let i = 0; i < size && offset + i < ELCR_PORTS; i++) {
      Atomics.store(this.#registers, offset + i, (value >>> (8 * i)) & ELCR_MASK[offset + i]!);
    }
  }

  saveState(): ElcrState {
    return { registers: [Atomics.load(this.#registers, 0), Atomics.load(this.#registers, 1)] };
  }

  restoreState(state: ElcrState): void {
    for (let i = 0; i < ELCR_PORTS; i++) Atomics.store(this.#registers, i, (state.registers[i] ?? 0) & ELCR_MASK[i]!);
  }
}

/** The ELCR pair's state (edge/level per IRQ), for snapshots and migrations. */
export interface ElcrState {
  /** ELCR1 (port 0x4d0) and ELCR2 (0x4d1). */
  registers: number[];
}

/** Whether `value` has the structure of an ElcrState (a state from a stream is checked before use). */
export function isElcrState(value: unknown): value is ElcrState {
  const registers = (value as Partial<ElcrState> | null)?.registers;
  return typeof value === 'object' && Array.isArray(registers) && registers.every((v) => Number.isSafeInteger(v));
}
