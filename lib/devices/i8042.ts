// Just enough of the i8042 keyboard controller for the CPU-reset command (0xFE to port 0x64) to
// end the VM as a reset. Reads say "no data, input buffer empty", so a guest that polls the
// status before sending a command proceeds.
import type { PortDevice } from './bus-device.js';

export const I8042_DATA_PORT = 0x60;
export const I8042_COMMAND_PORT = 0x64;
const CMD_RESET_CPU = 0xfe;

export class I8042 {
  /** Port 0x60. */
  readonly dataPort: PortDevice;
  /** Port 0x64: status on read, commands on write. */
  readonly commandPort: PortDevice;

  constructor(onReset: () => void) {
    this.dataPort = { name: 'i8042', read: () => 0, write: () => {} };
    this.commandPort = {
      name: 'i8042',
      read: () => 0,
      write: (_offset, _size, value) => {
        if ((value & 0xff) === CMD_RESET_CPU) onReset();
      },
    };
  }
}
