// The machine's device set: the one place that knows which devices a machine has and where they
// sit, builds them on each vCPU thread over their shared state, and saves and restores their
// states for snapshots and migrations. Each device keeps its own registers and its own
// saveState()/restoreState() beside them (lib/devices/); this module only lists and wires them.
import { ACPI_PM_BASE, ACPI_PM_PORTS, AcpiPm, isAcpiPmState, type AcpiPmState } from '../devices/acpi-pm.js';
import { CMOS_RTC_IRQ, CMOS_RTC_PORT, CMOS_RTC_PORTS, CmosRtc, CmosRtcInterrupts, isCmosRtcState, type CmosRtcState } from '../devices/cmos-rtc.js';
import { DebugExit, DEBUG_EXIT_PORT } from '../devices/debug-exit.js';
import { ELCR_BASE, ELCR_PORTS, Elcr, isElcrState, type ElcrState } from '../devices/elcr.js';
import { FW_CFG_DMA_PORT, FW_CFG_DMA_PORTS, FW_CFG_PORT, FW_CFG_PORTS, FwCfg, fwCfgItems, isFwCfgState, type FwCfgGuestRam, type FwCfgMachine, type FwCfgShared, type FwCfgState } from '../devices/fw-cfg.js';
import { I8042, I8042_COMMAND_PORT, I8042_DATA_PORT } from '../devices/i8042.js';
import { PCI_CONFIG_ADDRESS_PORT, PCI_CONFIG_DATA_PORT, PCI_CONFIG_PORTS, PciConfig, isPciConfigState, type PciConfigState } from '../devices/pci-config.js';
import { POST_CODE_PORT, PostCode, type PostCodeState } from '../devices/post-code.js';
import { COM1_BASE, COM1_IRQ, SERIAL_PORTS, Serial, type SerialShared, type SerialState } from '../devices/serial.js';
import { VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE, VirtioMmio, type VirtioMmioState } from '../devices/virtio-mmio.js';
import type { ByteRingShared } from '../devices/byte-ring.js';
import { createBusShared, IoBus, unknownAccesses, type BusShared, type UnknownAccesses } from './bus.js';
import type { VirtioDevices } from './virtio-devices.js';

/** The serial port's interrupt line (GSI) on the in-kernel irqchip. */
export const SERIAL_GSI = COM1_IRQ;

export interface DevicesShared {
  readonly bus: BusShared;
  readonly serial: SerialShared;
  readonly postCode: SharedArrayBuffer;
  readonly acpiPm: SharedArrayBuffer;
  readonly elcr: SharedArrayBuffer;
  readonly pciConfig: SharedArrayBuffer;
  /** Register files (and names) of the virtio-mmio devices, slot i at VIRTIO_MMIO_BASE + i * 0x1000. */
  readonly virtio: { name: string; registers: SharedArrayBuffer }[];
  readonly fwCfg: FwCfgShared;
  readonly cmosRtc: SharedArrayBuffer;
}

/** The state of every device: what a snapshot or a migration carries for them. */
export interface DeviceStates {
  serial: SerialState;
  postCode: PostCodeState;
  /** Absent in a state from a machine without them (they start as at power-on). */
  acpiPm?: AcpiPmState;
  elcr?: ElcrState;
  pciConfig?: PciConfigState;
  /** The virtio-mmio register state of each virtio device, in slot order. */
  virtio?: VirtioMmioState[];
  /** Absent in states from before fw_cfg: the machine's own items stay. */
  fwCfg?: FwCfgState;
  /** Absent in states from machines before the RTC: such a machine's RTC starts from the host's time. */
  cmosRtc?: CmosRtcState;
}

export interface DeviceEvents {
  /** Drives a GSI of the in-kernel irqchip; absent without one. */
  setIrqLine?: (gsi: number, level: boolean) => void;
  debugExit(code: number): void;
  reset(): void;
  /** The guest powered the machine off (ACPI S5 through PM1a control). */
  powerOff(): void;
  log(message: string): void;
}

