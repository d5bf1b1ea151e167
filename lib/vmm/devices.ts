// The machine's device set: the one place that knows which devices a machine has and where they
// sit, builds them on each vCPU thread over their shared state, and saves and restores their
// states for snapshots and migrations. Each device keeps its own registers and its own
// saveState()/restoreState() beside them (lib/devices/); this module only lists and wires them.
import { DebugExit, DEBUG_EXIT_PORT } from '../devices/debug-exit.js';
import { FW_CFG_DMA_PORT, FW_CFG_DMA_PORTS, FW_CFG_PORT, FW_CFG_PORTS, FwCfg, fwCfgItems, isFwCfgState, type FwCfgGuestRam, type FwCfgMachine, type FwCfgShared, type FwCfgState } from '../devices/fw-cfg.js';
import { I8042, I8042_COMMAND_PORT, I8042_DATA_PORT } from '../devices/i8042.js';
import { POST_CODE_PORT, PostCode, type PostCodeState } from '../devices/post-code.js';
import { COM1_BASE, COM1_IRQ, SERIAL_PORTS, Serial, type SerialShared, type SerialState } from '../devices/serial.js';
import { VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE, VirtioMmio, type VirtioMmioState } from '../devices/virtio-mmio.js';
import type { ByteRingShared } from '../devices/byte-ring.js';
import { createBusShared, IoBus, unknownAccesses, type BusShared, type UnknownAccesses } from './bus.js';
import type { Disks } from './disks.js';

/** The serial port's interrupt line (GSI) on the in-kernel irqchip. */
export const SERIAL_GSI = COM1_IRQ;

export interface DevicesShared {
  readonly bus: BusShared;
  readonly serial: SerialShared;
  readonly postCode: SharedArrayBuffer;
  /** Register files of the virtio-mmio devices, slot i at VIRTIO_MMIO_BASE + i * 0x1000. */
  readonly virtio: SharedArrayBuffer[];
  readonly fwCfg: FwCfgShared;
}

/** The state of every device: what a snapshot or a migration carries for them. */
export interface DeviceStates {
  serial: SerialState;
  postCode: PostCodeState;
  /** The virtio-mmio register state of each disk. */
  virtio?: VirtioMmioState[];
  /** Absent in states from before fw_cfg: the machine's own items stay. */
  fwCfg?: FwCfgState;
}

export interface DeviceEvents {
  /** Drives a GSI of the in-kernel irqchip; absent without one. */
  setIrqLine?: (gsi: number, level: boolean) => void;
  debugExit(code: number): void;
  reset(): void;
  log(message: string): void;
}

/** The shared state of a new machine's devices (the disks' register files come from its Disks). */
export function createDevicesShared(options: { serialOutput: { fd: number } | { ring: ByteRingShared }; virtio: SharedArrayBuffer[]; fwCfg: FwCfgMachine }): DevicesShared {
  return {
    bus: createBusShared(), serial: Serial.createShared(options.serialOutput), postCode: PostCode.createShared(), virtio: options.virtio,
    fwCfg: FwCfg.createShared(fwCfgItems(options.fwCfg)),
  };
}

/**
 * On a vCPU thread: every device of the machine, on a new I/O bus over the shared state. `ram`:
 * guest RAM for the devices that reach it from this thread (fw_cfg's DMA); without it they fail
 * such transfers.
 */
export function attachDevices(shared: DevicesShared, events: DeviceEvents, ram: FwCfgGuestRam | null = null): { bus: IoBus; serial: Serial } {
  const bus = new IoBus(shared.bus, events.log);
  const setIrqLine = events.setIrqLine;
  const serial = new Serial(shared.serial, setIrqLine ? (level) => setIrqLine(SERIAL_GSI, level) : () => {});
  bus.registerPorts(COM1_BASE, SERIAL_PORTS, serial);
  bus.registerPorts(DEBUG_EXIT_PORT, 1, new DebugExit(events.debugExit));
  const i8042 = new I8042(events.reset);
  bus.registerPorts(I8042_DATA_PORT, 1, i8042.dataPort);
  bus.registerPorts(I8042_COMMAND_PORT, 1, i8042.commandPort);
  bus.registerPorts(POST_CODE_PORT, 1, new PostCode(shared.postCode));
  const fwCfg = new FwCfg(shared.fwCfg, ram);
  bus.registerPorts(FW_CFG_PORT, FW_CFG_PORTS, fwCfg.port);
  bus.registerPorts(FW_CFG_DMA_PORT, FW_CFG_DMA_PORTS, fwCfg.dmaPort);
  shared.virtio.forEach((registers, slot) => {
    bus.registerMmio(VIRTIO_MMIO_BASE + slot * VIRTIO_MMIO_SIZE, VIRTIO_MMIO_SIZE, new VirtioMmio(registers, `virtio-blk${slot}`, events.log));
  });
  return { bus, serial };
}

/**
 * On the main thread: the devices as the machine owns them, for what is not an exit: serial
 * input, counters, and their states.
 */
export class MachineDevices {
  readonly shared: DevicesShared;
  readonly serial: Serial;
  readonly postCode: PostCode;
  readonly fwCfg: FwCfg;
  readonly disks: Disks;

  constructor(shared: DevicesShared, disks: Disks, setIrqLine: ((gsi: number, level: boolean) => void) | null) {
    this.shared = shared;
    this.serial = new Serial(shared.serial, setIrqLine ? (level) => setIrqLine(SERIAL_GSI, level) : () => {});
    this.postCode = new PostCode(shared.postCode);
    this.fwCfg = new FwCfg(shared.fwCfg);
    this.disks = disks;
  }

  /** The guest's accesses to ports and MMIO where no device is. */
  get unknownAccesses(): UnknownAccesses {
    return unknownAccesses(this.shared.bus);
  }

  /** Every device's state; the machine must be paused (the disks' threads parked). */
  saveState(): DeviceStates {
    return {
      serial: this.serial.saveState(), postCode: this.postCode.saveState(), ...(this.disks.count > 0 ? { virtio: this.disks.saveState() } : {}),
      fwCfg: this.fwCfg.saveState(),
    };
  }

  restoreState(states: DeviceStates): void {
    // First: the one that may refuse a state (items that do not fit), before anything changed.
    if (states.fwCfg !== undefined) this.fwCfg.restoreState(states.fwCfg);
    this.serial.restoreState(states.serial);
    this.postCode.restoreState(states.postCode);
    if (this.disks.count > 0 || states.virtio !== undefined) this.disks.restoreState(states.virtio ?? []);
  }
}

/** Whether `value` has the structure of saved device states (a stream from elsewhere is checked before use). */
export function isDeviceStates(value: unknown): value is DeviceStates {
  const isObject = (v: unknown): v is Record<string, unknown> => typeof v === 'object' && v !== null && !Array.isArray(v);
  return isObject(value) && isObject(value.serial) && isObject(value.postCode) && (value.virtio === undefined || Array.isArray(value.virtio)) &&
    (value.fwCfg === undefined || isFwCfgState(value.fwCfg));
}
