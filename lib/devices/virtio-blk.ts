// virtio-blk (virtio 1.x 5.2) backed by a raw image file. Requests run on the device's own thread
// (lib/vmm/virtio-worker.ts) with synchronous file I/O straight between the file and guest RAM:
// no copy, and the guest's vCPUs run on meanwhile. A completed write is in the file (the page
// cache); a completed FLUSH is on the disk (fdatasync). Read-only disks refuse every change.
import { fdatasyncSync, fstatSync, readvSync, writevSync } from 'node:fs';
import { deallocateFileRange } from '../kvm/host.js';
import type { DirtyPageMarker } from './bus-device.js';
import { DescriptorChain, readFromChain, SplitQueue, VirtqueueError, writeToChain } from './virtqueue.js';
import { Interrupt, type VirtioDeviceModel, type VirtioMmio } from './virtio-mmio.js';

export const VIRTIO_ID_BLOCK = 2;
export const SECTOR_BYTES = 512;
export const BLK_ID_BYTES = 20;
export const BLK_QUEUE_SIZE = 256;

export const BlkFeature = {
  SegMax: 2n, Ro: 5n, BlkSize: 6n, Flush: 9n, Discard: 13n, WriteZeroes: 14n,
} as const;
export const BlkRequest = { In: 0, Out: 1, Flush: 4, GetId: 8, Discard: 11, WriteZeroes: 13 } as const;
export const BlkStatus = { Ok: 0, IoErr: 1, Unsupp: 2 } as const;

const HEADER_BYTES = 16;
const SEGMENT_BYTES = 16;
/** Most data buffers in one request (seg_max), and most ranges in one discard/write-zeroes. */
const SEG_MAX = 128;
const MAX_DISCARD_SEGMENTS = 16;
/** Largest discard/write-zeroes range: 2^32-1 sectors would do, but keep one request's work bounded. */
const MAX_DISCARD_SECTORS = 1 << 22; // 2 GiB
const ZEROES = new Uint8Array(1024 * 1024);

/** A disk as the machine's configuration names it. */
export interface DiskConfig {
  /** A raw image file; its size (rounded down to 512 bytes) is the disk's capacity. */
  path: string;
  /** The guest can read but not change it (VIRTIO_BLK_F_RO; writes fail with IOERR). Default false. */
  readOnly?: boolean;
  /** What GET_ID returns (at most 20 bytes). Default: the file's name, truncated. */
  id?: string;
  /**
   * Instead of opening `path`: an fd open on the image (for reading, and writing unless
   * readOnly), as a migration on this host hands it over. The machine works on a duplicate (the
   * same open file, with its lock); the caller keeps and closes its own. `path` still names it.
   */
  fd?: number;
}

/** The config space (struct virtio_blk_config) and features of a disk of `sectors` sectors. */
export function blkModel(sectors: number, readOnly: boolean): VirtioDeviceModel {
  const config = new Uint8Array(60);
  const view = new DataView(config.buffer);
  view.setBigUint64(0, BigInt(sectors), true); // capacity
  view.setUint32(12, SEG_MAX, true); // seg_max
  view.setUint32(20, SECTOR_BYTES, true); // blk_size
  view.setUint32(36, MAX_DISCARD_SECTORS, true); // max_discard_sectors
  view.setUint32(40, MAX_DISCARD_SEGMENTS, true); // max_discard_seg
  view.setUint32(44, 1, true); // discard_sector_alignment
  view.setUint32(48, MAX_DISCARD_SECTORS, true); // max_write_zeroes_sectors
  view.setUint32(52, MAX_DISCARD_SEGMENTS, true); // max_write_zeroes_seg
  view.setUint8(56, 1); // write_zeroes_may_unmap
  let features = (1n << BlkFeature.SegMax) | (1n << BlkFeature.BlkSize) | (1n << BlkFeature.Flush) | (1n << 28n) | (1n << 29n);
  features |= readOnly ? 1n << BlkFeature.Ro : (1n << BlkFeature.Discard) | (1n << BlkFeature.WriteZeroes);
  return { deviceId: VIRTIO_ID_BLOCK, features, numQueues: 1, queueNumMax: BLK_QUEUE_SIZE, config };
}

