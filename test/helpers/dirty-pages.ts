// Shared by the dirty-log, dirty-ring and tracker tests: expected page ranges and ring support.
import { Kvm, KvmError } from '../../lib/index.js';
import type { PageRange } from '../../lib/migration/types.js';

/** Sorted, coalesced ranges of the given page numbers. */
export function rangesOf(pages: Iterable<number>): PageRange[] {
  const ranges: PageRange[] = [];
  for (const page of [...new Set(pages)].sort((a, b) => a - b)) {
    const last = ranges[ranges.length - 1];
    if (last && last.firstPage + last.pageCount === page) last.pageCount++;
    else ranges.push({ firstPage: page, pageCount: 1 });
  }
  return ranges;
}

export const SMALL_RING_BYTES = 4096;

/** Why a 4 KiB dirty ring cannot be tested here, or false where it can (given why any ring cannot). */
export function smallRingSupport(noRing: string | false): string | false {
  if (noRing) return noRing;
  const kvm = Kvm.open();
  const vm = kvm.createVm();
  try {
    vm.enableDirtyRing(SMALL_RING_BYTES);
    return false;
  } catch (error) {
    // Hosts whose CPUs flush dirty pages in batches (Intel PML) reserve more entries than 4 KiB
    // holds; a ring large enough for them cannot fill from the memory real mode reaches.
    if (error instanceof KvmError && error.code === 'EINVAL') return `this host refuses a ${SMALL_RING_BYTES}-byte dirty ring (${error.message})`;
    throw error;
  } finally {
    vm.close();
    kvm.close();
  }
}
