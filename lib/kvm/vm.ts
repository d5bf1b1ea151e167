// A VM (KVM_CREATE_VM's fd): memory slots, vCPUs, the in-kernel interrupt controllers, irqfd and
// ioeventfd, the clock, and dirty logging. Methods are named after their ioctls.
import { Cap, IoeventfdFlag, IrqfdFlag, IrqRoutingType, MemoryFlag, PAGE_SIZE, PIT_SPEAKER_DUMMY } from './constants.js';
import { KvmError, argTypeError, argValueError, outOfRangeError } from './errors.js';
import { EventFd } from './eventfd.js';
import { Handle, checkAddress, checkInteger, closedError } from './handle.js';
import { encodeList } from './lists.js';
import type { GuestMemory } from './memory.js';
import { native, op } from './native.js';
import {
  kvmClockData, kvmCoalescedMmioZone, kvmIoeventfd, kvmIrqchip, kvmIrqfd, kvmIrqLevel, kvmIrqRoutingEntry, kvmMsi, kvmPitConfig, kvmPitState2,
  type ClockData, type IrqchipState, type Msi, type PitState2,
} from './structs.js';
import { Vcpu, encodeEnableCap } from './vcpu.js';

const OPS = {
  checkExtension: op('KVM_CHECK_EXTENSION(vm)'),
  createIrqChip: op('KVM_CREATE_IRQCHIP'),
  createPit2: op('KVM_CREATE_PIT2'),
  getPit2: op('KVM_GET_PIT2'),
  setPit2: op('KVM_SET_PIT2'),
  getIrqChip: op('KVM_GET_IRQCHIP'),
  setIrqChip: op('KVM_SET_IRQCHIP'),
  irqLine: op('KVM_IRQ_LINE'),
  signalMsi: op('KVM_SIGNAL_MSI'),
  setGsiRouting: op('KVM_SET_GSI_ROUTING'),
  irqfd: op('KVM_IRQFD'),
  ioeventfd: op('KVM_IOEVENTFD'),
  setTssAddr: op('KVM_SET_TSS_ADDR'),
  setIdentityMapAddr: op('KVM_SET_IDENTITY_MAP_ADDR'),
  getClock: op('KVM_GET_CLOCK'),
  setClock: op('KVM_SET_CLOCK'),
  enableCap: op('KVM_ENABLE_CAP'),
  resetDirtyRings: op('KVM_RESET_DIRTY_RINGS'),
  setBootCpuId: op('KVM_SET_BOOT_CPU_ID'),
  registerCoalescedMmio: op('KVM_REGISTER_COALESCED_MMIO'),
  unregisterCoalescedMmio: op('KVM_UNREGISTER_COALESCED_MMIO'),
};

/** A memory slot for vm.setUserMemoryRegion() (KVM_SET_USER_MEMORY_REGION): guest memory (all of it, or `size` bytes from `offset`) at `guestPhysAddr`, with its flags. */
export interface MemoryRegion {
  slot: number;
  guestPhysAddr: number | bigint;
  memory: GuestMemory;
  /** Byte offset into `memory` (page-aligned). Default 0. */
  offset?: number;
  /** Bytes to map (page multiple). Default: the rest of `memory` after `offset`. */
  size?: number;
  flags?: { logDirtyPages?: boolean; readonly?: boolean };
}

/** One entry of the GSI routing table (KVM_SET_GSI_ROUTING): a GSI routed to an irqchip pin, or to an MSI. */
export type GsiRoute =
  | { gsi: number; type: 'irqchip'; irqchip: number; pin: number }
  | { gsi: number; type: 'msi'; addressLo: number; addressHi?: number; data: number; devid?: number; flags?: number };

/** Which guest write signals an ioeventfd (KVM_IOEVENTFD): the address, width, port or MMIO, and optionally the value. */
export interface IoeventfdOptions {
  addr: number | bigint;
  /** 0 (any width), 1, 2, 4 or 8 bytes. */
  len: number;
  /** Signal only when the written value equals this. */
  datamatch?: number | bigint;
  /** A port (true) rather than an MMIO address. */
  pio?: boolean;
}

/** An fd given to an irqfd or ioeventfd: an EventFd, or an fd number. */
export type Fd = EventFd | number;
function fdOf(fd: Fd, name: string): number {
  if (!(fd instanceof EventFd)) return checkInteger(fd, name, 0, 0x7fffffff);
  // A closed EventFd's number may already name another file.
  if (fd.closed) throw new KvmError('EBADF', -9, '', `${name} is a closed EventFd`);
  return fd.fd;
}

