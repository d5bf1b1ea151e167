// The `touch` guest (guests/touch.S) on a machine whose RAM is split into a code slot and a
// dirty-logging slot, for dirty-log, dirty-ring and memory-slot tests.
import { ExitReason, GuestMemory, IoDirection, Kvm, type Vcpu, type Vm } from '../../lib/index.js';
import { bigintJson, enterRealMode, guestImage, LOAD_ADDR } from './kvm.js';

export const PAGE_BYTES = 4096;
/** Where touch.S reads its table: u16 count, then one u16 segment per entry. */
export const TOUCH_TABLE_ADDR = 0x500;
/** touch.S writes AL = 0 here once, after its last store, then halts. */
export const TOUCH_DONE_PORT = 0x81;
/** The u16 that touch.S stores for table entry `i`. */
export const touchValue = (i: number): number => 0xa500 + i;

/**
 * Writes touch.S's table so that entry i stores at guest-physical `targets[i]`. Real-mode
 * segment:0 reaches paragraph-aligned addresses below 1 MiB only.
 */
export function writeTouchTable(memory: GuestMemory, targets: readonly number[]): void {
  const table = new DataView(memory.buffer, TOUCH_TABLE_ADDR, 2 + 2 * targets.length);
  table.setUint16(0, targets.length, true);
  targets.forEach((guestPhysAddr, i) => {
    if (guestPhysAddr % 16 !== 0 || guestPhysAddr > 0xffff0) throw new RangeError(`touch target 0x${guestPhysAddr.toString(16)} is not reachable as segment:0`);
    table.setUint16(2 + 2 * i, guestPhysAddr >> 4, true);
  });
}

export interface TouchMachine {
  kvm: Kvm;
  vm: Vm;
  /** All guest RAM: slot 0 maps [0, codeBytes), slot 1 maps [codeBytes, codeBytes + logBytes). */
  memory: GuestMemory;
  vcpu: Vcpu;
  /** Guest-physical (and memory) offset of slot 1. */
  logBase: number;
  close(): void;
}

export interface TouchMachineOptions {
  /** Bytes of slot 0 (code and table, never logged). Default 256 KiB. */
  codeBytes?: number;
  /** Bytes of slot 1 (logged). Default 256 KiB. */
  logBytes?: number;
  /** Flags of slot 1. Default { logDirtyPages: true }. */
  logFlags?: { logDirtyPages?: boolean; readonly?: boolean };
  /** Runs on the new VM before any slot exists (enableCap, enableDirtyRing). */
  beforeSlots?: (vm: Vm) => void;
}

/** A VM running touch.S at 0000:7c00, with a logged slot 1 above the code slot. */
export function touchMachine(options: TouchMachineOptions = {}): TouchMachine {
  const codeBytes = options.codeBytes ?? 0x40000;
  const logBytes = options.logBytes ?? 0x40000;
  const kvm = Kvm.open();
  const vm = kvm.createVm();
  const memory = GuestMemory.create(codeBytes + logBytes);
  let vcpu: Vcpu | undefined;
  const close = () => {
    vcpu?.close();
    vm.close();
    memory.close();
    kvm.close();
  };
  try {
    options.beforeSlots?.(vm);
    vm.setUserMemoryRegion({ slot: 0, guestPhysAddr: 0, memory, size: codeBytes });
    vm.setUserMemoryRegion({
      slot: 1, guestPhysAddr: codeBytes, memory, offset: codeBytes, size: logBytes, flags: options.logFlags ?? { logDirtyPages: true },
    });
    memory.write(LOAD_ADDR, guestImage('touch'));
    vcpu = vm.createVcpu(0);
    enterRealMode(vcpu, LOAD_ADDR);
  } catch (error) {
    close();
    throw error;
  }
  return { kvm, vm, memory, vcpu: vcpu!, logBase: codeBytes, close };
}

/** Guest-physical addresses of the first byte of the given pages of slot 1. */
export const logPageAddrs = (machine: TouchMachine, pages: readonly number[]): number[] =>
  pages.map((page) => machine.logBase + page * PAGE_BYTES);

/**
 * Runs touch.S until HLT. Its only port exit must be the done marker; any other exit throws
 * unless `onExit` handles it (returns true).
 */
export function runTouch(vcpu: Vcpu, onExit?: (reason: number) => boolean): { doneMarkers: number } {
  const run = vcpu.kvmRun;
  let doneMarkers = 0;
  for (;;) {
    const reason = vcpu.run();
    if (reason === ExitReason.Hlt) return { doneMarkers };
    if (reason === ExitReason.Io && run.ioPort === TOUCH_DONE_PORT && run.ioDirection === IoDirection.Out) {
      doneMarkers++;
      continue;
    }
    if (onExit?.(reason)) continue;
    throw new Error(`unexpected exit ${JSON.stringify(vcpu.exit(), bigintJson)}`);
  }
}

/** A dirty bitmap in KVM's layout (bit i = page i, padded to 64-bit words) with `pages` set. */
export function dirtyBitmap(slotPages: number, pages: readonly number[]): Uint8Array {
  const bitmap = new Uint8Array(Math.ceil(slotPages / 64) * 8);
  for (const page of pages) bitmap[page >> 3]! |= 1 << (page & 7);
  return bitmap;
}
