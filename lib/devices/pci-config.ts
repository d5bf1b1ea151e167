// PCI configuration mechanism #1 (PCI Local Bus 3.0 section 3.2.2.3.2) with no PCI bus behind it:
// the CONFIG_ADDRESS register at 0xcf8 keeps what a 32-bit write put there, as kernels check when
// they probe for the mechanism, and CONFIG_DATA at 0xcfc-0xcff reads all ones ("no device" at
// every address) and ignores writes. Byte and word accesses to 0xcf8-0xcfb do not reach
// CONFIG_ADDRESS (on a PIIX, 0xcf9 is the reset control register), as in QEMU's PCI host.
import type { PortDevice } from './bus-device.js';

export const PCI_CONFIG_ADDRESS_PORT = 0xcf8;
export const PCI_CONFIG_DATA_PORT = 0xcfc;
export const PCI_CONFIG_PORTS = 4;

export class PciConfig {
  /** Ports 0xcf8-0xcfb. */
  readonly addressPort: PortDevice;
  /** Ports 0xcfc-0xcff. */
  readonly dataPort: PortDevice;
  readonly #address: Int32Array;

  constructor(shared: SharedArrayBuffer) {
    const address = new Int32Array(shared);
    this.#address = address;
    this.addressPort = {
      name: 'pci-config',
      read: (offset, size) => {
        const value = Atomics.load(address, 0) >>> (8 * offset);
        return size === 4 ? value >>> 0 : value & (size === 2 ? 0xffff : 0xff);
      },
      write: (offset, size, value) => {
        if (offset === 0 && size === 4) Atomics.store(address, 0, value | 0);
      },
    };
    this.dataPort = {
      name: 'pci-config',
      read: (_offset, size) => (size === 4 ? 0xffffffff : size === 2 ? 0xffff : 0xff),
      write: () => {},
    };
  }

  static createShared(): SharedArrayBuffer {
    return new SharedArrayBuffer(4);
  }

  saveState(): PciConfigState {
    return { address: Atomics.load(this.#address, 0) >>> 0 };
  }

  restoreState(state: PciConfigState): void {
    Atomics.store(this.#address, 0, state.address | 0);
  }
}

/** PCI configuration mechanism #1's state, for snapshots and migrations. */
export interface PciConfigState {
  /** CONFIG_ADDRESS (port 0xcf8). */
  address: number;
}

/** Whether `value` has the structure of a PciConfigState (a state from a stream is checked before use). */
export function isPciConfigState(value: unknown): value is PciConfigState {
  return typeof value === 'object' && value !== null && Number.isSafeInteger((value as Partial<PciConfigState>).address);
}
