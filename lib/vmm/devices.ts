// The machine's device set: the one place that knows which devices a machine has and where they
// sit, builds them on each vCPU thread over their shared state, and saves and restores their
// states for snapshots and migrations. Each device keeps its own registers and its own
// saveState()/restoreState() beside them (lib/devices/); this module only lists and wires them.
import { CMOS_RTC_IRQ, CMOS_RTC_PORT, CMOS_RTC_PORTS, CmosRtc, CmosRtcInterrupts, isCmosRtcState, type CmosRtcState } from '../devices/cmos-rtc.js';
import { DebugExit, DEBUG_EXIT_PORT } from '../devices/debug-exit.js';
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
  readonly cmosRtc: SharedArrayBuffer;
}

/** The state of every device: what a snapshot or a migration carries for them. */
export interface DeviceStates {
  serial: SerialState;
  postCode: PostCodeState;
  /** The virtio-mmio register state of each disk. */
  virtio?: VirtioMmioState[];
  /** Absent in states from machines before the RTC: such a machine's RTC starts from the host's time. */
  cmosRtc?: CmosRtcState;
}

export interface DeviceEvents {
  /** Drives a GSI of the in-kernel irqchip; absent without one. */
  setIrqLine?: (gsi: number, level: boolean) => void;
  debugExit(code: number): void;
  reset(): void;
  log(message: string): void;
}

/** The shared state of a new machine's devices (the disks' register files come from its Disks). */
export function createDevicesShared(options: {
  serialOutput: { fd: number } | { ring: ByteRingShared };
  virtio: SharedArrayBuffer[];
  /** What the RTC's CMOS RAM tells the guest (the memory-size and CPU-count bytes). */
  rtc: { memoryBytes: number; vcpus: number };
}): DevicesShared {
  // All RAM is below 4 GiB (MAX_MEMORY_BYTES is 3 GiB: there is no PCI hole to move RAM above it).
  const cmosRtc = CmosRtc.createShared({ lowMemoryBytes: options.rtc.memoryBytes, highMemoryBytes: 0, vcpus: options.rtc.vcpus });
  return { bus: createBusShared(), serial: Serial.createShared(options.serialOutput), postCode: PostCode.createShared(), virtio: options.virtio, cmosRtc };
}

/** On a vCPU thread: every device of the machine, on a new I/O bus over the shared state. */
export function attachDevices(shared: DevicesShared, events: DeviceEvents): { bus: IoBus; serial: Serial } {
  const bus = new IoBus(shared.bus, events.log);
  const setIrqLine = events.setIrqLine;
  const serial = new Serial(shared.serial, setIrqLine ? (level) => setIrqLine(SERIAL_GSI, level) : () => {});
  bus.registerPorts(COM1_BASE, SERIAL_PORTS, serial);
  bus.registerPorts(DEBUG_EXIT_PORT, 1, new DebugExit(events.debugExit));
  const i8042 = new I8042(events.reset);
  bus.registerPorts(I8042_DATA_PORT, 1, i8042.dataPort);
  bus.registerPorts(I8042_COMMAND_PORT, 1, i8042.commandPort);
  bus.registerPorts(POST_CODE_PORT, 1, new PostCode(shared.postCode));
  bus.registerPorts(CMOS_RTC_PORT, CMOS_RTC_PORTS, new CmosRtc(shared.cmosRtc));
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
  readonly cmosRtc: CmosRtc;
  /** The RTC's periodic interrupt: runs only while the machine does (runTimers/haltTimers). */
  readonly #rtcInterrupts: CmosRtcInterrupts | null;
  readonly disks: Disks;

  constructor(shared: DevicesShared, disks: Disks, setIrqLine: ((gsi: number, level: boolean) => void) | null) {
    this.shared = shared;
    this.serial = new Serial(shared.serial, setIrqLine ? (level) => setIrqLine(SERIAL_GSI, level) : () => {});
    this.postCode = new PostCode(shared.postCode);
    this.cmosRtc = new CmosRtc(shared.cmosRtc);
    this.#rtcInterrupts = setIrqLine ? new CmosRtcInterrupts(shared.cmosRtc, () => {
      setIrqLine(CMOS_RTC_IRQ, true);
      setIrqLine(CMOS_RTC_IRQ, false);
    }) : null;
    this.disks = disks;
  }

  /** The machine runs (start, resume): the devices' timers run. */
  runTimers(): void {
    this.#rtcInterrupts?.run();
  }

  /** The machine pauses or ends: the devices' timers stop (what they would owe meanwhile is dropped). */
  haltTimers(): void {
    this.#rtcInterrupts?.halt();
  }

  /** The guest's accesses to ports and MMIO where no device is. */
  get unknownAccesses(): UnknownAccesses {
    return unknownAccesses(this.shared.bus);
  }

  /** Every device's state; the machine must be paused (the disks' threads parked). */
  saveState(): DeviceStates {
    return {
      serial: this.serial.saveState(), postCode: this.postCode.saveState(), ...(this.disks.count > 0 ? { virtio: this.disks.saveState() } : {}),
      cmosRtc: this.cmosRtc.saveState(),
    };
  }

  restoreState(states: DeviceStates): void {
    this.serial.restoreState(states.serial);
    this.postCode.restoreState(states.postCode);
    if (this.disks.count > 0 || states.virtio !== undefined) this.disks.restoreState(states.virtio ?? []);
    if (states.cmosRtc) this.cmosRtc.restoreState(states.cmosRtc);
  }
}

/** Whether `value` has the structure of saved device states (a stream from elsewhere is checked before use). */
export function isDeviceStates(value: unknown): value is DeviceStates {
  const isObject = (v: unknown): v is Record<string, unknown> => typeof v === 'object' && v !== null && !Array.isArray(v);
  return isObject(value) && isObject(value.serial) && isObject(value.postCode) && (value.virtio === undefined || Array.isArray(value.virtio))
    && (value.cmosRtc === undefined || isCmosRtcState(value.cmosRtc));
}
