// The mmap'd kvm_run page of a vCPU, read and written in place. KvmRun's accessors read one field
// each from the mapping and allocate nothing (no BigInt where a number is exact), so the VMM's
// exit path uses them too.

/** Byte offsets in struct kvm_run, by the kernel's field paths. Checked by the layout test. */
export const KvmRunOffset = {
  request_interrupt_window: 0,
  immediate_exit: 1,
  exit_reason: 8,
  ready_for_interrupt_injection: 12,
  if_flag: 13,
  flags: 14,
  cr8: 16,
  apic_base: 24,
  'io.direction': 32,
  'io.size': 33,
  'io.port': 34,
  'io.count': 36,
  'io.data_offset': 40,
  'mmio.phys_addr': 32,
  'mmio.data': 40,
  'mmio.len': 48,
  'mmio.is_write': 52,
  'hw.hardware_exit_reason': 32,
  'fail_entry.hardware_entry_failure_reason': 32,
  'fail_entry.cpu': 40,
  'ex.exception': 32,
  'ex.error_code': 36,
  'debug.arch.exception': 32,
  'debug.arch.pc': 40,
  'debug.arch.dr6': 48,
  'debug.arch.dr7': 56,
  'internal.suberror': 32,
  'internal.ndata': 36,
  'internal.data': 40,
  'system_event.type': 32,
  'system_event.ndata': 36,
  'system_event.data': 40,
  'msr.error': 32,
  'msr.reason': 40,
  'msr.index': 44,
  'msr.data': 48,
  'hypercall.nr': 32,
  'hypercall.args': 40,
  'hypercall.ret': 88,
  'tpr_access.rip': 32,
  'tpr_access.is_write': 40,
  'eoi.vector': 32,
  'notify.flags': 32,
} as const;

const O = KvmRunOffset;

/** A vCPU's mmap'd `struct kvm_run` page (vcpu.kvmRun), its fields read and written in place: no copy, no allocation per exit. */
export class KvmRun {
  /** The whole mapping (kvm_run, then the PIO data page and the coalesced MMIO ring). */
  readonly view: DataView;
  readonly bytes: Uint8Array;

  /** A view of the mapping `buffer` (the vCPU makes it). */
  constructor(buffer: ArrayBuffer) {
    this.view = new DataView(buffer);
    this.bytes = new Uint8Array(buffer);
  }

  /** `exit_reason`: a KVM_EXIT_* number (ExitReason). */
  get exitReason(): number {
    return this.view.getUint32(O.exit_reason, true);
  }
  /** Set to 1 to make the next run() return at once with ExitReason.Intr (api.rst). */
  get immediateExit(): number {
    return this.view.getUint8(O.immediate_exit);
  }
  /** Set to 1 to make the next run() return at once with ExitReason.Intr (api.rst). */
  set immediateExit(value: number) {
    this.view.setUint8(O.immediate_exit, value ? 1 : 0);
  }
  /** `request_interrupt_window`: exit as soon as the guest can take an interrupt. */
  get requestInterruptWindow(): number {
    return this.view.getUint8(O.request_interrupt_window);
  }
  /** Set to 1 to exit as soon as the guest can take an interrupt. */
  set requestInterruptWindow(value: number) {
    this.view.setUint8(O.request_interrupt_window, value ? 1 : 0);
  }
  /** `ready_for_interrupt_injection`: an interrupt could be injected now. */
  get readyForInterruptInjection(): number {
    return this.view.getUint8(O.ready_for_interrupt_injection);
  }
  /** `if_flag`: the guest's RFLAGS.IF at the exit. */
  get ifFlag(): number {
    return this.view.getUint8(O.if_flag);
  }
  /** `cr8` at the exit. */
  get cr8(): bigint {
    return this.view.getBigUint64(O.cr8, true);
  }
  /** `apic_base` at the exit. */
  get apicBase(): bigint {
    return this.view.getBigUint64(O.apic_base, true);
  }

  /** KVM_EXIT_IO: `io.direction` (IoDirection). */
  get ioDirection(): number {
    return this.view.getUint8(O['io.direction']);
  }
  /** KVM_EXIT_IO: `io.size`, bytes per access (1, 2 or 4). */
  get ioSize(): number {
    return this.view.getUint8(O['io.size']);
  }
  /** KVM_EXIT_IO: `io.port`. */
  get ioPort(): number {
    return this.view.getUint16(O['io.port'], true);
  }
  /** KVM_EXIT_IO: `io.count`, accesses (more than 1 for a string instruction with REP). */
  get ioCount(): number {
    return this.view.getUint32(O['io.count'], true);
  }
  /** Offset of the I/O data in this mapping (outside kvm_run, in the PIO page). */
  get ioDataOffset(): number {
    // A u64 that points inside the mapping: its low half is the whole value, read without a BigInt.
    return this.view.getUint32(O['io.data_offset'], true);
  }

  /** KVM_EXIT_MMIO: `mmio.phys_addr`. */
  get mmioPhysAddr(): bigint {
    return this.view.getBigUint64(O['mmio.phys_addr'], true);
  }
  /** mmioPhysAddr as a number, exact below 2^53 (all guest-physical space here), without a BigInt. */
  get mmioGuestPhysAddr(): number {
    return this.view.getUint32(O['mmio.phys_addr'], true) + this.view.getUint32(O['mmio.phys_addr'] + 4, true) * 0x1_0000_0000;
  }
  /** KVM_EXIT_MMIO: `mmio.len`, 1 to 8 bytes. */
  get mmioLen(): number {
    return this.view.getUint32(O['mmio.len'], true);
  }
  /** KVM_EXIT_MMIO: `mmio.is_write`. */
  get mmioIsWrite(): boolean {
    return this.view.getUint8(O['mmio.is_write']) !== 0;
  }
  /** The 8 data bytes of an MMIO exit: written by the guest, or to fill for a read. */
  get mmioData(): Uint8Array {
    return this.bytes.subarray(O['mmio.data'], O['mmio.data'] + 8);
  }
}
