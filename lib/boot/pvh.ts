// PVH direct boot (Xen's docs/misc/pvh.pandoc, as Firecracker and QEMU microvm implement it): an
// ELF whose XEN_ELFNOTE_PHYS32_ENTRY note gives a 32-bit physical entry point, entered in
// protected mode with paging off and EBX = &hvm_start_info (built in boot-info.ts).
import type { ElfNote } from './elf.js';
import { BootImageError, hex } from './errors.js';

/** xen/include/public/elfnote.h */
export const XEN_ELFNOTE_PHYS32_ENTRY = 18;

/** The PVH entry point from the notes, or null where there is no such note. */
export function pvhEntry(notes: readonly ElfNote[]): number | null {
  const note = notes.find((n) => n.name === 'Xen' && n.type === XEN_ELFNOTE_PHYS32_ENTRY);
  if (!note) return null;
  const view = new DataView(note.desc.buffer, note.desc.byteOffset, note.desc.byteLength);
  // Linux emits it pointer-sized (8 bytes in a 64-bit kernel); the value is a 32-bit address.
  if (note.desc.length === 4) return view.getUint32(0, true);
  if (note.desc.length === 8) {
    const entry = view.getBigUint64(0, true);
    if (entry > 0xffffffffn) throw new BootImageError(`the PVH entry point ${hex(entry)} (XEN_ELFNOTE_PHYS32_ENTRY) is above 4 GiB`);
    return Number(entry);
  }
  throw new BootImageError(`the PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY) has a ${note.desc.length}-byte value (expected 4 or 8)`);
}
