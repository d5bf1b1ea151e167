// Which guest pages changed since the last look, over every memory slot of a VM, whichever KVM
// mechanism reports them: the dirty bitmap (KVM_GET_DIRTY_LOG, with KVM_CLEAR_DIRTY_LOG under
// KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) or the per-vCPU dirty rings (KVM_CAP_DIRTY_LOG_RING), merged
// with the VMM's own bitmap of the writes KVM does not see.
import { Cap, DirtyLogManual, MemoryFlag, PAGE_SIZE } from '../kvm/constants.js';
import { GuestMemory } from '../kvm/memory.js';
import { harvestDirtyRing, type Vcpu, type VcpuKickHandle } from '../kvm/vcpu.js';
import { Vm } from '../kvm/vm.js';
import { bitmapWords, DirtyBitmap, orLogWords, takeWordRanges } from './dirty-bitmap.js';
import type { PageRange } from './page-ranges.js';
import { ErrorCode, argTypeError, argValueError, NodeKvmError, outOfRangeError } from '../kvm/errors.js';

/** Which KVM mechanism reports the pages the guest wrote. */
export type DirtyLogMode = 'bitmap' | 'ring';

/**
 * Dirty ring bytes per vCPU that a machine enables by default: 4096 entries, the size api.rst
 * 8.29 recommends at least. Clamp to maxDirtyRingBytes() on hosts that offer less.
 */
export const DEFAULT_DIRTY_RING_BYTES = 65536;

/** Most pages one KVM_CLEAR_DIRTY_LOG re-protects (1 GiB), so that KVM holds its MMU lock briefly. */
export const CLEAR_CHUNK_PAGES = 1 << 18;

/**
 * Logged slots from this size on (in all) start with KVM_DIRTY_LOG_INITIALLY_SET by default.
 * Below it, KVM write-protects what the guest has mapped as logging is turned on, in one pass over
 * the mapped pages only: 0.3-0.6 ms for 256 MiB or 1 GiB here, against 0.7 and 2.0 ms for clearing
 * an initially-set log, whose cost grows with the slot's size, mapped or not.
 */
export const INITIALLY_SET_MIN_BYTES = 4 * 1024 ** 3;

/** sizeof(struct kvm_dirty_gfn). */
const DIRTY_GFN_BYTES = 16;
/** [slot, pageOffset] pairs one harvestDirtyRing() call takes: a default ring's worth. */
const RING_SCRATCH_PAIRS = DEFAULT_DIRTY_RING_BYTES / DIRTY_GFN_BYTES;

/** A Kvm or a Vm: anything that answers KVM_CHECK_EXTENSION. */
export interface ExtensionSource {
  /** KVM_CHECK_EXTENSION: 0 if `cap` is not offered, else a positive value. */
  checkExtension(cap: number): number;
}

/** The dirty-log modes this host offers: 'bitmap' always, 'ring' with KVM_CAP_DIRTY_LOG_RING(_ACQ_REL). */
export function dirtyLogModesOffered(source: ExtensionSource): DirtyLogMode[] {
  return maxDirtyRingBytes(source) > 0 ? ['bitmap', 'ring'] : ['bitmap'];
}

/** The largest dirty ring per vCPU this host accepts, in bytes; 0 without dirty rings. */
export function maxDirtyRingBytes(source: ExtensionSource): number {
  if (typeof source !== 'object' || source === null || typeof source.checkExtension !== 'function') {
    throw argTypeError('source must be a Kvm or a Vm');
  }
  return Math.max(source.checkExtension(Cap.DirtyLogRingAcqRel), source.checkExtension(Cap.DirtyLogRing), 0);
}

/** A memory slot a DirtyTracker watches: its number, where it is in guest-physical memory, and its size. */
export interface TrackedSlot {
  slot: number;
  /** Page-aligned. The slot's pages are guest frames guestPhysAddr / 4096 onwards. */
  guestPhysAddr: number;
  memory: GuestMemory;
  /** Byte offset of the slot in `memory`, as it was registered. Default 0. */
  offset?: number;
  /** Bytes of the slot, as it was registered. Default: the rest of `memory` after `offset`. */
  size?: number;
  /**
   * The slot's flags (MemoryFlag) while tracking is off. MemoryFlag.Readonly slots are never
   * logged: the guest cannot write them, and the VMM's writes go to vmmDirty.
   */
  flags?: number;
}