/** The disk's capacity in sectors, from the open file. */
export function diskSectors(fd: number): number {
  return Math.floor(fstatSync(fd).size / SECTOR_BYTES);
}

/** GET_ID bytes for a disk: the configured id, else the file name, at most 20 bytes. */
export function diskIdBytes(config: DiskConfig): Uint8Array {
  const encoder = new TextEncoder();
  let text = config.id ?? config.path.split('/').pop() ?? '';
  // Whole characters only, so the id decodes back to itself.
  while (encoder.encode(text).length > BLK_ID_BYTES) text = [...text].slice(0, -1).join('');
  return encoder.encode(text);
}

/** The disk a device serves: an open image file. */
export interface BlockDisk {
  fd: number;
  /** The image's path, for messages. */
  path: string;
  sectors: number;
  readOnly: boolean;
  /** GET_ID bytes (diskIdBytes). */
  id: Uint8Array;
}

/**
 * A virtio-blk device's queue side: takes requests from its queue, performs them on the disk and
 * returns them. Runs on the device's own thread; the registers are `mmio`'s shared words.
 */
export class VirtioBlkDevice {
  readonly #mmio: VirtioMmio;
  readonly #queue: SplitQueue;
  readonly #backend: BlockBackend;
  readonly #chain = new DescriptorChain();
  readonly #logged = new Set<string>();
  readonly #log: (message: string) => void;
  readonly #problem = (message: string) => {
    if (this.#logged.has(message) || this.#logged.size >= 32) return;
    this.#logged.add(message);
    this.#log(`${this.#mmio.name}: ${message}`);
  };

  constructor(options: { mmio: VirtioMmio; ram: Uint8Array; dirty: DirtyPageMarker; disk: BlockDisk; log: (message: string) => void }) {
    this.#mmio = options.mmio;
    this.#log = options.log;
    this.#queue = new SplitQueue(options.ram, options.mmio, 0, options.dirty);
    this.#backend = new BlockBackend({ ...options.disk, ram: options.ram, dirty: options.dirty });
  }

