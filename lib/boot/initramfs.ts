// An initramfs as Linux unpacks it (Documentation/driver-api/early-userspace/buffer-format.rst):
// a cpio archive in the "newc" format. Each member is a 110-byte ASCII header ("070701", then 13
// fields of 8 hex digits), its name with a terminating NUL padded so that header + name is a
// multiple of 4, then its data padded to 4 (fields as lowercase hex, as that document shows them).
// A member named "TRAILER!!!" ends the archive.
// Uncompressed: the kernel takes that as it is, and the loader has nothing to decompress.
import { argTypeError, argValueError, outOfRangeError } from '../kvm/errors.js';

/** One entry of buildInitramfs()'s archive: a file (its data bytes or text), a directory, a symlink or a device node, with its mode and owner. */
export type InitramfsEntry =
  | { type: 'file'; path: string; data: Uint8Array | string; mode?: number; uid?: number; gid?: number; mtime?: number }
  | { type: 'directory'; path: string; mode?: number; uid?: number; gid?: number; mtime?: number }
  | { type: 'symlink'; path: string; target: string; uid?: number; gid?: number; mtime?: number }
  | {
    type: 'device'; path: string; device: 'char' | 'block'; major: number; minor: number; mode?: number; uid?: number; gid?: number;
    mtime?: number;
  };

/** The magic of a cpio "newc" header, the format the kernel's initramfs unpacker reads. */
export const CPIO_NEWC_MAGIC = '070701';
/** The name of the entry that ends a cpio archive. */
export const CPIO_TRAILER = 'TRAILER!!!';
const HEADER_BYTES = 110;

/** File type bits of st_mode (inode(7)). */
export const FileType = { Regular: 0o100000, Directory: 0o040000, Symlink: 0o120000, CharDevice: 0o020000, BlockDevice: 0o060000 } as const;

const DEFAULT_PERMISSIONS = { file: 0o644, directory: 0o755, symlink: 0o777, device: 0o600 } as const;
const MAX_FIELD = 0xffffffff;

interface Member {
  name: string;
  mode: number;
  uid: number;
  gid: number;
  nlink: number;
  mtime: number;
  data: Uint8Array;
  rdevMajor: number;
  rdevMinor: number;
}

/**
 * A newc cpio archive of `entries`, in the given order (parents before their children: the
 * kernel does not create missing directories). Paths may start with '/'; it is dropped, as cpio
 * archives name members relative to the root. Owners default to root, times to 0 (so that the
 * same entries always give the same bytes).
 */
export function buildInitramfs(entries: readonly InitramfsEntry[]): Uint8Array {
  if (!Array.isArray(entries)) throw argTypeError('entries must be an array');
  const members = entries.map((entry, index) => member(entry, index));
  const seen = new Set<string>();
  for (const { name } of members) {
    if (seen.has(name)) throw argValueError(`initramfs: '${name}' appears twice`);
    seen.add(name);
  }
  members.push({ name: CPIO_TRAILER, mode: 0, uid: 0, gid: 0, nlink: 1, mtime: 0, data: new Uint8Array(0), rdevMajor: 0, rdevMinor: 0 });

  const encoder = new TextEncoder();
  const names = members.map((m) => encoder.encode(m.name));
  let total = 0;
  for (let i = 0; i < members.length; i++) total += pad4(HEADER_BYTES + names[i]!.length + 1) + pad4(members[i]!.data.length);
  const archive = new Uint8Array(total);
  let at = 0;
  members.forEach((m, i) => {
    const name = names[i]!;
    // Inode numbers only need to be distinct; the trailer's is 0.
    const ino = m.name === CPIO_TRAILER ? 0 : i + 1;
    const fields = [ino, m.mode, m.uid, m.gid, m.nlink, m.mtime, m.data.length, 0, 0, m.rdevMajor, m.rdevMinor, name.length + 1, 0];
    const header = CPIO_NEWC_MAGIC + fields.map((value) => value.toString(16).padStart(8, '0')).join('');
    archive.set(encoder.encode(header), at);
    archive.set(name, at + HEADER_BYTES);
    at += pad4(HEADER_BYTES + name.length + 1);
    archive.set(m.data, at);
    at += pad4(m.data.length);
  });
  return archive;
}