/** The shared state of a new machine's devices (the virtio register files come from its VirtioDevices). */
export function createDevicesShared(options: {
  serialOutput: { fd: number } | { ring: ByteRingShared };
  virtio: { name: string; registers: SharedArrayBuffer }[];
  fwCfg: FwCfgMachine;
  /** What the RTC's CMOS RAM tells the guest (the memory-size and CPU-count bytes). */
  rtc: { memoryBytes: number; vcpus: number };
}): DevicesShared {
  // All RAM is below 4 GiB (MAX_MEMORY_BYTES is 3 GiB: there is no PCI hole to move RAM above it).
  const cmosRtc = CmosRtc.createShared({ lowMemoryBytes: options.rtc.memoryBytes, highMemoryBytes: 0, vcpus: options.rtc.vcpus });
  return {
    bus: createBusShared(), serial: Serial.createShared(options.serialOutput), postCode: PostCode.createShared(),
    acpiPm: AcpiPm.createShared(), elcr: Elcr.createShared(), pciConfig: PciConfig.createShared(), virtio: options.virtio,
    fwCfg: FwCfg.createShared(fwCfgItems(options.fwCfg)), cmosRtc,
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
  bus.registerPorts(ACPI_PM_BASE, ACPI_PM_PORTS, new AcpiPm(shared.acpiPm, { powerOff: events.powerOff, log: events.log }));
  bus.registerPorts(ELCR_BASE, ELCR_PORTS, new Elcr(shared.elcr));
  const pciConfig = new PciConfig(shared.pciConfig);
  bus.registerPorts(PCI_CONFIG_ADDRESS_PORT, PCI_CONFIG_PORTS, pciConfig.addressPort);
  bus.registerPorts(PCI_CONFIG_DATA_PORT, PCI_CONFIG_PORTS, pciConfig.dataPort);
  const fwCfg = new FwCfg(shared.fwCfg, ram);
  bus.registerPorts(FW_CFG_PORT, FW_CFG_PORTS, fwCfg.port);
  bus.registerPorts(FW_CFG_DMA_PORT, FW_CFG_DMA_PORTS, fwCfg.dmaPort);
  bus.registerPorts(CMOS_RTC_PORT, CMOS_RTC_PORTS, new CmosRtc(shared.cmosRtc));
  shared.virtio.forEach(({ name, registers }, slot) => {
    bus.registerMmio(VIRTIO_MMIO_BASE + slot * VIRTIO_MMIO_SIZE, VIRTIO_MMIO_SIZE, new VirtioMmio(registers, name, events.log));
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
  readonly acpiPm: AcpiPm;
  readonly elcr: Elcr;
  readonly pciConfig: PciConfig;
  readonly fwCfg: FwCfg;
  readonly cmosRtc: CmosRtc;
  /** The RTC's periodic interrupt: runs only while the machine does (runTimers/haltTimers). */
  readonly #rtcInterrupts: CmosRtcInterrupts | null;
  readonly virtio: VirtioDevices;

  constructor(shared: DevicesShared, virtio: VirtioDevices, setIrqLine: ((gsi: number, level: boolean) => void) | null) {
    this.shared = shared;
    this.serial = new Serial(shared.serial, setIrqLine ? (level) => setIrqLine(SERIAL_GSI, level) : () => {});
    this.postCode = new PostCode(shared.postCode);
    // The main thread never writes PM1a control: nothing to power off or log from here.
    this.acpiPm = new AcpiPm(shared.acpiPm, { powerOff: () => {}, log: () => {} });
    this.elcr = new Elcr(shared.elcr);
    this.pciConfig = new PciConfig(shared.pciConfig);
    this.fwCfg = new FwCfg(shared.fwCfg);
    this.cmosRtc = new CmosRtc(shared.cmosRtc);
    this.#rtcInterrupts = setIrqLine ? new CmosRtcInterrupts(shared.cmosRtc, () => {
      setIrqLine(CMOS_RTC_IRQ, true);
      setIrqLine(CMOS_RTC_IRQ, false);
    }) : null;
    this.virtio = virtio;
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
      ...this.saveStateAhead(),
      ...(this.virtio.count > 0 ? { virtio: this.virtio.saveState() } : {}),
    };
  }

  /**
   * The state of every device but the virtio ones, read while the guest may run (each device reads
   * its registers atomically or under its lock): what a migration sends ahead of its pause, the
   * devices whose state has changed by the pause then going again (see DeviceStatesAhead).
   */
  saveStateAhead(): DeviceStatesAhead & Pick<DeviceStates, 'serial' | 'postCode'> {
    return {
      serial: this.serial.saveState(), postCode: this.postCode.saveState(),
      acpiPm: this.acpiPm.saveState(), elcr: this.elcr.saveState(), pciConfig: this.pciConfig.saveState(),
      fwCfg: this.fwCfg.saveState(), cmosRtc: this.cmosRtc.saveState(),
    };
  }

  /**
   * Puts `states` back. `skip`: devices left as they are, their state put back before
   * (restorePart(), a migration's devices sent ahead whose state has not changed since).
   */
  restoreState(states: DeviceStates, skip?: ReadonlySet<string>): void {
    this.#restore(skip ? Object.fromEntries(Object.entries(states).filter(([key]) => !skip.has(key))) : states);
    if (states.virtio === undefined && this.virtio.count > 0) this.virtio.restoreState([]);
  }

  /** Puts back the states of the devices `part` holds, the others untouched. */
  restorePart(part: DeviceStatesAhead): void {
    this.#restore(part);
  }

  #restore(states: Partial<DeviceStates>): void {
    // First: the one that may refuse a state (items that do not fit), before anything changed.
    if (states.fwCfg !== undefined) this.fwCfg.restoreState(states.fwCfg);
    if (states.serial !== undefined) this.serial.restoreState(states.serial);
    if (states.postCode !== undefined) this.postCode.restoreState(states.postCode);
    if (states.acpiPm) this.acpiPm.restoreState(states.acpiPm);
    if (states.elcr) this.elcr.restoreState(states.elcr);
    if (states.pciConfig) this.pciConfig.restoreState(states.pciConfig);
    if (states.virtio !== undefined) this.virtio.restoreState(states.virtio);
    if (states.cmosRtc) this.cmosRtc.restoreState(states.cmosRtc);
  }
}

