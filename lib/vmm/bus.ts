// The I/O bus: port and MMIO ranges mapped to devices. Dispatch for ports is one table lookup
// (65536 entries); MMIO ranges are few and sorted. Devices see offsets from their base, never
// absolute addresses. Unknown accesses are counted (shared counters) and logged once per address,
// up to a limit shared by every vCPU thread (a guest scanning the ports would otherwise write a
// line for each of 65536); reads of them return all-ones, as on a real bus with nothing there.
import { IoDirection } from '../kvm/constants.js';
import { KvmRunOffset, type KvmRun } from '../kvm/kvm-run.js';
import type { MmioDevice, PortDevice } from '../devices/bus-device.js';
import { argValueError, outOfRangeError } from '../kvm/errors.js';

export type { MmioDevice, PortDevice } from '../devices/bus-device.js';

/** Where an MMIO exit's data bytes are in kvm_run. */
const MMIO_DATA = KvmRunOffset['mmio.data'];

interface MmioRange {
  base: number;
  end: number;
  device: MmioDevice;
}

/**
 * Counters shared by every vCPU thread: unknown port accesses, unknown MMIO accesses, and how many
 * distinct ports and MMIO addresses have been logged.
 */
const UNKNOWN_PORT = 0;
const UNKNOWN_MMIO = 1;
const LOGGED_PORTS = 2;
const LOGGED_MMIO = 3;
const STATS_INTS = 4;
/** Then a bitmap of the unknown ports seen. */
const SEEN_PORTS_INTS = 65536 / 32;
/** Distinct unknown ports, and MMIO addresses, logged at most; the rest are counted. */
export const MAX_LOGGED_UNKNOWN_PORTS = 64;
/** Unknown MMIO addresses logged at most, over all vCPU threads (the rest are only counted). */
export const MAX_LOGGED_UNKNOWN_MMIO = 64;

/** The state every vCPU thread's IoBus shares: the unknown-access counters and which unknown ports were logged. */
export interface BusShared {
  /** Int32Array: the counters, then a bitmap of the unknown ports seen. */
  readonly stats: SharedArrayBuffer;
}

/** What a machine's guest touched where no device is, over all its vCPU threads. */
export interface UnknownAccesses {
  ports: number;
  /** Distinct unknown ports accessed. */
  distinctPorts: number;
  mmio: number;
}

/** New shared state for the IoBus of each of a machine's vCPU threads. */
export function createBusShared(): BusShared {
  return { stats: new SharedArrayBuffer((STATS_INTS + SEEN_PORTS_INTS) * 4) };
}

/** The unknown accesses counted in a bus's shared counters. */
export function unknownAccesses(shared: BusShared): UnknownAccesses {
  const stats = new Int32Array(shared.stats);
  let distinctPorts = 0;
  for (let word = STATS_INTS; word < stats.length; word++) {
    for (let bits = Atomics.load(stats, word); bits !== 0; bits &= bits - 1) distinctPorts++;
  }
  return { ports: Atomics.load(stats, UNKNOWN_PORT), distinctPorts, mmio: Atomics.load(stats, UNKNOWN_MMIO) };
}

/** A vCPU thread's port and MMIO bus: devices registered on ranges, exits dispatched to them with offsets, unknown accesses counted and logged. */
export class IoBus {
  readonly #portDevice = new Uint8Array(65536); // device index + 1; 0 = nothing
  readonly #portBase = new Uint16Array(65536);
  readonly #portDevices: PortDevice[] = [];
  readonly #mmio: MmioRange[] = [];
  readonly #stats: Int32Array;
  readonly #loggedMmio = new Set<number>();
  readonly #log: (message: string) => void;

  /** A bus over `shared` (createBusShared()), logging unknown accesses to `log`. */
  constructor(shared: BusShared, log: (message: string) => void) {
    this.#stats = new Int32Array(shared.stats);
    this.#log = log;
  }