const pad4 = (bytes: number): number => (bytes + 3) & ~3;

function member(entry: InitramfsEntry, index: number): Member {
  if (typeof entry !== 'object' || entry === null) throw argTypeError(`entries[${index}] must be an object`);
  const name = memberName(entry.path, index);
  const owner = {
    uid: field(entry.uid ?? 0, `entries[${index}].uid`),
    gid: field(entry.gid ?? 0, `entries[${index}].gid`),
    mtime: field(entry.mtime ?? 0, `entries[${index}].mtime`),
  };
  const none = new Uint8Array(0);
  switch (entry.type) {
    case 'file': {
      const data = typeof entry.data === 'string' ? new TextEncoder().encode(entry.data) : entry.data;
      if (!(data instanceof Uint8Array)) throw argTypeError(`entries[${index}].data must be a Uint8Array or a string`);
      if (data.length > MAX_FIELD) throw argValueError(`entries[${index}]: a cpio member holds at most 4 GiB - 1 bytes`);
      return { name, ...owner, mode: FileType.Regular | permissions(entry.mode, 'file', index), nlink: 1, data, rdevMajor: 0, rdevMinor: 0 };
    }
    case 'directory':
      return { name, ...owner, mode: FileType.Directory | permissions(entry.mode, 'directory', index), nlink: 2, data: none, rdevMajor: 0, rdevMinor: 0 };
    case 'symlink': {
      if (typeof entry.target !== 'string' || entry.target === '' || entry.target.includes('\0')) {
        throw argTypeError(`entries[${index}].target must be a non-empty string without NUL`);
      }
      // A symlink's data is its target, without a NUL.
      const data = new TextEncoder().encode(entry.target);
      return { name, ...owner, mode: FileType.Symlink | DEFAULT_PERMISSIONS.symlink, nlink: 1, data, rdevMajor: 0, rdevMinor: 0 };
    }
    case 'device': {
      if (entry.device !== 'char' && entry.device !== 'block') throw argValueError(`entries[${index}].device must be 'char' or 'block'`);
      const type = entry.device === 'char' ? FileType.CharDevice : FileType.BlockDevice;
      return {
        name, ...owner, mode: type | permissions(entry.mode, 'device', index), nlink: 1, data: none,
        rdevMajor: field(entry.major, `entries[${index}].major`), rdevMinor: field(entry.minor, `entries[${index}].minor`),
      };
    }
    default:
      throw argValueError(`entries[${index}].type must be 'file', 'directory', 'symlink' or 'device', got ${String((entry as { type: unknown }).type)}`);
  }
}

function memberName(path: unknown, index: number): string {
  if (typeof path !== 'string') throw argTypeError(`entries[${index}].path must be a string`);
  const name = path.replace(/^\/+/, '');
  if (name === '' || name.includes('\0')) throw argValueError(`entries[${index}].path must name something below the root, without NUL, got ${JSON.stringify(path)}`);
  if (name.split('/').includes('..')) throw argValueError(`entries[${index}].path must not contain '..', got ${JSON.stringify(path)}`);
  if (name === CPIO_TRAILER) throw argValueError(`entries[${index}].path: '${CPIO_TRAILER}' marks the end of the archive`);
  return name;
}

function permissions(mode: number | undefined, kind: keyof typeof DEFAULT_PERMISSIONS, index: number): number {
  if (mode === undefined) return DEFAULT_PERMISSIONS[kind];
  if (!Number.isInteger(mode) || mode < 0 || mode > 0o7777) throw outOfRangeError(`entries[${index}].mode must be permission bits 0..0o7777, got ${mode}`);
  return mode;
}

function field(value: number, name: string): number {
  if (!Number.isInteger(value) || value < 0 || value > MAX_FIELD) throw outOfRangeError(`${name} must be an integer 0..0xffffffff, got ${value}`);
  return value;
}
