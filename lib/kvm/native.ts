// Loads the addon. Only lib/kvm/ talks to it (and lib/migration/checksum.ts, for crc32c);
// everything else uses the typed classes.
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import nodeGypBuild from 'node-gyp-build';
import { ErrorCode, KvmError, NodeKvmError } from './errors.js';
import { packageRoot } from './package-root.js';

export interface Layout {
  sizes: Record<string, number>;
  offsets: Record<string, number>;
  constants: Record<string, number>;
}

export interface NativeBinding {
  setErrorClass(errorClass: typeof KvmError): void;
  ioctlOps(): Record<string, number>;
  ioctl(handle: number, op: number, arg?: Uint8Array | number | bigint): number;
  openSystem(path: string): number;
  closeSystem(handle: number): void;
  createVm(system: number, type: number): [handle: number, fd: number];
  vmFromFd(fd: number): number;
  setUserMemoryRegion(
    vm: number, slot: number, flags: number, guestPhysAddr: number | bigint,
    memory: number, offset: number | bigint, size: number | bigint,
  ): void;
  getDirtyLog(vm: number, slot: number, into?: Uint8Array): Uint8Array;
  clearDirtyLog(vm: number, slot: number, firstPage: number, numPages: number, bitmap?: Uint8Array): void;
  closeVm(handle: number): void;
  /** closeVm() on libuv's pool: the handle is gone at once, the promise resolves once the fd is closed. */
  closeVmAsync(handle: number): Promise<void>;
  createEventFd(initialValue: number, semaphore: boolean, nonBlocking: boolean): number;
  createVcpu(vm: number, id: number): [handle: number, fd: number, kvmRun: ArrayBuffer];
  /** Hands a vCPU this thread owns to whichever thread adopts it; detaches `kvmRun` (this thread's buffer). */
  releaseVcpu(handle: number, kvmRun: ArrayBuffer): void;
  /** A released vCPU becomes the calling thread's. */
  adoptVcpu(handle: number): [handle: number, fd: number, kvmRun: ArrayBuffer];
  /** Closes a released vCPU no thread adopted (any thread); false if there was none. */
  closeReleasedVcpu(handle: number): boolean;
  run(vcpu: number): number;
  kick(vcpu: number): boolean;
  kickSignal(): number;
  harvestDirtyRing(vcpu: number, out: Float64Array): number;
  closeVcpu(handle: number, kvmRun?: ArrayBuffer): void;
  /** The vCPU's whole state as raw KVM structs in one buffer (native/vcpu-state.cc); flags: 1 LAPIC, 2 halted by the VMM. */
  saveVcpuState(vcpu: number, msrIndices: Uint32Array, cpuid: Uint8Array, flags: number): Uint8Array;
  /** saveVcpuState() from any thread, for a vCPU whose thread is parked (by its kick handle). */
  saveParkedVcpuState(kickHandle: number, msrIndices: Uint32Array, cpuid: Uint8Array, flags: number): Uint8Array;
  /** Null, or what is wrong with a saveVcpuState() buffer. */
  checkVcpuState(state: Uint8Array): string | null;
  /** Puts a saveVcpuState() buffer back; returns the MSRs the host refused. */
  restoreVcpuState(vcpu: number, state: Uint8Array, currentCpuid: Uint8Array | null, irqchip: boolean): number[];
  /** restoreVcpuState() from any thread, for a vCPU whose thread is parked (by its kick handle). */
  restoreParkedVcpuState(kickHandle: number, state: Uint8Array, currentCpuid: Uint8Array | null, irqchip: boolean): number[];
  /** The VM's irqchips, PIT and clock as raw KVM structs in one buffer (native/vm-state.cc). */
  saveVmState(vm: number, irqchip: boolean): Uint8Array;
  /** Null, or what is wrong with a saveVmState() buffer. */
  checkVmState(state: Uint8Array): string | null;
  /** Puts a saveVmState() buffer back (checked whole first). */
  restoreVmState(vm: number, state: Uint8Array, irqchip: boolean): void;
  memoryCreate(size: number, memfd: boolean, hugepages: boolean, mergeable: boolean): [id: number, fd: number];
  memoryMapFile(fd: number, offset: number, size: number, hugepages: boolean): number;
  /** A new fd of the memfd behind anonymous or memfd memory (the caller closes it). */
  memoryShareFd(id: number): number;
  /** Maps a sealed memfd of exactly `size` bytes (checked): [id, exposed fd or -1]. */
  memoryFromFd(fd: number, size: number, expose: boolean): [id: number, fd: number];
  /** Maps `otherId`'s memfd over memory `id`'s addresses, in place. */
  memoryReplace(id: number, otherId: number): void;
  /** Maps the file open as `fd`, from `offset`, copy-on-write over memory `id`'s addresses, in place. */
  memoryMapFileOver(id: number, fd: number, offset: number): void;
  memoryAttach(id: number): [buffer: ArrayBuffer, size: number, fd: number, backing: 'anonymous' | 'memfd' | 'file'];
  memoryRelease(id: number): void;
  memoryRetain(id: number): number;
  memoryWrite(id: number, offset: number, data: Uint8Array): void;
  memoryFill(id: number, offset: number, length: number, byte: number): void;
  memoryPopulatedRanges(id: number): Float64Array;
  memoryDontneed(id: number, offset: number, length: number): void;
  memoryDontneedAsync(id: number, offset: number, length: number): Promise<void>;
  memoryPopulate(id: number, offset: number, length: number): boolean;
  setSocketBuffers(fd: number, sendBytes: number, receiveBytes: number): [number, number];
  /** A close-on-exec duplicate of a stream socket fd. */
  dupSocket(fd: number): number;
  /** recv(2) with MSG_DONTWAIT, spinning for maxMs at most: bytes read, 0 at the end of the stream, -1 if none came. */
  spinRead(fd: number, buffer: Uint8Array, maxMs: number): number;
  /** sendmsg(2) of all of `data`, the fds attached to its first byte (SCM_RIGHTS); unix stream sockets only. */
  sendWithFds(socketFd: number, data: Uint8Array, fds: number[]): void;
  /** One recvmsg(2): the bytes, the fds that came with them (the caller's to close), whether some were dropped; null if nothing is there yet. */
  receiveWithFds(socketFd: number, maxBytes: number, maxFds: number): [bytes: Buffer, fds: number[], fdsDropped: boolean] | null;
  /** A close-on-exec duplicate of a regular file or block device fd, open for reading (and writing if asked): the same open file description. */
  fileDup(fd: number, writable: boolean): number;
  /** A non-blocking TAP fd with a 12-byte vnet header and no offloads, opened in `netns` if given: [fd, name]. */
  tapOpen(name: string, netns: string | null): [fd: number, name: string];
  /** A close-on-exec duplicate of a TAP fd opened elsewhere, set up as tapOpen's: [fd, name]. */
  tapAdopt(fd: number): [fd: number, name: string];
  /** fallocate(2): punch a hole (zero false) or zero the range (zero true), keeping the size. */
  fileDeallocate(fd: number, offset: number, length: number, zero: boolean): void;
  /** An open-file-description lock on the whole file (F_OFD_SETLK); a conflict throws EAGAIN. */
  fileLock(fd: number, kind: 'shared' | 'exclusive' | 'unlock'): void;
  /** lseek(SEEK_DATA/SEEK_HOLE): [offset, length] pairs of the file's data within [start, end), page-rounded. */
  fileDataRanges(fd: number, start: number, end: number): Float64Array;
  fileIdentity(fd: number): [dev: bigint, ino: bigint, size: number, regular: boolean];
  memoryInfo(): { mappings: number; bytes: number };
  memoryUnmapsSettled(): Promise<void>;
  detachBuffer(buffer: ArrayBuffer): void;
  handleCount(): number;
  layout(): Layout;
  setThreadName(name: string): void;
  setThreadAffinity(cpus: number[]): void;
  setThreadBatch(batch: boolean): void;
  /** Calls onReadable on this thread's event loop while fd is readable; returns close(). */
  watchFd(fd: number, onReadable: (status: number) => void): () => void;
  /** CRC-32C of the view's bytes continuing from `seed`; `portable` forces the table implementation. */
  crc32c(data: ArrayBufferView, seed: number, portable?: boolean): number;
  /** MADV_DONTFORK over the buffer's whole pages; false if the kernel refused. */
  keepFromChildren(buffer: ArrayBuffer): boolean;
  encodePagesSection(ram: Uint8Array, ranges: Float64Array, rangeCount: number, destinationZeroed: boolean, out: Uint8Array, sectionType: number): [number, number, number];
  encodeLivePagesSection(ram: Uint8Array, ranges: Float64Array, rangeCount: number, destinationZeroed: boolean, out: Uint8Array, sectionType: number, dataRuns: Float64Array): [number, number, number, number];
  /** A non-blocking userfaultfd with the guest memory registered for MISSING faults: [id, fd]. */
  uffdOpen(memory: number): [id: number, fd: number];
  /** Page indexes of pending faults into `out`; returns how many. */
  uffdReadFaults(id: number, out: Float64Array): number;
  /** UFFDIO_COPY of whole pages from firstPage; returns pages placed (EEXIST: skipped). */
  uffdCopy(id: number, firstPage: number, data: Uint8Array): number;
  /** UFFDIO_ZEROPAGE; returns pages placed. */
  uffdZero(id: number, firstPage: number, pageCount: number): number;
  uffdWake(id: number, firstPage: number, pageCount: number): void;
  uffdClose(id: number): void;
}

