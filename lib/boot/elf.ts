// ELF32/ELF64 executables: the header, PT_LOAD segments and PT_NOTE notes (System V gABI, and the
// x86-64 psABI for the machine numbers). Parsing only: placement and validation against guest RAM
// happen in plan.ts.
import { BootImageError, hex } from './errors.js';

const ELFCLASS32 = 1;
const ELFCLASS64 = 2;
const ELFDATA2LSB = 1;
const ET_EXEC = 2;
const ET_DYN = 3;
const EM_386 = 3;
const EM_X86_64 = 62;
const PT_LOAD = 1;
const PT_NOTE = 4;
const PN_XNUM = 0xffff;
export const PF_X = 1;

const ELF_TYPE_NAMES: Record<number, string> = { 0: 'no file type', 1: 'relocatable object', 4: 'core dump' };

export interface ElfSegment {
  /** Index of its program header. */
  index: number;
  paddr: bigint;
  vaddr: bigint;
  /** File offset of its data. */
  offset: number;
  fileBytes: number;
  memBytes: bigint;
  flags: number;
}

export interface ElfNote {
  name: string;
  type: number;
  desc: Uint8Array;
}

export interface ElfFile {
  elfClass: 32 | 64;
  entry: bigint;
  /** PT_LOAD segments with a non-zero memory size, in program header order. */
  segments: ElfSegment[];
  /** Notes from every PT_NOTE segment. */
  notes: ElfNote[];
}

export function isElf(image: Uint8Array): boolean {
  return image.length >= 4 && image[0] === 0x7f && image[1] === 0x45 && image[2] === 0x4c && image[3] === 0x46;
}

export function parseElf(image: Uint8Array): ElfFile {
  const view = new DataView(image.buffer, image.byteOffset, image.byteLength);
  if (image.length < 5) throw new BootImageError(`truncated ELF header: the file has ${image.length} bytes`);
  const elfClass = image[4];
  if (elfClass !== ELFCLASS32 && elfClass !== ELFCLASS64) {
    throw new BootImageError(`not a bootable image: ELF class ${elfClass} (expected 1 for ELF32 or 2 for ELF64)`);
  }
  const is64 = elfClass === ELFCLASS64;
  const headerBytes = is64 ? 64 : 52;
  if (image.length < headerBytes) {
    throw new BootImageError(`truncated ELF header: the file has ${image.length} bytes, an ELF${is64 ? 64 : 32} header needs ${headerBytes}`);
  }
  if (image[5] !== ELFDATA2LSB) throw new BootImageError(`not a bootable image: big-endian ELF (EI_DATA ${image[5]}) is not for x86`);
  const type = view.getUint16(16, true);
  if (type !== ET_EXEC && type !== ET_DYN) {
    throw new BootImageError(`not a bootable image: ELF type ${type} (${ELF_TYPE_NAMES[type] ?? 'unknown'}) is not an executable`);
  }
  const machine = view.getUint16(18, true);
  const expectedMachine = is64 ? EM_X86_64 : EM_386;
  if (machine !== expectedMachine) {
    throw new BootImageError(
      `not a bootable image: ELF${is64 ? 64 : 32} machine ${machine} (expected ${expectedMachine}, ${is64 ? 'x86-64' : 'i386'})`,
    );
  }
  const entry = is64 ? view.getBigUint64(24, true) : BigInt(view.getUint32(24, true));
  const phoff = is64 ? view.getBigUint64(32, true) : BigInt(view.getUint32(28, true));
  const phentsize = view.getUint16(is64 ? 54 : 42, true);
  const phnum = view.getUint16(is64 ? 56 : 44, true);
  const expectedPhentsize = is64 ? 56 : 32;
  if (phnum === 0) throw new BootImageError('not a bootable image: the ELF file has no program headers');
  if (phnum === PN_XNUM) throw new BootImageError('not a bootable image: extended ELF program header numbering (PN_XNUM) is not supported');
  if (phentsize !== expectedPhentsize) {
    throw new BootImageError(`bad ELF header: program header size ${phentsize} (expected ${expectedPhentsize})`);
  }

  const segments: ElfSegment[] = [];
  const notes: ElfNote[] = [];
  for (let index = 0; index < phnum; index++) {
    const at = phoff + BigInt(index * phentsize);
    if (at + BigInt(phentsize) > BigInt(image.length)) {
      throw new BootImageError(`truncated ELF program header ${index} at offset ${hex(at)}: the file ends at ${hex(image.length)}`);
    }
    const p = Number(at);
    const pType = view.getUint32(p, true);
    const header = is64
      ? {
        flags: view.getUint32(p + 4, true), offset: view.getBigUint64(p + 8, true), vaddr: view.getBigUint64(p + 16, true),
        paddr: view.getBigUint64(p + 24, true), filesz: view.getBigUint64(p + 32, true), memsz: view.getBigUint64(p + 40, true),
        align: view.getBigUint64(p + 48, true),
      }
      : {
        offset: BigInt(view.getUint32(p + 4, true)), vaddr: BigInt(view.getUint32(p + 8, true)), paddr: BigInt(view.getUint32(p + 12, true)),
        filesz: BigInt(view.getUint32(p + 16, true)), memsz: BigInt(view.getUint32(p + 20, true)), flags: view.getUint32(p + 24, true),
        align: BigInt(view.getUint32(p + 28, true)),
      };
    if (pType !== PT_LOAD && pType !== PT_NOTE) continue;
    if (header.offset + header.filesz > BigInt(image.length)) {
      throw new BootImageError(
        `ELF program header ${index}: its file data [${hex(header.offset)}, ${hex(header.offset + header.filesz)}) is beyond the end of the file (${hex(image.length)} bytes)`,
      );
    }
    const offset = Number(header.offset);
    const fileBytes = Number(header.filesz);
    if (pType === PT_NOTE) {
      notes.push(...parseNotes(image.subarray(offset, offset + fileBytes), header.align === 8n ? 8 : 4, index));
      continue;
    }
    if (header.memsz === 0n) continue;
    if (header.filesz > header.memsz) {
      throw new BootImageError(`ELF segment ${index}: file size ${hex(header.filesz)} is larger than its memory size ${hex(header.memsz)}`);
    }
    segments.push({ index, paddr: header.paddr, vaddr: header.vaddr, offset, fileBytes, memBytes: header.memsz, flags: header.flags });
  }
  if (segments.length === 0) throw new BootImageError('not a bootable image: the ELF file has no loadable (PT_LOAD) segment');
  return { elfClass: is64 ? 64 : 32, entry, segments, notes };
}

function parseNotes(data: Uint8Array, align: number, index: number): ElfNote[] {
  const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  const pad = (n: number) => (n + align - 1) & ~(align - 1);
  const notes: ElfNote[] = [];
  let at = 0;
  while (at < data.length) {
    if (at + 12 > data.length) throw new BootImageError(`truncated ELF note at offset ${hex(at)} of program header ${index}`);
    const nameBytes = view.getUint32(at, true);
    const descBytes = view.getUint32(at + 4, true);
    const type = view.getUint32(at + 8, true);
    const nameAt = at + 12;
    const descAt = nameAt + pad(nameBytes);
    if (descAt + descBytes > data.length) throw new BootImageError(`truncated ELF note at offset ${hex(at)} of program header ${index}`);
    let name = '';
    for (let i = 0; i < nameBytes && data[nameAt + i] !== 0; i++) name += String.fromCharCode(data[nameAt + i]!);
    notes.push({ name, type, desc: data.slice(descAt, descAt + descBytes) });
    at = descAt + pad(descBytes);
  }
  return notes;
}
