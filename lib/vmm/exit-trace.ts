// The exit trace (MachineRuntimeConfig.traceExits): every vCPU exit as a fixed-size record, written
// by the vCPU's own thread into a buffer and from there to the file with a plain write() when the
// buffer fills or the vCPU leaves the machine: nothing goes to the main thread per exit. Every
// vCPU appends to the same file (O_APPEND, whole records per write), so records of different
// vCPUs come in runs; lib/debug/exit-trace-reader.ts orders them by time.
//
// File: a 32-byte header, then records of 40 bytes, all little-endian.
//   header  0 magic "NKVMTRCE" | 8 u16 version (1) | 10 u16 record size (40) | 12 u16 vCPUs
//           14 u16 flags (bit 0: RIP recorded) | 16 f64 start, ms since the epoch | 24 8 bytes reserved
//   record  0 f64 ns since the start | 8 u64 RIP | 16 u64 port or guest-physical address
//           24 8 bytes of data (the first element of a string I/O; IN and MMIO reads: the value the
//              VMM answered) | 32 u16 vCPU | 34 u8 kind (TraceKind) | 35 u8 size in bytes
//           36 u16 count (string I/O repetitions) | 38 u16 the KVM exit reason
//
// RIP comes from the kvm_run page: with tracing on, the vCPU asks KVM to copy its registers there
// at every exit (KVM_CAP_SYNC_REGS, kvm_valid_regs), so no KVM_GET_REGS ioctl per exit.
import { closeSync, openSync, writeSync } from 'node:fs';
import { ExitReason, IoDirection } from '../kvm/constants.js';
import { systemError } from '../kvm/errors.js';

export const TRACE_MAGIC = 'NKVMTRCE';
export const TRACE_VERSION = 1;
export const TRACE_HEADER_BYTES = 32;
export const TRACE_RECORD_BYTES = 40;
export const TRACE_FLAG_RIP = 1;

export const TraceKind = { Other: 0, IoIn: 1, IoOut: 2, MmioRead: 3, MmioWrite: 4, Hlt: 5, Intr: 6 } as const;

// struct kvm_run: kvm_valid_regs, then the synced struct kvm_regs (RIP its 17th u64).
const KVM_VALID_REGS = 288;
const SYNC_RIP = 304 + 16 * 8;
const KVM_SYNC_X86_REGS = 1;
/** Records buffered per vCPU before a write. */
const BUFFER_RECORDS = 1638;

/** Creates the file and writes its header; returns its fd (closed by closeTraceFile) and start. */
export function openTraceFile(path: string, vcpus: number): { fd: number; startMs: number } {
  let fd: number;
  try {
    fd = openSync(path, 'w');
  } catch (error) {
    throw systemError(`cannot create the exit trace ${path}: ${(error as NodeJS.ErrnoException).code ?? (error as Error).message}`, error);
  }
  const startMs = performance.timeOrigin + performance.now();
  const header = Buffer.alloc(TRACE_HEADER_BYTES);
  header.write(TRACE_MAGIC, 0, 'latin1');
  header.writeUInt16LE(TRACE_VERSION, 8);
  header.writeUInt16LE(TRACE_RECORD_BYTES, 10);
  header.writeUInt16LE(vcpus, 12);
  header.writeUInt16LE(TRACE_FLAG_RIP, 14);
  header.writeDoubleLE(startMs, 16);
  try {
    writeSync(fd, header);
  } catch (error) {
    closeSync(fd);
    throw error;
  }
  // Appends from here on, from every vCPU thread.
  closeSync(fd);
  return { fd: openSync(path, 'a'), startMs };
}

/** A vCPU thread's writer: records into a buffer, written out as it fills and at flush(). */
export class TraceWriter {
  readonly #fd: number;
  readonly #vcpu: number;
  /** This thread's clock (performance.now()) at the trace's start. */
  readonly #originMs: number;
  readonly #bytes = new Uint8Array(BUFFER_RECORDS * TRACE_RECORD_BYTES);
  readonly #view = new DataView(this.#bytes.buffer);
  #used = 0;

  constructor(fd: number, vcpu: number, startMs: number) {
    this.#fd = fd;
    this.#vcpu = vcpu;
    this.#originMs = startMs - performance.timeOrigin;
  }

  /** Has KVM copy the registers into kvm_run at every exit (or stop doing so). */
  static syncRip(run: DataView, on: boolean): void {
    run.setUint32(KVM_VALID_REGS, on ? KVM_SYNC_X86_REGS : 0, true);
  }

  /** One exit, once it was handled; `atMs` is performance.now() when KVM_RUN returned. */
  record(reason: number, run: DataView, runBytes: Uint8Array, atMs: number): void {
    const view = this.#view;
    const bytes = this.#bytes;
    const at = this.#used;
    view.setFloat64(at, (atMs - this.#originMs) * 1e6, true);
    for (let i = 0; i < 8; i++) bytes[at + 8 + i] = runBytes[SYNC_RIP + i]!;
    let kind: number = TraceKind.Other;
    let address = 0;
    let addressHigh = 0;
    let size = 0;
    let count = 0;
    let dataOffset = 0;
    if (reason === ExitReason.Io) {
      kind = run.getUint8(32) === IoDirection.Out ? TraceKind.IoOut : TraceKind.IoIn;
      size = run.getUint8(33);
      address = run.getUint16(34, true);
      count = Math.min(run.getUint32(36, true), 0xffff);
      dataOffset = run.getUint32(40, true);
    } else if (reason === ExitReason.Mmio) {
      kind = run.getUint8(52) ? TraceKind.MmioWrite : TraceKind.MmioRead;
      address = run.getUint32(32, true);
      addressHigh = run.getUint32(36, true);
      size = Math.min(run.getUint32(48, true), 8);
      dataOffset = 40;
    } else if (reason === ExitReason.Hlt) {
      kind = TraceKind.Hlt;
    } else if (reason === ExitReason.Intr) {
      kind = TraceKind.Intr;
    }
    view.setUint32(at + 16, address, true);
    view.setUint32(at + 20, addressHigh, true);
    for (let i = 0; i < 8; i++) bytes[at + 24 + i] = i < size ? runBytes[dataOffset + i]! : 0;
    view.setUint16(at + 32, this.#vcpu, true);
    bytes[at + 34] = kind;
    bytes[at + 35] = size;
    view.setUint16(at + 36, count, true);
    view.setUint16(at + 38, reason, true);
    this.#used = at + TRACE_RECORD_BYTES;
    if (this.#used === bytes.length) this.flush();
  }

  /** Writes what is buffered. */
  flush(): void {
    for (let done = 0; done < this.#used;) done += writeSync(this.#fd, this.#bytes, done, this.#used - done);
    this.#used = 0;
  }
}