/**
 * The addon's file: NODE_KVM_ADDON if set (another build of the same sources, the cmake-js one for
 * example), else what node-gyp-build picks: a build of this checkout (build/Release, then
 * build/Debug) before the prebuilt binary the package ships for this platform (prebuilds/).
 */
export function addonFile(root: string): string {
  const chosen = process.env.NODE_KVM_ADDON;
  if (chosen) {
    const file = path.resolve(chosen);
    if (!existsSync(file)) throw new NodeKvmError(ErrorCode.AddonNotFound, `node-kvm: NODE_KVM_ADDON names ${file}, which does not exist`);
    return file;
  }
  try {
    return nodeGypBuild.resolve(root);
  } catch (cause) {
    throw new NodeKvmError(ErrorCode.AddonNotFound,
      `node-kvm: no native addon fits this host: neither a build in ${path.join(root, 'build')} nor a prebuilt binary in ${path.join(root, 'prebuilds')}; `
      + 'build one with npm run build:native (needs g++, make and python3)', { cause });
  }
}

function load(): NativeBinding {
  const binding = createRequire(import.meta.url)(addonFile(packageRoot())) as NativeBinding;
  binding.setErrorClass(KvmError);
  return binding;
}

export const native: NativeBinding = load();

/** Ioctl op numbers by kernel name (KVM_GET_REGS, ...). */
export const ops: Readonly<Record<string, number>> = native.ioctlOps();

export function op(name: string): number {
  const value = ops[name];
  if (value === undefined) throw new NodeKvmError(ErrorCode.AddonMismatch, `node-kvm: the addon does not know ${name}; rebuild it (npm run build:native)`);
  return value;
}
