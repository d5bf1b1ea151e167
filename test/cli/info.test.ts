// `node-kvm info`, help and unknown commands, in this process: what the command prints and its
// exit status.
import t from 'tap';
import { Cap, Kvm } from '../../lib/index.js';
import { nodeKvmInProcess, startNodeKvm } from '../helpers/cli.js';
import { noKvm } from '../helpers/kvm.js';

const nodeKvm = (...args: string[]) => nodeKvmInProcess(args);

t.test('info prints the API version, limits and capabilities', { skip: noKvm }, async (t) => {
  const result = await nodeKvm('info');
  t.equal(result.status, 0, result.stderr);
  using kvm = Kvm.open();
  t.match(result.stdout, /^API version\s+12$/m);
  t.match(result.stdout, new RegExp(`^max vCPUs\\s+${kvm.maxVcpus}$`, 'm'));
  t.match(result.stdout, new RegExp(`^memory slots\\s+${kvm.nrMemslots}$`, 'm'));
  t.match(result.stdout, new RegExp(`^in-kernel irqchip\\s+${kvm.checkExtension(Cap.Irqchip) ? 'yes' : 'no'}$`, 'm'));
});

t.test('info --json is machine-readable', { skip: noKvm }, async (t) => {
  const result = await nodeKvm('info', '--json');
  t.equal(result.status, 0, result.stderr);
  const info = JSON.parse(result.stdout) as Record<string, string>;
  t.equal(info['API version'], '12');
  t.equal(info.device, '/dev/kvm');
});

t.test('a missing device is one clear line and exit status 1', async (t) => {
  const result = await nodeKvm('info', '--device', '/nonexistent/kvm');
  t.equal(result.status, 1);
  t.equal(result.stdout, '');
  t.match(result.stderr, /^node-kvm: cannot open \/nonexistent\/kvm: .*does not exist.*modprobe/);
  t.equal(result.stderr.trim().split('\n').length, 1, 'no stack trace');
});

t.test('help and unknown commands', async (t) => {
  const help = await nodeKvm('--help');
  t.equal(help.status, 0);
  t.match(help.stdout, /usage: node-kvm <command>/);
  const infoHelp = await nodeKvm('info', '--help');
  t.equal(infoHelp.status, 0);
  t.match(infoHelp.stdout, /usage: node-kvm info/);
  const unknown = await nodeKvm('frobnicate');
  t.equal(unknown.status, 2);
  t.match(unknown.stderr, /unknown command 'frobnicate'/);
  const badOption = await nodeKvm('info', '--bogus');
  t.equal(badOption.status, 1);
  t.match(badOption.stderr, /^node-kvm: .*bogus/);
});

t.test('the command as a process prints what main() prints here, and exits with its status', async (t) => {
  const args = ['info', '--device', '/nonexistent/kvm'];
  const [child, here] = [await startNodeKvm(args).result, await nodeKvmInProcess(args)];
  t.same(child, { ...here, signal: null });
  t.equal(child.status, 1);
});
