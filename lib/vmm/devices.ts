// The machine's device set, built the same way in every vCPU thread over shared state.
import { DebugExit, DEBUG_EXIT_PORT } from '../devices/debug-exit.js';
import { I8042, I8042_COMMAND_PORT, I8042_DATA_PORT } from '../devices/i8042.js';
import { POST_CODE_PORT, PostCode } from '../devices/post-code.js';
import { COM1_BASE, SERIAL_PORTS, Serial, type SerialShared } from '../devices/serial.js';
import { VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE, VirtioMmio } from '../devices/virtio-mmio.js';
import { IoBus, type BusShared } from './bus.js';

export interface DevicesShared {
  readonly bus: BusShared;
  readonly serial: SerialShared;
  readonly postCode: SharedArrayBuffer;
  /** Register files of the virtio-mmio devices, slot i at VIRTIO_MMIO_BASE + i * 0x1000. */
  readonly virtio: SharedArrayBuffer[];
}

export interface DeviceEvents {
  /** Drives a GSI of the in-kernel irqchip; absent without one. */
  setIrqLine?: (gsi: number, level: boolean) => void;
  debugExit(code: number): void;
  reset(): void;
  log(message: string): void;
}

export const SERIAL_GSI = 4;

export function createDevices(shared: DevicesShared, events: DeviceEvents): { bus: IoBus; serial: Serial } {
  const bus = new IoBus(shared.bus, events.log);
  const setIrqLine = events.setIrqLine;
  const serial = new Serial(shared.serial, setIrqLine ? (level) => setIrqLine(SERIAL_GSI, level) : () => {});
  bus.registerPorts(COM1_BASE, SERIAL_PORTS, serial);
  bus.registerPorts(DEBUG_EXIT_PORT, 1, new DebugExit(events.debugExit));
  const i8042 = new I8042(events.reset);
  bus.registerPorts(I8042_DATA_PORT, 1, i8042.dataPort);
  bus.registerPorts(I8042_COMMAND_PORT, 1, i8042.commandPort);
  bus.registerPorts(POST_CODE_PORT, 1, new PostCode(shared.postCode));
  shared.virtio.forEach((registers, slot) => {
    bus.registerMmio(VIRTIO_MMIO_BASE + slot * VIRTIO_MMIO_SIZE, VIRTIO_MMIO_SIZE, new VirtioMmio(registers, `virtio-blk${slot}`, events.log));
  });
  return { bus, serial };
}
