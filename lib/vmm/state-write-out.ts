// A live migration's stop writes the VM's and the vCPU's saved state straight into its socket the
// moment the vCPU has parked (StateWriteOut, types.ts): the destination checks and applies them
// while the source goes on to the devices and the last pages.
import { writevSync } from 'node:fs';
import type { Vm } from '../kvm/vm.js';
import { phaseClockMs, phaseTimingEnabled } from './phase-timing.js';
import { recordParts } from './records.js';
import type { StateWriteOut, StateWrittenOut } from './types.js';
import type { RawVcpuState } from './vcpu-state.js';

const phaseTiming = phaseTimingEnabled();

/**
 * Saves the VM's state (its only vCPU is parked: nothing else changes it) and writes it and
 * `vcpuState` out in one writev, nothing copied: the records' headers and CRCs around the states
 * as they are. A write the socket does not take whole (it is full) or that fails stops there: the
 * caller writes the rest, or meets the failure itself. A warm-up (fd -1) writes nothing and hands
 * back all of it.
 */
export function writeStateOut(vm: Vm, irqchip: boolean, vcpuState: RawVcpuState, out: StateWriteOut): StateWrittenOut {
  const vmState = vm.saveState(irqchip);
  const parts = [out.prefix, ...recordParts(out.vmRecordType, vmState), ...recordParts(out.vcpuRecordType, vcpuState)];
  let totalBytes = 0;
  for (const part of parts) totalBytes += part.length;
  let writtenBytes = 0;
  try {
    if (out.fd >= 0) writtenBytes = writevSync(out.fd, parts);
  } catch {
    // EAGAIN or a broken connection: see above.
  }
  // The whole of it for the caller, only where some is left for it to write.
  const bytes = writtenBytes < totalBytes ? Buffer.concat(parts) : new Uint8Array(0);
  return { bytes, totalBytes, writtenBytes, vm: vmState, ...(phaseTiming ? { atMs: phaseClockMs() } : {}) };
}