/** A VM fd (kvm.createVm()): memory slots, vCPUs, the in-kernel irqchip and PIT, irqfds and ioeventfds, the clock and dirty logging, one method per ioctl. */
export class Vm extends Handle {
  readonly fd: number;
  readonly #handle: number;
  readonly #owning: boolean;

  /** @internal Use kvm.createVm() or Vm.fromFd(). */
  constructor(handle: number, fd: number, owning: boolean) {
    super('Vm', owning ? () => native.closeVm(handle) : null);
    this.#handle = handle;
    this.fd = fd;
    this.#owning = owning;
  }

  /**
   * A non-owning view of a VM that this process created, by its fd: for worker threads, which
   * receive the number by postMessage. Closing the view leaves the VM open.
   */
  static fromFd(fd: number): Vm {
    checkInteger(fd, 'fd', 0, 0x7fffffff);
    return new Vm(native.vmFromFd(fd), fd, false);
  }

  /** True for the handle that owns the VM, false for fromFd() views. */
  get owning(): boolean {
    return this.#owning;
  }

  /**
   * close(), with the fd closed on a thread of libuv's pool: the last close of a VM runs the
   * kernel's teardown of it, which waits 15-20 ms here with the CPU idle, and would hold up the
   * event loop that long. The handle is closed at once; the promise resolves once the fd is (the
   * VM is gone then unless a vCPU fd still holds it). Calling it again, or after close(), does
   * nothing.
   */
  async closeAsync(): Promise<void> {
    if (this.closed) return;
    if (!this.#owning) return this.close();
    this.forget();
    await native.closeVmAsync(this.#handle);
  }

  #ioctl(opNumber: number, arg?: Uint8Array | number | bigint): number {
    if (this.closed) throw closedError('Vm');
    return native.ioctl(this.#handle, opNumber, arg);
  }

  get #h(): number {
    if (this.closed) throw closedError('Vm');
    return this.#handle;
  }

  /** KVM_CHECK_EXTENSION on the VM: 0 if `cap` is not offered, else a positive value (often a limit). */
  checkExtension(cap: number): number {
    return this.#ioctl(OPS.checkExtension, checkInteger(cap, 'cap', 0, 0xffffffff));
  }

  /** KVM_ENABLE_CAP on the VM. Enabling Cap.DirtyLogRing(AcqRel) must precede createVcpu(). */
  enableCap(cap: number, args: readonly (number | bigint)[] = [], flags = 0): void {
    this.#ioctl(OPS.enableCap, encodeEnableCap(cap, args, flags));
  }

  /** Maps (part of) `memory` into the guest's physical address space. */
  setUserMemoryRegion(region: MemoryRegion): void {
    if (typeof region !== 'object' || region === null) throw argTypeError('region must be an object');
    const slot = checkInteger(region.slot, 'slot', 0, 0xffffffff);
    const memory = region.memory;
    if (memory === null || typeof memory !== 'object' || typeof (memory as GuestMemory).nativeId !== 'number') {
      throw argTypeError('memory must be a GuestMemory');
    }
    const offset = checkInteger(region.offset ?? 0, 'offset', 0, Number.MAX_SAFE_INTEGER);
    if (offset >= memory.size) throw outOfRangeError(`offset (${offset}) must be inside the guest memory (${memory.size} bytes)`);
    const size = checkInteger(region.size ?? memory.size - offset, 'size', 1, Number.MAX_SAFE_INTEGER);
    const guestPhysAddr = checkAddress(region.guestPhysAddr, 'guestPhysAddr');
    if (guestPhysAddr % BigInt(PAGE_SIZE) !== 0n) throw argValueError(`guestPhysAddr must be page-aligned, got 0x${guestPhysAddr.toString(16)}`);
    if (offset % PAGE_SIZE !== 0) throw argValueError(`offset must be page-aligned, got ${offset}`);
    if (size % PAGE_SIZE !== 0) throw argValueError(`size must be a multiple of ${PAGE_SIZE}, got ${size}`);
    if (offset + size > memory.size) throw outOfRangeError(`offset + size (${offset + size}) is beyond the guest memory (${memory.size} bytes)`);
    const flags = region.flags ?? {};
    if (typeof flags !== 'object' || flags === null) throw argTypeError('flags must be an object');
    const bits = (flags.logDirtyPages ? MemoryFlag.LogDirtyPages : 0) | (flags.readonly ? MemoryFlag.Readonly : 0);
    native.setUserMemoryRegion(this.#h, slot, bits, guestPhysAddr, memory.nativeId, offset, size);
  }

  /** Removes memory slot `slot` (KVM_SET_USER_MEMORY_REGION with size 0). */
  deleteUserMemoryRegion(slot: number): void {
    native.setUserMemoryRegion(this.#h, checkInteger(slot, 'slot', 0, 0xffffffff), 0, 0, 0, 0, 0);
  }

  /** Creates vCPU `id`, owned by the calling thread. */
  createVcpu(id: number): Vcpu {
    const [handle, fd, run] = native.createVcpu(this.#h, checkInteger(id, 'id', 0, 0xffffffff));
    return new Vcpu(handle, id, fd, run);
  }

  /** KVM_SET_BOOT_CPU_ID, before any vCPU exists. */
  setBootCpuId(id: number): void {
    this.#ioctl(OPS.setBootCpuId, checkInteger(id, 'id', 0, 0xffffffff));
  }

  /** KVM_CREATE_IRQCHIP: the in-kernel PICs, IOAPIC and local APICs. Before createVcpu(). */
  createIrqChip(): void {
    this.#ioctl(OPS.createIrqChip);
  }

  /** KVM_CREATE_PIT2: the in-kernel i8254 PIT. Needs createIrqChip() first. */
  createPit2(flags: { speakerDummy?: boolean } | number = {}): void {
    if (typeof flags !== 'number' && (typeof flags !== 'object' || flags === null)) throw argTypeError('flags must be a number or an object');
    const bits = typeof flags === 'number' ? checkInteger(flags, 'flags', 0, 0xffffffff) : flags.speakerDummy ? PIT_SPEAKER_DUMMY : 0;
    this.#ioctl(OPS.createPit2, kvmPitConfig.encode({ flags: bits }));
  }

  /** KVM_GET_PIT2: the in-kernel PIT's state. */
  getPit2(): PitState2 {
    const buffer = new Uint8Array(kvmPitState2.size);
    this.#ioctl(OPS.getPit2, buffer);
    return kvmPitState2.decode(buffer);
  }
  /** KVM_SET_PIT2. */
  setPit2(state: PitState2): void {
    this.#ioctl(OPS.setPit2, kvmPitState2.encode(state));
  }

  /** State of one in-kernel interrupt controller (IrqChip.PicMaster, PicSlave or Ioapic). */
  getIrqChip(chip: number): IrqchipState {
    const buffer = kvmIrqchip.encode({ chipId: checkInteger(chip, 'chip', 0, 2), chip: new Uint8Array(512) });
    this.#ioctl(OPS.getIrqChip, buffer);
    return kvmIrqchip.decode(buffer);
  }
  /** KVM_SET_IRQCHIP: one interrupt controller's state, as getIrqChip() returned it. */
  setIrqChip(state: IrqchipState): void {
    this.#ioctl(OPS.setIrqChip, kvmIrqchip.encode(state));
  }

  /** KVM_IRQ_LINE: raises (true/1) or lowers a GSI of the in-kernel irqchip. */
  setIrqLine(irq: number, level: boolean | number): void {
    this.#ioctl(OPS.irqLine, kvmIrqLevel.encode({ irq: checkInteger(irq, 'irq', 0, 0xffffffff), level: level ? 1 : 0 }));
  }

  /** KVM_SIGNAL_MSI: returns >0 if delivered, 0 if the guest blocked it. */
  signalMsi(msi: Partial<Msi> & { addressLo: number; data: number }): number {
    if (typeof msi !== 'object' || msi === null) throw argTypeError('msi must be an object');
    return this.#ioctl(OPS.signalMsi, kvmMsi.encode({
      addressLo: msi.addressLo, addressHi: msi.addressHi ?? 0, data: msi.data, flags: msi.flags ?? 0, devid: msi.devid ?? 0,
    }));
  }

  /** KVM_SET_GSI_ROUTING: replaces the whole GSI routing table. */
  setGsiRouting(entries: readonly GsiRoute[]): void {
    if (!Array.isArray(entries)) throw argTypeError('entries must be an array');
    const encoded = entries.map((entry, i) => {
      if (typeof entry !== 'object' || entry === null) throw argTypeError(`entries[${i}] must be an object`);
      const u = new Uint8Array(32);
      const view = new DataView(u.buffer);
      let type: number;
      if (entry.type === 'irqchip') {
        type = IrqRoutingType.Irqchip;
        view.setUint32(0, checkInteger(entry.irqchip, `entries[${i}].irqchip`, 0, 2), true);
        view.setUint32(4, checkInteger(entry.pin, `entries[${i}].pin`, 0, 0xffffffff), true);
      } else if (entry.type === 'msi') {
        type = IrqRoutingType.Msi;
        view.setUint32(0, checkInteger(entry.addressLo, `entries[${i}].addressLo`, 0, 0xffffffff), true);
        view.setUint32(4, checkInteger(entry.addressHi ?? 0, `entries[${i}].addressHi`, 0, 0xffffffff), true);
        view.setUint32(8, checkInteger(entry.data, `entries[${i}].data`, 0, 0xffffffff), true);
        view.setUint32(12, checkInteger(entry.devid ?? 0, `entries[${i}].devid`, 0, 0xffffffff), true);
      } else {
        throw argValueError(`entries[${i}].type must be 'irqchip' or 'msi'`);
      }
      const flags = entry.type === 'msi' ? entry.flags ?? 0 : 0;
      return { gsi: checkInteger(entry.gsi, `entries[${i}].gsi`, 0, 0xffffffff), type, flags, u };
    });
    this.#ioctl(OPS.setGsiRouting, encodeList(kvmIrqRoutingEntry, encoded, 'entries'));
  }

  /** KVM_IRQFD: writing to `eventfd` raises `gsi`. With `resampleFd`, level-triggered. */
  registerIrqfd(eventfd: Fd, gsi: number, resampleFd?: Fd): void {
    this.#ioctl(OPS.irqfd, kvmIrqfd.encode({
      fd: fdOf(eventfd, 'eventfd'),
      gsi: checkInteger(gsi, 'gsi', 0, 0xffffffff),
      flags: resampleFd === undefined ? 0 : IrqfdFlag.Resample,
      resamplefd: resampleFd === undefined ? 0 : fdOf(resampleFd, 'resampleFd'),
    }));
  }
  /** Removes the irqfd registerIrqfd() registered (KVM_IRQFD with DEASSIGN). */
  unregisterIrqfd(eventfd: Fd, gsi: number): void {
    this.#ioctl(OPS.irqfd, kvmIrqfd.encode({
      fd: fdOf(eventfd, 'eventfd'), gsi: checkInteger(gsi, 'gsi', 0, 0xffffffff), flags: IrqfdFlag.Deassign, resamplefd: 0,
    }));
  }

  /** KVM_IOEVENTFD: a guest write to `addr` signals `eventfd` instead of exiting to us. */
  registerIoeventfd(options: IoeventfdOptions, eventfd: Fd): void {
    this.#ioctl(OPS.ioeventfd, encodeIoeventfd(options, fdOf(eventfd, 'eventfd'), 0));
  }
  /** Removes the ioeventfd registerIoeventfd() registered with these options (KVM_IOEVENTFD with DEASSIGN). */
  unregisterIoeventfd(options: IoeventfdOptions, eventfd: Fd): void {
    this.#ioctl(OPS.ioeventfd, encodeIoeventfd(options, fdOf(eventfd, 'eventfd'), IoeventfdFlag.Deassign));
  }

  /**
   * KVM_REGISTER_COALESCED_MMIO: guest writes to [addr, addr + size) (ports with `pio`) no longer
   * exit; KVM appends them to a ring that vcpu.drainCoalescedMmio() reads. Reads still exit.
   */
  registerCoalescedMmio(zone: { addr: number | bigint; size: number; pio?: boolean }): void {
    this.#ioctl(OPS.registerCoalescedMmio, encodeCoalescedZone(zone));
  }
  /** KVM_UNREGISTER_COALESCED_MMIO: the zone registerCoalescedMmio() registered. */
  unregisterCoalescedMmio(zone: { addr: number | bigint; size: number; pio?: boolean }): void {
    this.#ioctl(OPS.unregisterCoalescedMmio, encodeCoalescedZone(zone));
  }

  /** KVM_SET_TSS_ADDR: three pages of guest-physical space KVM may use (Intel real mode). */
  setTssAddr(addr: number | bigint): void {
    const value = checkAddress(addr, 'addr');
    if (value > 0xffffffffn - 3n * 4096n) throw outOfRangeError('addr must leave three pages below 4 GiB');
    this.#ioctl(OPS.setTssAddr, value);
  }

  /** KVM_SET_IDENTITY_MAP_ADDR: one page of guest-physical space for the EPT identity map. */
  setIdentityMapAddr(addr: number | bigint): void {
    const buffer = new Uint8Array(8);
    new DataView(buffer.buffer).setBigUint64(0, checkAddress(addr, 'addr'), true);
    this.#ioctl(OPS.setIdentityMapAddr, buffer);
  }

  /** KVM_GET_CLOCK: the kvmclock's current value. */
  getClock(): ClockData {
    const buffer = new Uint8Array(kvmClockData.size);
    this.#ioctl(OPS.getClock, buffer);
    return kvmClockData.decode(buffer);
  }
  /** KVM_SET_CLOCK. Pass back what getClock() returned; `flags` selects which fields apply. */
  setClock(data: ClockData): void {
    this.#ioctl(OPS.setClock, kvmClockData.encode(data));
  }

  /**
   * The irqchips (with `irqchip`), PIT and clock as one buffer of KVM's structs, in one native
   * call (lib/kvm/vm-state-blob.ts describes it): what a migration sends as it is.
   */
  saveState(irqchip: boolean): Uint8Array {
    return native.saveVmState(this.#h, irqchip);
  }

  /** Puts a saveState() buffer back in one call, checked whole before any of it is applied. */
  restoreState(state: Uint8Array, irqchip: boolean): void {
    if (!(state instanceof Uint8Array)) throw argTypeError('state must be a Uint8Array');
    native.restoreVmState(this.#h, state, irqchip);
  }

  /** KVM_GET_DIRTY_LOG: bit i set = page i of the slot was written since the last call. */
  getDirtyLog(slot: number, into?: Uint8Array): Uint8Array {
    return native.getDirtyLog(this.#h, checkInteger(slot, 'slot', 0, 0xffffffff), into);
  }

  /**
   * KVM_CLEAR_DIRTY_LOG: re-arms dirty tracking for the pages set in `bitmap` (all pages of the
   * range without one). Needs enableCap(Cap.ManualDirtyLogProtect2, [DirtyLogManual.ProtectEnable]).
   */
  clearDirtyLog(slot: number, firstPage: number, numPages: number, bitmap?: Uint8Array): void {
    native.clearDirtyLog(
      this.#h,
      checkInteger(slot, 'slot', 0, 0xffffffff),
      checkInteger(firstPage, 'firstPage', 0, Number.MAX_SAFE_INTEGER),
      checkInteger(numPages, 'numPages', 0, 0xffffffff),
      bitmap,
    );
  }

  /**
   * Turns on the dirty ring (KVM_CAP_DIRTY_LOG_RING_ACQ_REL where offered, else
   * KVM_CAP_DIRTY_LOG_RING) with `bytes` per vCPU. Must precede createVcpu().
   */
  enableDirtyRing(bytes: number): void {
    checkInteger(bytes, 'bytes', 4096, 0x7fffffff);
    if ((bytes & (bytes - 1)) !== 0) throw argValueError(`bytes must be a power of two, got ${bytes}`);
    const cap = this.checkExtension(Cap.DirtyLogRingAcqRel) > 0 ? Cap.DirtyLogRingAcqRel : Cap.DirtyLogRing;
    this.enableCap(cap, [bytes]);
  }

  /** KVM_RESET_DIRTY_RINGS: re-protects harvested ring entries; returns how many. */
  resetDirtyRings(): number {
    return this.#ioctl(OPS.resetDirtyRings);
  }

  protected release(): void {
    if (this.#owning) native.closeVm(this.#handle);
  }
}

function encodeCoalescedZone(zone: { addr: number | bigint; size: number; pio?: boolean }): Uint8Array {
  if (typeof zone !== 'object' || zone === null) throw argTypeError('zone must be an object');
  return kvmCoalescedMmioZone.encode({
    addr: checkAddress(zone.addr, 'addr'), size: checkInteger(zone.size, 'size', 1, 0xffffffff), pio: zone.pio ? 1 : 0,
  });
}

function encodeIoeventfd(options: IoeventfdOptions, fd: number, extraFlags: number): Uint8Array {
  if (typeof options !== 'object' || options === null) throw argTypeError('options must be an object');
  const len = checkInteger(options.len, 'len', 0, 8);
  if (![0, 1, 2, 4, 8].includes(len)) throw argValueError(`len must be 0, 1, 2, 4 or 8, got ${len}`);
  let flags = extraFlags;
  if (options.pio) flags |= IoeventfdFlag.Pio;
  if (options.datamatch !== undefined) flags |= IoeventfdFlag.Datamatch;
  return kvmIoeventfd.encode({
    datamatch: options.datamatch === undefined ? 0n : checkAddress(options.datamatch, 'datamatch'),
    addr: checkAddress(options.addr, 'addr'),
    len,
    fd,
    flags,
  });
}
