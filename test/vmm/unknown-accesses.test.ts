// A guest that scans the ports: the VMM logs a bounded number of lines, counts every access, and
// says how many there were when the machine ends.
import t from 'tap';
import { MAX_LOGGED_UNKNOWN_PORTS } from '../../lib/vmm/bus.js';
import { guestImage, noKvm } from '../helpers/kvm.js';
import { runToExit } from '../helpers/machine.js';
import { sharedPool } from '../helpers/pool.js';

t.test('4096 unknown ports read: 64 lines, every access counted, the counts at the end', { skip: noKvm }, async (t) => {
  const logs: string[] = [];
  const { exit } = await runToExit({ image: guestImage('portscan'), memoryBytes: 1 << 20, pool: sharedPool() }, logs);
  t.same({ reason: exit.reason, code: exit.code }, { reason: 'debug-exit', code: 0x21 }, 'the guest finished its scan');
  const portLines = logs.filter((line) => line.startsWith('vcpu0: unknown port read from '));
  t.equal(portLines.length, MAX_LOGGED_UNKNOWN_PORTS, 'one line per port up to the limit');
  t.equal(portLines[0], 'vcpu0: unknown port read from 0x1000');
  t.equal(portLines.at(-1), 'vcpu0: unknown port read from 0x103f; further unknown ports are counted, not logged');
  t.equal(logs.at(-1), 'the guest made 4096 accesses to 4096 unknown ports and 0 unknown MMIO accesses');
  t.equal(logs.length, MAX_LOGGED_UNKNOWN_PORTS + 1, 'nothing else was logged');
});
