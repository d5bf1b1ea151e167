// A machine's disks: one virtio-blk device each (lib/devices/virtio-blk.ts), over a raw image
// file that the machine locks as QEMU does. What is common to every virtio device (the slot, its
// eventfds and thread) is lib/vmm/virtio-devices.ts.
import { closeSync, openSync } from 'node:fs';
import { BLK_ID_BYTES, blkModel, diskIdBytes, diskSectors, type DiskConfig } from '../devices/virtio-blk.js';
import { VIRTIO_MAX_DEVICES } from '../devices/virtio-mmio.js';
import { argTypeError, argValueError, NodeKvmError, outOfRangeError, systemError } from '../kvm/errors.js';
import { dupFile, lockFile, unlockFile } from '../kvm/host.js';
import type { OpenedDevice } from './virtio-control.js';

export type { DiskConfig } from '../devices/virtio-blk.js';

/** A disk as a machine's shape records it: enough to check that a saved state fits. */
export interface DiskShape {
  path: string;
  readOnly: boolean;
  sectors: number;
  id: string;
}

/** An open image: its lock is taken and given up while the machine lives (migrations hand it over). */
export interface OpenDisk {
  readonly shape: DiskShape;
  readonly fd: number;
  /** Holds its image's lock (shared if read-only, exclusive if writable). */
  locked: boolean;
}

/** A disk's configuration, checked, with its defaults filled in (an fd only if one was given). */
export type CheckedDiskConfig = Required<Omit<DiskConfig, 'fd'>> & { fd?: number };

/** Checks a `disks` configuration; returns it with defaults filled in. */
export function checkDiskConfigs(disks: unknown): CheckedDiskConfig[] {
  if (disks === undefined) return [];
  if (!Array.isArray(disks)) throw argTypeError('disks must be an array of { path, readOnly?, id? }');
  if (disks.length > VIRTIO_MAX_DEVICES) throw outOfRangeError(`at most ${VIRTIO_MAX_DEVICES} disks, got ${disks.length}`);
  return disks.map((disk: unknown, index) => {
    if (typeof disk !== 'object' || disk === null) throw argTypeError(`disks[${index}] must be an object`);
    const { path: file, readOnly, id, fd } = disk as DiskConfig;
    if (typeof file !== 'string' || file === '') throw argTypeError(`disks[${index}].path must be a file path`);
    if (readOnly !== undefined && typeof readOnly !== 'boolean') throw argTypeError(`disks[${index}].readOnly must be a boolean`);
    if (id !== undefined && typeof id !== 'string') throw argTypeError(`disks[${index}].id must be a string of at most ${BLK_ID_BYTES} bytes`);
    if (id !== undefined && new TextEncoder().encode(id).length > BLK_ID_BYTES) {
      throw argValueError(`disks[${index}].id must be a string of at most ${BLK_ID_BYTES} bytes`);
    }
    if (fd !== undefined && (typeof fd !== 'number' || !Number.isInteger(fd) || fd < 0 || fd > 0x7fffffff)) throw argTypeError(`disks[${index}].fd must be an open fd`);
    return { path: file, readOnly: readOnly ?? false, id: id ?? new TextDecoder().decode(diskIdBytes({ path: file })), ...(fd !== undefined ? { fd } : {}) };
  });
}

/** Opens disk `index`'s image (not yet locked): the device for its slot. */
export function openDisk(index: number, config: CheckedDiskConfig): OpenedDevice {
  let fd: number;
  try {
    fd = config.fd !== undefined ? dupFile(config.fd, !config.readOnly) : openSync(config.path, config.readOnly ? 'r' : 'r+');
  } catch (error) {
    const e = error as NodeJS.ErrnoException;
    const what = config.fd !== undefined ? `take fd ${config.fd} for ${config.path}` : `open ${config.path}`;
    throw systemError(`disk ${index}: cannot ${what}${config.readOnly ? '' : ' for writing'}: ${e.code === 'ERR_INVALID_ARG_VALUE' ? e.message : e.code ?? e.message}`, error);
  }
  try {
    const sectors = diskSectors(fd);
    if (sectors === 0) throw argValueError(`disk ${index}: ${config.path} is smaller than one 512-byte sector`);
    const shape: DiskShape = { path: config.path, readOnly: config.readOnly, sectors, id: config.id };
    const disk: OpenDisk = { shape, fd, locked: false };
    return {
      name: `virtio-blk${index}`, model: blkModel(sectors, config.readOnly),
      data: { kind: 'blk', disk: { fd, path: shape.path, sectors, readOnly: shape.readOnly, id: diskIdBytes(shape) } },
      disk,
      close: () => closeSync(fd),
    };
  } catch (error) {
    closeSync(fd);
    throw error;
  }
}

/**
 * Takes each image's lock, as QEMU does: shared for a read-only disk, exclusive for a writable
 * one, so that two machines (in two processes, or two in one) never write one image at once.
 * Throws, holding none of them, if another machine holds one.
 */
export function lockDisks(disks: OpenDisk[]): void {
  const taken: OpenDisk[] = [];
  for (const [index, disk] of disks.entries()) {
    if (disk.locked) continue;
    if (!lockFile(disk.fd, disk.shape.readOnly ? 'shared' : 'exclusive')) {
      for (const held of taken) releaseLock(held);
      const what = disk.shape.readOnly ? 'is open for writing by another machine' : 'is in use by another machine';
      throw new NodeKvmError('EBUSY', `disk ${index}: ${disk.shape.path} ${what} (it holds a lock on the image)`);
    }
    disk.locked = true;
    taken.push(disk);
  }
}

export function releaseLock(disk: OpenDisk): void {
  if (!disk.locked) return;
  unlockFile(disk.fd);
  disk.locked = false;
}
