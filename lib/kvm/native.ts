// Loads the addon. Only lib/kvm/ talks to it (and lib/migration/checksum.ts, for crc32c);
// everything else uses the typed classes.
import { existsSync, readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { ErrorCode, KvmError, NodeKvmError } from './errors.js';

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
  createEventFd(initialValue: number, semaphore: boolean, nonBlocking: boolean): number;
  createVcpu(vm: number, id: number): [handle: number, fd: number, kvmRun: ArrayBuffer];
  run(vcpu: number): number;
  kick(vcpu: number): boolean;
  kickSignal(): number;
  harvestDirtyRing(vcpu: number, out: Float64Array): number;
  closeVcpu(handle: number, kvmRun?: ArrayBuffer): void;
  memoryCreate(size: number, memfd: boolean, hugepages: boolean, mergeable: boolean): [id: number, fd: number];
  memoryMapFile(fd: number, offset: number, size: number, hugepages: boolean): number;
  memoryAttach(id: number): [buffer: ArrayBuffer, size: number, fd: number, backing: 'anonymous' | 'memfd' | 'file'];
  memoryRelease(id: number): void;
  memoryWrite(id: number, offset: number, data: Uint8Array): void;
  memoryFill(id: number, offset: number, length: number, byte: number): void;
  memoryPopulatedRanges(id: number): Float64Array;
  memoryDontneed(id: number, offset: number, length: number): void;
  memoryPopulate(id: number, offset: number, length: number): boolean;
  setSocketBuffers(fd: number, sendBytes: number, receiveBytes: number): [number, number];
  /** A close-on-exec duplicate of a stream socket fd. */
  dupSocket(fd: number): number;
  /** A non-blocking TAP fd with a 12-byte vnet header and no offloads, opened in `netns` if given: [fd, name]. */
  tapOpen(name: string, netns: string | null): [fd: number, name: string];
  /** A close-on-exec duplicate of a TAP fd opened elsewhere, set up as tapOpen's: [fd, name]. */
  tapAdopt(fd: number): [fd: number, name: string];
  /** fallocate(2): punch a hole (zero false) or zero the range (zero true), keeping the size. */
  fileDeallocate(fd: number, offset: number, length: number, zero: boolean): void;
  /** An open-file-description lock on the whole file (F_OFD_SETLK); a conflict throws EAGAIN. */
  fileLock(fd: number, kind: 'shared' | 'exclusive' | 'unlock'): void;
  memoryInfo(): { mappings: number; bytes: number };
  detachBuffer(buffer: ArrayBuffer): void;
  handleCount(): number;
  layout(): Layout;
  setThreadName(name: string): void;
  setThreadAffinity(cpus: number[]): void;
  /** Calls onReadable on this thread's event loop while fd is readable; returns close(). */
  watchFd(fd: number, onReadable: (status: number) => void): () => void;
  /** CRC-32C of the view's bytes continuing from `seed`; `portable` forces the table implementation. */
  crc32c(data: ArrayBufferView, seed: number, portable?: boolean): number;
}

// Defined in the one-file bundles (scripts/bundle.mjs), which know where the root is.
declare const NODE_KVM_PACKAGE_ROOT: string | undefined;

function packageRoot(): string {
  // A search costs a vCPU thread a fifth of a millisecond on its way to the guest.
  if (typeof NODE_KVM_PACKAGE_ROOT === 'string') return NODE_KVM_PACKAGE_ROOT;
  let dir = path.dirname(fileURLToPath(import.meta.url));
  for (;;) {
    const manifest = path.join(dir, 'package.json');
    if (existsSync(manifest) && JSON.parse(readFileSync(manifest, 'utf8')).name === 'node-kvm') return dir;
    const parent = path.dirname(dir);
    if (parent === dir) throw new NodeKvmError(ErrorCode.AddonNotFound, 'node-kvm: cannot find the package root');
    dir = parent;
  }
}

function load(): NativeBinding {
  const root = packageRoot();
  // NODE_KVM_ADDON selects another build of the same sources (the cmake-js one, for example).
  const candidates = process.env.NODE_KVM_ADDON
    ? [path.resolve(process.env.NODE_KVM_ADDON)]
    : [path.join(root, 'build', 'Release', 'node_kvm.node'), path.join(root, 'build', 'Debug', 'node_kvm.node')];
  const found = candidates.find((file) => existsSync(file));
  if (!found) {
    throw new NodeKvmError(ErrorCode.AddonNotFound, `node-kvm: the native addon is not built (looked for ${candidates.join(', ')}); run npm run build:native`);
  }
  const binding = createRequire(import.meta.url)(found) as NativeBinding;
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