/** The states a migration may send ahead of its pause: any of the devices' but the virtio ones. */
export type DeviceStatesAhead = Partial<Omit<DeviceStates, 'virtio'>>;

const isObject = (v: unknown): v is Record<string, unknown> => typeof v === 'object' && v !== null && !Array.isArray(v);

/** Each device's state check, by its key in DeviceStates. */
const DEVICE_STATE_CHECKS: Record<keyof DeviceStates, (value: unknown) => boolean> = {
  serial: isObject,
  postCode: isObject,
  acpiPm: isAcpiPmState,
  elcr: isElcrState,
  pciConfig: isPciConfigState,
  virtio: Array.isArray,
  fwCfg: isFwCfgState,
  cmosRtc: isCmosRtcState,
};

/** Whether `value` has the structure of states sent ahead (DeviceStatesAhead): known devices, no virtio ones. */
export function isDeviceStatesAhead(value: unknown): value is DeviceStatesAhead {
  return isSomeDeviceStates(value) && value.virtio === undefined;
}

/**
 * Whether `value` has the structure of the states of some devices (a record of some of
 * DeviceStates' keys): what a migration sends at the end after DeviceStatesAhead, the devices
 * that changed since.
 */
export function isSomeDeviceStates(value: unknown): value is Partial<DeviceStates> {
  return isObject(value) && Object.entries(value).every(([key, state]) =>
    Object.hasOwn(DEVICE_STATE_CHECKS, key) && DEVICE_STATE_CHECKS[key as keyof DeviceStates](state));
}

/** Whether `value` has the structure of saved device states (a stream from elsewhere is checked before use). */
export function isDeviceStates(value: unknown): value is DeviceStates {
  return isObject(value) && isObject(value.serial) && isObject(value.postCode)
    && Object.entries(DEVICE_STATE_CHECKS).every(([key, check]) => value[key] === undefined || check(value[key]));
}