/** What a DirtyTracker watches (the VM and its slots), how (bitmap or ring), and the VMM's own dirty bitmap to merge. */
export interface DirtyTrackerOptions {
  vm: Vm;
  slots: readonly TrackedSlot[];
  mode: DirtyLogMode;
  /** The VMM's own dirty bitmap, by guest frame number; it must cover every tracked slot. */
  vmmDirty: DirtyBitmap;
  /**
   * Ring mode: the kick handles of every vCPU of the VM, whose rings harvest() drains from this
   * thread. The VM must have enabled its ring (vm.enableDirtyRing) before creating them.
   */
  vcpus?: readonly VcpuKickHandle[];
  /** Bitmap mode: use KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 where the host offers it. Default true. */
  manualProtect?: boolean;
  /** Bitmap mode with manual protect: most pages per KVM_CLEAR_DIRTY_LOG, a multiple of 64. */
  clearChunkPages?: number;
  /**
   * Bitmap mode with manual protect: use KVM_DIRTY_LOG_INITIALLY_SET where the host offers it, so
   * that write-protecting all memory at start() is spread over chunked KVM_CLEAR_DIRTY_LOG calls
   * (short holds of KVM's MMU lock) instead of one pass as logging is turned on. Default: for
   * logged slots of INITIALLY_SET_MIN_BYTES or more in all.
   */
  initiallySet?: boolean;
}

interface SlotState {
  readonly slot: number;
  readonly guestPhysAddr: number;
  readonly memory: GuestMemory;
  readonly offset: number;
  readonly size: number;
  readonly firstPage: number;
  readonly pageCount: number;
  readonly readonly: boolean;
  readonly alwaysLogs: boolean;
  /** KVM_GET_DIRTY_LOG's bitmap for this slot, reused across harvests (bitmap mode). */
  log: Uint8Array | null;
  logWords: Int32Array | null;
}

/**
 * The pages of a VM's memory slots that were written since tracking started or since the last
 * harvest, as guest frame numbers (guest-physical address / 4096).
 *
 * Contract:
 * - start() turns dirty logging on (only while needed: it costs the guest a fault per first
 *   write of each page) and discards whatever KVM had logged before, so the first harvest()
 *   reports exactly the pages written after start() returned. The caller sends all memory after
 *   start(). With KVM_DIRTY_LOG_INITIALLY_SET (options.initiallySet; by default for large slots),
 *   KVM reports every page dirty until it is cleared: start() consumes those bits itself, clearing
 *   the log in chunks, which also spreads the write-protection of all memory over short
 *   KVM_CLEAR_DIRTY_LOG calls instead of the one pass KVM makes as logging is turned on.
 * - vmmDirty is left alone by start(): pages marked in it before start() appear in the first
 *   harvest too (more than needed, never less).
 * - harvest() re-arms tracking for the pages it returns before it returns: read their contents
 *   after it (api.rst 4.117, 8.29), and a write after the read shows in the next harvest.
 * - Ring mode, vCPUs running: a page whose write the CPU still buffers (Intel PML) reaches the
 *   ring at the vCPU's next exit, so it shows in a later harvest; once the vCPUs are out of
 *   KVM_RUN (paused), harvest() is complete.
 * - A round that failed to send hands its pages to requeue(); they come back in the next
 *   harvest(). Nothing is dropped until stop(), which turns logging off and forgets what KVM
 *   logged since the last harvest (requeued pages and vmmDirty stay for the next harvest).
 * - Bitmap mode leaves KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 enabled on the VM after stop().
 */