  /** Puts `device` on ports `base` to `base + count - 1`; an overlap with a registered range throws. */
  registerPorts(base: number, count: number, device: PortDevice): void {
    if (!Number.isInteger(base) || !Number.isInteger(count) || base < 0 || count < 1 || base + count > 65536) {
      throw outOfRangeError(`ports ${base}+${count} are outside 0..0xffff`);
    }
    for (let port = base; port < base + count; port++) {
      if (this.#portDevice[port] !== 0) {
        throw argValueError(`port 0x${port.toString(16)} of ${device.name} is taken by ${this.#portDevices[this.#portDevice[port]! - 1]!.name}`);
      }
    }
    this.#portDevices.push(device);
    if (this.#portDevices.length > 255) throw outOfRangeError('too many port devices (at most 255)');
    for (let port = base; port < base + count; port++) {
      this.#portDevice[port] = this.#portDevices.length;
      this.#portBase[port] = base;
    }
  }

  /** Puts `device` on the MMIO range `base` to `base + size - 1`; an overlap with a registered range throws. */
  registerMmio(base: number, size: number, device: MmioDevice): void {
    if (!Number.isSafeInteger(base) || !Number.isSafeInteger(size) || base < 0 || size < 1) throw outOfRangeError(`the MMIO range ${base}+${size} is not a non-negative base and a positive size`);
    const end = base + size;
    for (const range of this.#mmio) {
      if (base < range.end && range.base < end) throw argValueError(`MMIO range of ${device.name} overlaps ${range.device.name}`);
    }
    this.#mmio.push({ base, end, device });
    this.#mmio.sort((a, b) => a.base - b.base);
  }

  /** Accesses to ports no device has, by every thread of the machine. */
  get unknownPortAccesses(): number {
    return Atomics.load(this.#stats, UNKNOWN_PORT);
  }
  /** Accesses to MMIO addresses no device has, by every thread of the machine. */
  get unknownMmioAccesses(): number {
    return Atomics.load(this.#stats, UNKNOWN_MMIO);
  }

  /**
   * Handles a KVM_EXIT_IO in place in the kvm_run mapping. The hot path: no allocation, one
   * table lookup per access.
   */
  handleIo(run: KvmRun): void {
    const port = run.ioPort;
    const size = run.ioSize;
    const count = run.ioCount;
    let offset = run.ioDataOffset;
    const isOut = run.ioDirection === IoDirection.Out;
    const view = run.view;
    const index = this.#portDevice[port]!;
    if (index === 0) {
      this.#unknownPort(port, isOut);
      if (!isOut) run.bytes.fill(0xff, offset, offset + size * count);
      return;
    }
    const device = this.#portDevices[index - 1]!;
    const at = port - this.#portBase[port]!;
    for (let i = 0; i < count; i++, offset += size) {
      if (isOut) {
        const value = size === 1 ? view.getUint8(offset) : size === 2 ? view.getUint16(offset, true) : view.getUint32(offset, true);
        device.write(at, size, value);
      } else {
        const value = device.read(at, size);
        if (size === 1) view.setUint8(offset, value);
        else if (size === 2) view.setUint16(offset, value, true);
        else view.setUint32(offset, value, true);
      }
    }
  }

  /** Handles a KVM_EXIT_MMIO in place. */
  handleMmio(run: KvmRun): void {
    const addr = run.mmioGuestPhysAddr;
    const len = Math.min(run.mmioLen, 8);
    const isWrite = run.mmioIsWrite;
    const data = run.bytes.subarray(MMIO_DATA, MMIO_DATA + len);
    const range = this.#findMmio(addr);
    if (range === undefined) {
      this.#unknownMmio(addr, len, isWrite);
      if (!isWrite) data.fill(0xff);
      return;
    }
    if (isWrite) range.device.write(addr - range.base, data);
    else range.device.read(addr - range.base, data);
  }

  #findMmio(addr: number): MmioRange | undefined {
    const ranges = this.#mmio;
    let lo = 0;
    let hi = ranges.length - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >> 1;
      const range = ranges[mid]!;
      if (addr < range.base) hi = mid - 1;
      else if (addr >= range.end) lo = mid + 1;
      else return range;
    }
    return undefined;
  }

  #unknownPort(port: number, isOut: boolean): void {
    Atomics.add(this.#stats, UNKNOWN_PORT, 1);
    const word = STATS_INTS + (port >> 5);
    const bit = 1 << (port & 31);
    if ((Atomics.or(this.#stats, word, bit) & bit) !== 0) return;
    const logged = Atomics.add(this.#stats, LOGGED_PORTS, 1);
    if (logged >= MAX_LOGGED_UNKNOWN_PORTS) return;
    const last = logged === MAX_LOGGED_UNKNOWN_PORTS - 1 ? '; further unknown ports are counted, not logged' : '';
    this.#log(`unknown port ${isOut ? 'write to' : 'read from'} 0x${port.toString(16)}${last}`);
  }

  #unknownMmio(addr: number, len: number, isWrite: boolean): void {
    Atomics.add(this.#stats, UNKNOWN_MMIO, 1);
    // Addresses seen are remembered per thread (a shared set of 64-bit addresses would need a
    // lock), so two vCPUs may each log one; the limit on lines is shared.
    if (this.#loggedMmio.has(addr) || this.#loggedMmio.size >= MAX_LOGGED_UNKNOWN_MMIO) return;
    this.#loggedMmio.add(addr);
    const logged = Atomics.add(this.#stats, LOGGED_MMIO, 1);
    if (logged >= MAX_LOGGED_UNKNOWN_MMIO) return;
    const last = logged === MAX_LOGGED_UNKNOWN_MMIO - 1 ? '; further unknown MMIO addresses are counted, not logged' : '';
    this.#log(`unknown MMIO ${isWrite ? 'write to' : 'read from'} 0x${addr.toString(16)} (${len} bytes)${last}`);
  }
}
