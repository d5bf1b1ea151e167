// Dry runs of a restore on a machine not yet started, so that the code a real restore runs
// (decoding a state, checking it, applying it) is compiled by the time it counts.
import { machineInternals, type Machine, type MachineInternals, type MachineState } from '../vmm/machine.js';
import { mergeDeviceStates, warmUpStateCodec } from './state-sections.js';

/**
 * Saves the machine's own state and puts it back `rounds` times, each time decoded anew as a
 * stream's would be; resolves with the state saved (for more rehearsals later). Only for a
 * machine that has not run: its state is its own, so nothing changes.
 */
export async function rehearseRestore(machine: Machine, rounds: number, options: { devicesAhead?: boolean } = {}): Promise<MachineState> {
  const internals = machineInternals(machine);
  const saved = await internals.saveState();
  for (let i = 0; i < rounds; i++) {
    const state = warmUpStateCodec(saved);
    if (options.devicesAhead) {
      await internals.applyCpuState(state);
      applyDevicesAsAhead(internals, state);
    } else {
      await internals.applyState(state);
    }
  }
  return saved;
}

/**
 * Puts `state`'s devices on the machine as a live migration that sent them ahead does
 * (SectionType.DeviceStateAhead): all but the virtio ones first, then the ones that changed
 * since (here, the serial port), merged with the rest.
 */
export function applyDevicesAsAhead(internals: MachineInternals, state: MachineState): void {
  const { virtio: _virtio, ...ahead } = state.devices;
  internals.applyDeviceStateAhead(ahead);
  const merged = mergeDeviceStates(ahead, { serial: state.devices.serial }, 'a rehearsal');
  internals.applyDeviceState(merged.devices, merged.appliedAhead);
}
