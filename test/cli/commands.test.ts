// The `node-kvm` command's own options (--version, help COMMAND), and run's newer ones: a
// configuration file, the checks made before any vCPU thread starts, and `node-kvm config`.
// In this process (main()): the guests here print nothing, or print to --serial none.
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import t from 'tap';
import { callApi } from '../../lib/cli/api-client.js';
import { apiMachine, startApiServer } from '../../lib/cli/api-server.js';
import { Machine } from '../../lib/vmm/machine.js';
import { nodeKvmInProcess } from '../helpers/cli.js';
import { noKvm, repoRoot } from '../helpers/kvm.js';
import { sharedPool } from '../helpers/pool.js';

const guest = (name: string) => path.join(repoRoot, 'guests', 'build', `${name}.bin`);
const badRun = (...args: string[]) => nodeKvmInProcess(['run', ...args], { builtFirstThread: true });
if (!noKvm) sharedPool();

t.test('--version prints the package version; help COMMAND prints that command\'s help', async (t) => {
  const { version } = JSON.parse(readFileSync(path.join(repoRoot, 'package.json'), 'utf8')) as { version: string };
  t.same(await nodeKvmInProcess(['--version']), { status: 0, stdout: `node-kvm ${version}\n`, stderr: '' });
  const help = await nodeKvmInProcess(['help', 'run']);
  t.equal(help.status, 0);
  t.match(help.stdout, /^usage: node-kvm run IMAGE/);
  t.match(help.stdout, /--memory SIZE +guest RAM, a multiple of 1 MiB, at most 3 GiB/);
  t.match(help.stdout, /--irqchip, --no-irqchip/);
  t.match(help.stdout, /--config FILE/);
  t.match((await nodeKvmInProcess(['help', 'snapshot'])).stdout, /^usage: node-kvm snapshot --api-socket PATH/);
  t.match((await nodeKvmInProcess(['help', 'config'])).stdout, /^usage: node-kvm config --api-socket PATH/);
  t.match((await nodeKvmInProcess(['help'])).stdout, /config +print a running machine's configuration/);
  const unknown = await nodeKvmInProcess(['help', 'rnu']);
  t.equal(unknown.status, 1);
  t.match(unknown.stderr, /^node-kvm: help takes one command \(run, migrate, .*\), got 'rnu'\n$/);
});

t.test('run refuses a vCPU count or a size before it starts any thread, naming the option', async (t) => {
  const started = performance.now();
  const vcpus = await badRun(guest('hello'), '--vcpus', '256');
  t.same(vcpus, { status: 1, stdout: '', stderr: "node-kvm: --vcpus must be an integer from 1 to 255, got '256'\n" });
  t.ok(performance.now() - started < 1000, 'refused at once, not after starting 256 threads');
  t.same(await badRun(guest('hello'), '--memory', '4G'), { status: 1, stdout: '', stderr: "node-kvm: --memory: '4G' is too large: at most 3 GiB\n" });
  t.match((await badRun('--restore', '/nonexistent.snap', '--irqchip')).stderr, /^node-kvm: --irqchip applies to booting an IMAGE only/);
  t.match((await badRun(guest('hello'), '--verify')).stderr, /^node-kvm: --verify applies to --restore only\n$/);
  t.match((await badRun(guest('hello'), '--cpu-affinity', '9999')).stderr, /^node-kvm: --cpu-affinity: CPU 9999 is not one of this host's/);
  const dir = t.testdir();
  const config = path.join(dir, 'bad.json');
  writeFileSync(config, JSON.stringify({ image: guest('hello'), vcpus: 0 }));
  t.same(await badRun('--config', config), { status: 1, stdout: '', stderr: `node-kvm: ${config}: field 'vcpus' must be an integer from 1 to 255, got '0'\n` });
});

t.test('--append to an image with no command line is refused', { skip: noKvm }, async (t) => {
  const refused = await badRun(guest('hello'), '--memory', '1M', '--append', 'console=ttyS0');
  t.equal(refused.status, 1);
  t.equal(refused.stderr, 'node-kvm: --append: hello.bin boots as a flat binary in real mode, which takes no command line (with --mode protected or long it gets one)\n');
  t.equal(refused.stdout, '', 'the guest never ran');
});

t.test('run --config boots what the file says; config reports it through the API', { skip: noKvm }, async (t) => {
  const dir = mkdtempSync(path.join(tmpdir(), 'nkvm-config-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const socket = path.join(dir, 'api.sock');
  const config = path.join(dir, 'machine.json');
  // echo.bin waits for input for ever: the API stops it.
  writeFileSync(config, JSON.stringify({ image: guest('echo'), memory: '1M', serial: 'none', 'exit-stats': true, 'dirty-log': 'bitmap' }));
  const running = nodeKvmInProcess(['run', '--config', config, '--memory', '2M', '--api-socket', socket]);
  const deadline = Date.now() + 30_000;
  while (!existsSync(socket) && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 20));
  // No assertion until it has ended: it captures this process's stdout, where tap writes them.
  const reported = await callApi(socket, 'config', {});
  const { memoryBytes } = await callApi(socket, 'status', {});
  await callApi(socket, 'stop', {});
  const result = await running;
  t.same(reported, { image: guest('echo'), memory: '2M', serial: 'none', 'exit-stats': true, 'dirty-log': 'bitmap', 'api-socket': socket, vcpus: 1, irqchip: true },
    'the command line over the file, with what the machine has');
  t.equal(memoryBytes, 2 * 1024 * 1024);
  t.equal(result.stdout, '', 'the guest wrote to --serial none');
  t.equal(result.status, 0, 'stopped through the API');
  t.equal(result.stderr, '');
});

t.test('node-kvm config prints a machine\'s configuration as run --config reads it', { skip: noKvm }, async (t) => {
  const dir = mkdtempSync(path.join(tmpdir(), 'nkvm-config-'));
  const socket = path.join(dir, 'api.sock');
  const machine = await Machine.create({ image: guest('echo'), memoryBytes: 1024 * 1024, irqchip: false, pool: sharedPool(), serial: { output: null } });
  const server = await startApiServer(socket, apiMachine(machine, { image: guest('echo') }));
  t.teardown(async () => {
    await machine.stop();
    await server.close();
    rmSync(dir, { recursive: true, force: true });
  });
  machine.start();
  const printed = await nodeKvmInProcess(['config', '--api-socket', socket]);
  t.equal(printed.status, 0, printed.stderr);
  const config = JSON.parse(printed.stdout) as Record<string, unknown>;
  t.same(config, { image: guest('echo'), memory: '1M', vcpus: 1, irqchip: false, 'dirty-log': 'bitmap' });
  const file = path.join(dir, 'again.json');
  writeFileSync(file, printed.stdout);
  const { readRunConfig } = await import('../../lib/cli/run-options.js');
  t.same(readRunConfig(file), { image: guest('echo'), memory: '1M', vcpus: '1', irqchip: false, dirtyLog: 'bitmap' }, 'and run --config takes it back');
});
