// Dry runs of a restore on a machine not yet started, so that the code a real restore runs
// (decoding a state, checking it, applying it) is compiled by the time it counts.
import { machineInternals, type Machine, type MachineState } from '../vmm/machine.js';
import { warmUpStateCodec } from './state-sections.js';

/**
 * Saves the machine's own state and puts it back `rounds` times, each time decoded anew as a
 * stream's would be; resolves with the state saved (for more rehearsals later). Only for a
 * machine that has not run: its state is its own, so nothing changes.
 */
export async function rehearseRestore(machine: Machine, rounds: number): Promise<MachineState> {
  const internals = machineInternals(machine);
  const saved = await internals.saveState();
  for (let i = 0; i < rounds; i++) await internals.applyState(warmUpStateCodec(saved));
  return saved;
}
