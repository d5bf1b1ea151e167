// The system handle (/dev/kvm): capabilities, host-supported CPUID and MSRs, and VM creation.
import { Cap } from './constants.js';
import { KvmError, explainOpenError, argTypeError } from './errors.js';
import { Handle, checkInteger } from './handle.js';
import { decodeCpuid, decodeList, decodeMsrList, emptyList, emptyMsrList, encodeMsrIndices, listCount } from './lists.js';
import { native, op } from './native.js';
import { kvmCpuidEntry2, kvmMsrEntry, type CpuidEntry, type MsrEntry } from './structs.js';
import { Vm } from './vm.js';

const OPS = {
  apiVersion: op('KVM_GET_API_VERSION'),
  checkExtension: op('KVM_CHECK_EXTENSION'),
  vcpuMmapSize: op('KVM_GET_VCPU_MMAP_SIZE'),
  supportedCpuid: op('KVM_GET_SUPPORTED_CPUID'),
  emulatedCpuid: op('KVM_GET_EMULATED_CPUID'),
  msrIndexList: op('KVM_GET_MSR_INDEX_LIST'),
  msrFeatureIndexList: op('KVM_GET_MSR_FEATURE_INDEX_LIST'),
  getMsrs: op('KVM_GET_MSRS(system)'),
};

/** The KVM API version every kernel since 2.6.22 reports (KVM_API_VERSION). */
export const KVM_API_VERSION = 12;

/** The `/dev/kvm` system fd (Kvm.open()): the API version, capabilities, supported CPUID and MSRs, and VMs. */
export class Kvm extends Handle {
  readonly #handle: number;

  private constructor(handle: number) {
    super('Kvm', () => native.closeSystem(handle));
    this.#handle = handle;
  }

  /** Opens the KVM device. A missing or forbidden device gets a message saying how to fix it. */
  static open(path = '/dev/kvm'): Kvm {
    if (typeof path !== 'string') throw argTypeError(`path must be a string, got ${typeof path}`);
    let handle: number;
    try {
      handle = native.openSystem(path);
    } catch (error) {
      throw error instanceof KvmError && error.syscall.startsWith('open(') ? explainOpenError(error, path) : error;
    }
    const kvm = new Kvm(handle);
    if (kvm.apiVersion !== KVM_API_VERSION) {
      kvm.close();
      throw new KvmError('ENOTSUP', -95, 'ioctl(KVM_GET_API_VERSION)', `${path} speaks KVM API ${kvm.apiVersion}, not ${KVM_API_VERSION}`);
    }
    return kvm;
  }

  #ioctl(opNumber: number, arg?: Uint8Array | number | bigint): number {
    return native.ioctl(this.#handle, opNumber, arg);
  }

  /** KVM_GET_API_VERSION: 12 on every kernel since 2.6.22 (KVM_API_VERSION). */
  get apiVersion(): number {
    return this.#ioctl(OPS.apiVersion);
  }

  /** KVM_CHECK_EXTENSION: 0 if unsupported, else 1 or a capability-specific number. */
  checkExtension(cap: number): number {
    return this.#ioctl(OPS.checkExtension, checkInteger(cap, 'cap', 0, 0xffffffff));
  }

  /** Size of the mmap'd kvm_run region of each vCPU. */
  get vcpuMmapSize(): number {
    return this.#ioctl(OPS.vcpuMmapSize);
  }

  /** The most vCPUs a VM may have (KVM_CAP_MAX_VCPUS, else KVM_CAP_NR_VCPUS). */
  get maxVcpus(): number {
    return this.checkExtension(Cap.MaxVcpus) || this.checkExtension(Cap.NrVcpus) || 4;
  }

  /** The number of memory slots a VM may have (KVM_CAP_NR_MEMSLOTS). */
  get nrMemslots(): number {
    return this.checkExtension(Cap.NrMemslots) || 32;
  }

  #cpuid(opNumber: number): CpuidEntry[] {
    let capacity = 256;
    for (;;) {
      const buffer = emptyList(kvmCpuidEntry2, capacity);
      try {
        this.#ioctl(opNumber, buffer);
        return decodeCpuid(buffer);
      } catch (error) {
        if (!(error instanceof KvmError) || error.code !== 'E2BIG' || capacity >= 4096) throw error;
        capacity *= 2;
      }
    }
  }

  /** CPUID leaves KVM can offer a guest (KVM_GET_SUPPORTED_CPUID): the base for setCpuid2. */
  getSupportedCpuid(): CpuidEntry[] {
    return this.#cpuid(OPS.supportedCpuid);
  }

  /** CPUID leaves KVM emulates (KVM_GET_EMULATED_CPUID). */
  getEmulatedCpuid(): CpuidEntry[] {
    return this.#cpuid(OPS.emulatedCpuid);
  }

  #msrList(opNumber: number): number[] {
    let capacity = 256;
    for (;;) {
      const buffer = emptyMsrList(capacity);
      try {
        this.#ioctl(opNumber, buffer);
        return decodeMsrList(buffer);
      } catch (error) {
        if (!(error instanceof KvmError) || error.code !== 'E2BIG' || capacity >= 16384) throw error;
        capacity = Math.max(capacity * 2, listCount(buffer));
      }
    }
  }

  /** MSRs KVM saves and restores for a guest (KVM_GET_MSR_INDEX_LIST). */
  getMsrIndexList(): number[] {
    return this.#msrList(OPS.msrIndexList);
  }

  /** Feature MSRs readable with getMsrs() (KVM_GET_MSR_FEATURE_INDEX_LIST). */
  getMsrFeatureIndexList(): number[] {
    return this.#msrList(OPS.msrFeatureIndexList);
  }

  /** Reads feature MSRs (KVM_GET_MSRS on /dev/kvm). */
  getMsrs(indices: readonly number[]): MsrEntry[] {
    const buffer = encodeMsrIndices(indices);
    const read = this.#ioctl(OPS.getMsrs, buffer);
    if (read < indices.length) {
      throw new KvmError('EINVAL', -22, 'ioctl(KVM_GET_MSRS)', `feature MSR 0x${indices[read]!.toString(16)} cannot be read`);
    }
    return decodeList(kvmMsrEntry, buffer);
  }

  /** KVM_CREATE_VM. `type` 0 is the default machine type. */
  createVm(type = 0): Vm {
    const [handle, fd] = native.createVm(this.#handle, checkInteger(type, 'type', 0, 255));
    return new Vm(handle, fd, true);
  }

  protected release(): void {
    native.closeSystem(this.#handle);
  }
}