  /** Flushes what was written since the last flush (before a pause: another host may take over). */
  flush(): void {
    if (!this.#backend.unflushed) return;
    fdatasyncSync(this.#backend.fd);
    this.#backend.unflushed = false;
  }

  /**
   * Polls the ring for new requests for up to `ms` (the driver, told not to notify meanwhile,
   * saves its notify exit); true as soon as there are some. On timeout, asks for notifies again
   * and takes a last look, so that a request added at that moment is not left asleep.
   */
  pollForRequests(ms: number, mayGoOn: () => boolean): boolean {
    const queue = this.#queue;
    try {
      if (!this.#mmio.live || !queue.load()) return false;
      queue.suppressNotification();
      const deadline = performance.now() + ms;
      do {
        if (queue.pending() > 0) return true;
      } while (performance.now() < deadline && mayGoOn());
      return queue.armNotification();
    } catch {
      return true; // serve() reports what is wrong
    }
  }

  /**
   * Serves every available request, stopping early when `mayGoOn()` turns false (checked between
   * requests) or the driver resets the device. A broken ring sets NEEDS_RESET. Returns how many
   * requests completed.
   */
  serve(mayGoOn: () => boolean): number {
    const mmio = this.#mmio;
    if (!mmio.live) return 0;
    const generation = mmio.resetGeneration;
    const queue = this.#queue;
    const chain = this.#chain;
    let used = 0;
    try {
      if (!queue.load()) return 0;
      for (let stopped = false; !stopped;) {
        let count = queue.pending();
        if (count === 0) {
          if (queue.armNotification()) continue;
          break;
        }
        for (; count > 0; count--) {
          if (!mayGoOn()) {
            stopped = true;
            break;
          }
          queue.pop(chain);
          const written = this.#backend.handle(chain, this.#problem);
          // A reset while we worked: the request belongs to a driver that is gone.
          if (mmio.resetGeneration !== generation) return used;
          queue.pushUsed(chain.head, written);
          used++;
        }
      }
    } catch (e) {
      if (mmio.resetGeneration === generation) mmio.needsReset(e instanceof VirtqueueError ? e.message : `device error: ${(e as Error).message}`);
      return used;
    }
    if (used > 0 && queue.needsInterrupt()) mmio.interrupt(Interrupt.UsedBuffer);
    return used;
  }
}

/** Performs block requests on one disk. Built on the device's thread. */
export class BlockBackend {
  readonly fd: number;
  readonly #path: string;
  readonly #sectors: number;
  readonly #readOnly: boolean;
  readonly #id: Uint8Array;
  readonly #ram: Uint8Array;
  readonly #view: DataView;
  readonly #dirty: DirtyPageMarker;
  readonly #header = new Uint8Array(HEADER_BYTES);
  readonly #headerView = new DataView(this.#header.buffer);
  readonly #segment = new Uint8Array(SEGMENT_BYTES);
  readonly #segmentView = new DataView(this.#segment.buffer);
  /** Whether a write reached the file since the last fdatasync (a pause flushes only then). */
  unflushed = false;
  #canZeroRange = true;
  #canPunchHole = true;

  constructor(options: BlockDisk & { ram: Uint8Array; dirty: DirtyPageMarker }) {
    this.fd = options.fd;
    this.#path = options.path;
    this.#sectors = options.sectors;
    this.#readOnly = options.readOnly;
    this.#id = options.id;
    this.#ram = options.ram;
    this.#view = new DataView(options.ram.buffer, options.ram.byteOffset, options.ram.byteLength);
    this.#dirty = options.dirty;
  }

  /**
   * Serves one request; returns the bytes written into the chain's writable buffers (status
   * included; 0 if the chain has no room for a status byte, so nothing can be reported).
   * `problem` receives why a request failed, for the device's log.
   */
  handle(chain: DescriptorChain, problem: (message: string) => void): number {
    if (chain.writableBytes < 1) {
      problem('a request with no device-writable byte for its status');
      return 0;
    }
    if (chain.readableBytes < HEADER_BYTES) {
      problem(`a request with ${chain.readableBytes} readable bytes (needs a 16-byte header)`);
      this.#writeStatus(chain, BlkStatus.IoErr);
      return 1;
    }
    readFromChain(this.#ram, chain, 0, this.#header);
    const type = this.#headerView.getUint32(0, true);
    const sector = this.#headerView.getUint32(8, true) + this.#headerView.getUint32(12, true) * 0x1_0000_0000;
    let status: number;
    let written = 0;
    try {
      switch (type) {
        case BlkRequest.In:
          written = this.#read(chain, sector, problem);
          status = written < 0 ? BlkStatus.IoErr : BlkStatus.Ok;
          written = Math.max(written, 0);
          break;
        case BlkRequest.Out:
          status = this.#write(chain, sector, problem) ? BlkStatus.Ok : BlkStatus.IoErr;
          break;
        case BlkRequest.Flush:
          if (!this.#readOnly) {
            fdatasyncSync(this.fd);
            this.unflushed = false;
          }
          status = BlkStatus.Ok;
          break;
        case BlkRequest.GetId:
          written = this.#getId(chain);
          status = BlkStatus.Ok;
          break;
        case BlkRequest.Discard:
        case BlkRequest.WriteZeroes:
          status = this.#deallocate(chain, type === BlkRequest.WriteZeroes, problem) ? BlkStatus.Ok : BlkStatus.IoErr;
          break;
        default:
          problem(`request type ${type} is not supported`);
          status = BlkStatus.Unsupp;
      }
    } catch (error) {
      problem(`${this.#path}: I/O error: ${(error as Error).message}`);
      status = BlkStatus.IoErr;
    }
    this.#writeStatus(chain, status);
    return written + 1;
  }

  /** Reads into the writable buffers but the last byte (the status). -1 on a bad request. */
  #read(chain: DescriptorChain, sector: number, problem: (message: string) => void): number {
    const bytes = chain.writableBytes - 1;
    if (chain.readableBytes !== HEADER_BYTES) {
      this.#refuse(problem, 'a read request with device-readable data buffers');
      return -1;
    }
    if (!this.#inRange(sector, bytes, problem)) return -1;
    const views = this.#segments(chain, true, 0, bytes);
    if (views === null) {
      this.#refuse(problem, `a request of more than ${SEG_MAX} data buffers`);
      return -1;
    }
    let done = 0;
    const position = sector * SECTOR_BYTES;
    try {
      while (done < bytes) {
        const n = readvSync(this.fd, done === 0 ? views : this.#segmentsFrom(views, done), position + done);
        if (n === 0) {
          // The image shrank under the guest: zeros with status OK would pass for its data.
          const { size } = fstatSync(this.fd);
          problem(`${this.#path}: a read past the end of the image file, which has shrunk to ${size} bytes since the disk was opened (IOERR)`);
          return -1;
        }
        done += n;
      }
    } finally {
      // Whatever a read put in guest RAM, even a failed one, is data a migration must carry.
      for (const view of views) this.#dirty.mark(view.byteOffset - this.#ram.byteOffset, view.length);
    }
    return bytes;
  }

  #write(chain: DescriptorChain, sector: number, problem: (message: string) => void): boolean {
    if (this.#readOnly) return this.#refuse(problem, 'a write to a read-only disk');
    if (chain.writableBytes !== 1) return this.#refuse(problem, 'a write request with device-writable data buffers');
    const bytes = chain.readableBytes - HEADER_BYTES;
    if (!this.#inRange(sector, bytes, problem)) return false;
    const views = this.#segments(chain, false, HEADER_BYTES, bytes);
    if (views === null) return this.#refuse(problem, `a request of more than ${SEG_MAX} data buffers`);
    const position = sector * SECTOR_BYTES;
    let done = 0;
    while (done < bytes) done += writevSync(this.fd, done === 0 ? views : this.#segmentsFrom(views, done), position + done);
    if (bytes > 0) this.unflushed = true;
    return true;
  }

  #getId(chain: DescriptorChain): number {
    const room = chain.writableBytes - 1;
    const id = new Uint8Array(BLK_ID_BYTES);
    id.set(this.#id);
    const bytes = Math.min(room, BLK_ID_BYTES);
    writeToChain(this.#ram, this.#dirty, chain, 0, id.subarray(0, bytes));
    return bytes;
  }

  #deallocate(chain: DescriptorChain, zero: boolean, problem: (message: string) => void): boolean {
    const what = zero ? 'write-zeroes' : 'discard';
    if (this.#readOnly) return this.#refuse(problem, `a ${what} on a read-only disk`);
    const bytes = chain.readableBytes - HEADER_BYTES;
    if (chain.writableBytes !== 1 || bytes === 0 || bytes % SEGMENT_BYTES !== 0 || bytes / SEGMENT_BYTES > MAX_DISCARD_SEGMENTS) {
      return this.#refuse(problem, `a ${what} request with ${bytes} bytes of ranges`);
    }
    for (let at = HEADER_BYTES; at < HEADER_BYTES + bytes; at += SEGMENT_BYTES) {
      readFromChain(this.#ram, chain, at, this.#segment);
      const sector = this.#segmentView.getUint32(0, true) + this.#segmentView.getUint32(4, true) * 0x1_0000_0000;
      const count = this.#segmentView.getUint32(8, true);
      if (count > MAX_DISCARD_SECTORS) return this.#refuse(problem, `a ${what} of ${count} sectors (at most ${MAX_DISCARD_SECTORS})`);
      if (!this.#inRange(sector, count * SECTOR_BYTES, problem)) return false;
      if (count === 0) continue;
      this.#freeRange(sector * SECTOR_BYTES, count * SECTOR_BYTES, zero);
    }
    this.unflushed = true;
    return true;
  }

  /**
   * Frees (discard) or zeroes a byte range of the file. A discard the file system cannot do is
   * dropped, as the spec allows; zeroes it cannot allocate away are written.
   */
  #freeRange(offset: number, length: number, zero: boolean): void {
    if (zero ? this.#canZeroRange : this.#canPunchHole) {
      try {
        deallocateFileRange(this.fd, offset, length, zero);
        return;
      } catch (error) {
        const code = (error as NodeJS.ErrnoException).code;
        if (code !== 'EOPNOTSUPP' && code !== 'ENOSYS' && code !== 'EINVAL') throw error;
        if (zero) this.#canZeroRange = false;
        else this.#canPunchHole = false;
      }
    }
    if (!zero) return;
    for (let done = 0; done < length;) {
      const n = Math.min(ZEROES.length, length - done);
      done += writevSync(this.fd, [ZEROES.subarray(0, n)], offset + done);
    }
  }

  #inRange(sector: number, bytes: number, problem: (message: string) => void): boolean {
    if (bytes % SECTOR_BYTES !== 0) return this.#refuse(problem, `a transfer of ${bytes} bytes (not whole sectors)`);
    if (sector > this.#sectors || bytes / SECTOR_BYTES > this.#sectors - sector) {
      return this.#refuse(problem, `sectors ${sector}+${bytes / SECTOR_BYTES} are past the end of the disk (${this.#sectors} sectors)`);
    }
    return true;
  }

  /** Reports why a request fails; false, for the callers to return. */
  #refuse(problem: (message: string) => void, message: string): false {
    problem(message);
    return false;
  }

  /**
   * Views of guest RAM for `bytes` bytes of the chain's writable (or readable) buffers, skipping
   * the first `skip` bytes of them; null past SEG_MAX buffers.
   */
  #segments(chain: DescriptorChain, writable: boolean, skip: number, bytes: number): Uint8Array[] | null {
    const views: Uint8Array[] = [];
    let left = bytes;
    for (let i = 0; i < chain.length && left > 0; i++) {
      if ((chain.writable[i] === 1) !== writable) continue;
      let addr = chain.addr[i]!;
      let len = chain.len[i]!;
      if (skip >= len) {
        skip -= len;
        continue;
      }
      addr += skip;
      len -= skip;
      skip = 0;
      const n = Math.min(len, left);
      if (n === 0) continue;
      if (views.length === SEG_MAX) return null;
      views.push(this.#ram.subarray(addr, addr + n));
      left -= n;
    }
    return views;
  }

  /** The views after the first `done` bytes (a short readv/writev continues there). */
  #segmentsFrom(views: Uint8Array[], done: number): Uint8Array[] {
    const rest: Uint8Array[] = [];
    for (const view of views) {
      if (done >= view.length) {
        done -= view.length;
        continue;
      }
      rest.push(done > 0 ? view.subarray(done) : view);
      done = 0;
    }
    return rest;
  }



  /** The status is the last byte of the last writable buffer. */
  #writeStatus(chain: DescriptorChain, status: number): void {
    for (let i = chain.length - 1; i >= 0; i--) {
      if (!chain.writable[i] || chain.len[i] === 0) continue;
      const at = chain.addr[i]! + chain.len[i]! - 1;
      this.#view.setUint8(at, status);
      this.#dirty.mark(at, 1);
      return;
    }
  }
}