export class DirtyTracker {
  readonly mode: DirtyLogMode;
  readonly #vm: Vm;
  readonly #slots: SlotState[];
  /** Slots KVM logs (not read-only). */
  readonly #loggedSlots: SlotState[];
  readonly #bySlot = new Map<number, SlotState>();
  readonly #vmmDirty: DirtyBitmap;
  readonly #vcpus: readonly VcpuKickHandle[];
  readonly #wantManualProtect: boolean;
  readonly #clearChunkPages: number;
  readonly #wantInitiallySet: boolean;
  /** Pages for the next harvest, by guest frame number: requeued, or gathered by a failed harvest. */
  readonly #pending: Int32Array;
  #ringScratch: Float64Array | null = null;
  #manualProtect = false;
  #initiallySet = false;
  #active = false;

  /** A tracker over `options.slots` of `options.vm`, off until start(). */
  constructor(options: DirtyTrackerOptions) {
    if (typeof options !== 'object' || options === null) throw argTypeError('options must be an object');
    const { vm, slots, mode, vmmDirty } = options;
    if (!(vm instanceof Vm)) throw argTypeError('vm must be a Vm');
    if (mode !== 'bitmap' && mode !== 'ring') throw argValueError(`mode must be 'bitmap' or 'ring', got ${String(mode)}`);
    if (!(vmmDirty instanceof DirtyBitmap)) throw argTypeError('vmmDirty must be a DirtyBitmap');
    if (!Array.isArray(slots)) throw argTypeError('slots must be an array of TrackedSlot');
    this.mode = mode;
    this.#vm = vm;
    this.#vmmDirty = vmmDirty;
    this.#slots = slots.map((slot, i) => checkSlot(slot, `slots[${i}]`, vmmDirty.pageCount));
    for (const state of this.#slots) {
      if (this.#bySlot.has(state.slot)) throw argValueError(`slot ${state.slot} is listed twice in slots`);
      this.#bySlot.set(state.slot, state);
    }
    this.#loggedSlots = this.#slots.filter((state) => !state.readonly);
    this.#pending = new Int32Array(bitmapWords(vmmDirty.pageCount));

    const vcpus = options.vcpus ?? [];
    if (!Array.isArray(vcpus)) throw argTypeError('vcpus must be an array of VcpuKickHandle');
    vcpus.forEach((handle, i) => {
      if (typeof handle !== 'object' || handle === null || typeof handle.vcpuKick !== 'number') {
        throw argTypeError(`vcpus[${i}] must be a VcpuKickHandle (vcpu.kickHandle)`);
      }
    });
    if (mode === 'ring' && vcpus.length === 0) {
      throw argTypeError("mode 'ring' needs options.vcpus: the kick handles of every vCPU, whose dirty rings harvest() drains");
    }
    this.#vcpus = [...vcpus];

    this.#wantManualProtect = options.manualProtect ?? true;
    if (typeof this.#wantManualProtect !== 'boolean') throw argTypeError('manualProtect must be a boolean');
    const chunk = options.clearChunkPages ?? CLEAR_CHUNK_PAGES;
    if (typeof chunk !== 'number') throw argTypeError(`clearChunkPages must be a number, got ${typeof chunk}`);
    if (!Number.isInteger(chunk) || chunk < 64 || chunk % 64 !== 0 || chunk > 0xffffffc0) {
      throw outOfRangeError(`clearChunkPages must be a positive multiple of 64, got ${chunk}`);
    }
    this.#clearChunkPages = chunk;
    const loggedBytes = this.#loggedSlots.reduce((sum, state) => sum + state.size, 0);
    this.#wantInitiallySet = options.initiallySet ?? loggedBytes >= INITIALLY_SET_MIN_BYTES;
    if (typeof this.#wantInitiallySet !== 'boolean') throw argTypeError('initiallySet must be a boolean');
  }

  /** Whether logging is on (between start() and stop()). */
  get active(): boolean {
    return this.#active;
  }

  /** Bitmap mode: whether KVM_CLEAR_DIRTY_LOG re-arms pages (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 in use). */
  get manualProtect(): boolean {
    return this.#manualProtect;
  }

  /** Bitmap mode: whether the log starts all set (KVM_DIRTY_LOG_INITIALLY_SET), consumed by start(). */
  get initiallySet(): boolean {
    return this.#initiallySet;
  }

  /** Turns dirty logging on; the first harvest() then names the pages written from now on. */
  start(): void {
    if (this.#active) throw new NodeKvmError(ErrorCode.InvalidState, 'dirty tracking is already on; stop() it first');
    try {
      if (this.mode === 'bitmap') this.#enableManualProtect();
      this.#setLogging(true);
      this.#active = true;
      // Whatever KVM logged before now (initially-set bits, a log left on) is not news.
      this.#collect(null);
    } catch (error) {
      this.#active = false;
      try {
        this.#setLogging(false);
      } catch {
        // The first error says what went wrong.
      }
      throw error;
    }
  }

  /**
   * The pages written since start() or the previous harvest(), plus those requeued, as sorted
   * ranges with adjacent pages merged. Tracking is re-armed for them before this returns.
   */
  harvest(): PageRange[] {
    if (!this.#active) throw new NodeKvmError(ErrorCode.InvalidState, 'dirty tracking is off; call start() first');
    // Everything gathered goes to #pending first: if a call below throws, what was already taken
    // from KVM comes back in the next harvest.
    this.#collect(this.#pending);
    this.#vmmDirty.takeInto(this.#pending);
    return takeWordRanges(this.#pending);
  }

  /** Pages that were harvested but not sent: the next harvest() returns them again. */
  requeue(ranges: readonly PageRange[]): void {
    if (!Array.isArray(ranges)) throw argTypeError('ranges must be an array of PageRange');
    const limit = this.#vmmDirty.pageCount;
    ranges.forEach((range, i) => {
      if (typeof range !== 'object' || range === null) throw argTypeError(`ranges[${i}] must be a PageRange`);
      const { firstPage, pageCount } = range;
      if (typeof firstPage !== 'number' || typeof pageCount !== 'number') {
        throw argTypeError(`ranges[${i}].firstPage and .pageCount must be numbers`);
      }
      if (!Number.isInteger(firstPage) || !Number.isInteger(pageCount) || firstPage < 0 || pageCount < 0 || firstPage + pageCount > limit) {
        throw outOfRangeError(`ranges[${i}] (${firstPage} +${pageCount}) must lie within the ${limit} tracked guest frames`);
      }
    });
    for (const { firstPage, pageCount } of ranges) if (pageCount > 0) setBits(this.#pending, firstPage, firstPage + pageCount);
  }

  /** Turns dirty logging off. Does nothing if it is off. */
  stop(): void {
    if (!this.#active) return;
    this.#active = false;
    this.#setLogging(false);
  }

  #enableManualProtect(): void {
    this.#manualProtect = false;
    this.#initiallySet = false;
    if (!this.#wantManualProtect) return;
    const offered = this.#vm.checkExtension(Cap.ManualDirtyLogProtect2);
    if ((offered & DirtyLogManual.ProtectEnable) === 0) return;
    const initiallySet = this.#wantInitiallySet ? offered & DirtyLogManual.InitiallySet : 0;
    // Takes effect for logs created from now on, so before the slots are re-registered.
    this.#vm.enableCap(Cap.ManualDirtyLogProtect2, [DirtyLogManual.ProtectEnable | initiallySet]);
    this.#manualProtect = true;
    this.#initiallySet = initiallySet !== 0;
  }

  /** Re-registers every logged slot with or without KVM_MEM_LOG_DIRTY_PAGES (api.rst 4.35). */
  #setLogging(on: boolean): void {
    for (const state of this.#loggedSlots) {
      this.#vm.setUserMemoryRegion({
        slot: state.slot,
        guestPhysAddr: state.guestPhysAddr,
        memory: state.memory,
        offset: state.offset,
        size: state.size,
        flags: { logDirtyPages: on || state.alwaysLogs },
      });
    }
  }

  /** Takes what KVM logged into `target` (by guest frame number), or discards it (null). */
  #collect(target: Int32Array | null): void {
    if (this.mode === 'ring') this.#collectRings(target);
    else for (const state of this.#loggedSlots) this.#collectSlotLog(state, target);
  }

  #collectSlotLog(state: SlotState, target: Int32Array | null): void {
    if (state.log === null) {
      // KVM's layout: bit i = page i, in 64-bit words.
      const buffer = new ArrayBuffer(Math.ceil(state.pageCount / 64) * 8);
      state.log = new Uint8Array(buffer);
      state.logWords = new Int32Array(buffer);
    }
    const log = this.#vm.getDirtyLog(state.slot, state.log);
    const words = state.logWords!;
    // The words are read by one function, which the migration source's warm-up also runs: the
    // first harvest that finds pages written runs no code that V8 compiled without seeing it.
    if (!this.#manualProtect) {
      // KVM_GET_DIRTY_LOG has already re-armed what it returned.
      orLogWords(words, 0, words.length, target, state.firstPage);
      return;
    }
    const chunk = this.#clearChunkPages;
    for (let chunkPage = 0; chunkPage < state.pageCount; chunkPage += chunk) {
      const endWord = Math.min(words.length, (chunkPage + chunk) / 32);
      // Re-arm exactly the pages reported: one written since KVM_GET_DIRTY_LOG stays set in KVM's log.
      if (orLogWords(words, chunkPage / 32, endWord, target, state.firstPage)) {
        this.#vm.clearDirtyLog(state.slot, chunkPage, Math.min(chunk, state.pageCount - chunkPage), log.subarray(chunkPage / 8));
      }
    }
  }

  #collectRings(target: Int32Array | null): void {
    const scratch = (this.#ringScratch ??= new Float64Array(2 * RING_SCRATCH_PAIRS));
    for (const handle of this.#vcpus) {
      let pairs: number;
      do {
        pairs = harvestDirtyRing(handle, scratch);
        if (target) this.#markRingEntries(scratch, pairs, target);
      } while (pairs === RING_SCRATCH_PAIRS);
    }
    // After harvesting and before anyone reads the pages (api.rst 8.29).
    this.#vm.resetDirtyRings();
  }

  #markRingEntries(entries: Float64Array, pairs: number, target: Int32Array): void {
    let state: SlotState | undefined;
    for (let i = 0; i < 2 * pairs; i += 2) {
      const slot = entries[i]!;
      const pageOffset = entries[i + 1]!;
      if (state === undefined || state.slot !== slot) state = this.#bySlot.get(slot);
      // Entries of slots that are not tracked here (another logging slot of the VM) are not ours.
      if (state === undefined || pageOffset >= state.pageCount) continue;
      const page = state.firstPage + pageOffset;
      target[page >>> 5]! |= 1 << (page & 31);
    }
  }
}

let spillScratch: Float64Array | null = null;

/**
 * For a vCPU thread in ring mode, on ExitReason.DirtyRingFull: moves this vCPU's ring into the
 * VMM's bitmap (slot -> first guest frame from `slotBasePages`), then resets the rings so the
 * vCPU can run on; the tracker's next harvest() finds the pages in the bitmap. Returns how many
 * ring entries were moved. An entry of a slot that `slotBasePages` does not name, or beyond
 * `into`, throws a RangeError after the rest were moved and the rings reset.
 */
export function spillDirtyRing(
  vcpu: Vcpu, vm: Vm, slotBasePages: ReadonlyMap<number, number>, into: DirtyBitmap, scratch?: Float64Array,
): number {
  if (!(slotBasePages instanceof Map)) throw argTypeError('slotBasePages must be a Map of slot -> first guest frame');
  if (!(into instanceof DirtyBitmap)) throw argTypeError('into must be a DirtyBitmap');
  if (scratch !== undefined && (!(scratch instanceof Float64Array) || scratch.length < 2)) {
    throw argTypeError('scratch must be a Float64Array of at least 2 elements');
  }
  const entries = scratch ?? (spillScratch ??= new Float64Array(2 * RING_SCRATCH_PAIRS));
  const capacity = entries.length >> 1;
  let moved = 0;
  let stray: string | null = null;
  let pairs: number;
  do {
    pairs = vcpu.harvestDirtyRing(entries);
    for (let i = 0; i < 2 * pairs; i += 2) {
      const slot = entries[i]!;
      const base = slotBasePages.get(slot);
      const page = base === undefined ? -1 : base + entries[i + 1]!;
      if (page < 0 || page >= into.pageCount) {
        stray ??= base === undefined
          ? `dirty ring entry for slot ${slot}, which slotBasePages does not name`
          : `dirty ring entry for guest frame ${page} (slot ${slot}), outside the bitmap's ${into.pageCount} pages`;
        continue;
      }
      into.markPages(page, 1);
    }
    moved += pairs;
  } while (pairs === capacity);
  vm.resetDirtyRings();
  if (stray !== null) throw outOfRangeError(stray);
  return moved;
}

/** slot -> first guest frame, for spillDirtyRing(). */
export function slotBasePages(slots: readonly Pick<TrackedSlot, 'slot' | 'guestPhysAddr'>[]): Map<number, number> {
  return new Map(slots.map(({ slot, guestPhysAddr }) => [slot, guestPhysAddr / PAGE_SIZE]));
}

function checkSlot(slot: TrackedSlot, name: string, trackedPages: number): SlotState {
  if (typeof slot !== 'object' || slot === null) throw argTypeError(`${name} must be a TrackedSlot`);
  const number = checkNumber(slot.slot, `${name}.slot`, 0xffffffff);
  const guestPhysAddr = checkNumber(slot.guestPhysAddr, `${name}.guestPhysAddr`, Number.MAX_SAFE_INTEGER);
  if (guestPhysAddr % PAGE_SIZE !== 0) throw argValueError(`${name}.guestPhysAddr must be page-aligned, got 0x${guestPhysAddr.toString(16)}`);
  const memory = slot.memory;
  if (!(memory instanceof GuestMemory)) throw argTypeError(`${name}.memory must be a GuestMemory`);
  const offset = checkNumber(slot.offset ?? 0, `${name}.offset`, memory.size - PAGE_SIZE);
  const size = checkNumber(slot.size ?? memory.size - offset, `${name}.size`, memory.size - offset);
  if (offset % PAGE_SIZE !== 0 || size % PAGE_SIZE !== 0 || size === 0) {
    throw argValueError(`${name}.offset and .size must be page multiples (size > 0), got ${offset} and ${size}`);
  }
  const flags = checkNumber(slot.flags ?? 0, `${name}.flags`, 0xffffffff);
  if ((flags & ~(MemoryFlag.LogDirtyPages | MemoryFlag.Readonly)) !== 0) {
    throw argValueError(`${name}.flags may hold MemoryFlag.LogDirtyPages and MemoryFlag.Readonly only, got 0x${flags.toString(16)}`);
  }
  const firstPage = guestPhysAddr / PAGE_SIZE;
  const pageCount = size / PAGE_SIZE;
  if (firstPage + pageCount > trackedPages) {
    throw outOfRangeError(`${name} (guest frames ${firstPage}..${firstPage + pageCount - 1}) lies beyond vmmDirty's ${trackedPages} pages`);
  }
  return {
    slot: number, guestPhysAddr, memory, offset, size, firstPage, pageCount,
    readonly: (flags & MemoryFlag.Readonly) !== 0,
    alwaysLogs: (flags & MemoryFlag.LogDirtyPages) !== 0,
    log: null, logWords: null,
  };
}

function checkNumber(value: unknown, name: string, max: number): number {
  if (typeof value !== 'number') throw argTypeError(`${name} must be a number, got ${typeof value}`);
  if (!Number.isInteger(value) || value < 0 || value > max) throw outOfRangeError(`${name} must be an integer 0..${max}, got ${value}`);
  return value;
}

/** Sets pages [firstPage, endPage) in a thread-private bitmap. */
function setBits(words: Int32Array, firstPage: number, endPage: number): void {
  const firstWord = firstPage >>> 5;
  const lastWord = (endPage - 1) >>> 5;
  const firstMask = -1 << (firstPage & 31);
  const lastMask = -1 >>> (31 - ((endPage - 1) & 31));
  if (firstWord === lastWord) {
    words[firstWord]! |= firstMask & lastMask;
    return;
  }
  words[firstWord]! |= firstMask;
  words.fill(-1, firstWord + 1, lastWord);
  words[lastWord]! |= lastMask;
}
