// `node-kvm migrate`, `snapshot`, `status`, `pause`, `resume` and `run --incoming/--restore`:
// help, argument errors and output against a machine's API (a fake one served here) in this
// process, and one snapshot plus one live migration of a real guest end to end, between `run`
// processes.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import t, { type Test } from 'tap';
import type { ApiMachine, ApiMachineState } from '../../lib/cli/api-server.js';
import { progressDisplay } from '../../lib/cli/progress.js';
import type { MigrateOptions, MigrationStats, SnapshotInfo, SnapshotOptions } from '../../lib/migration/types.js';
import { nodeKvmInProcess, startNodeKvm, type CommandResult } from '../helpers/cli.js';
import { countGoesOn, destinationListening, serveApi, socketDir, startRunPair } from '../helpers/cli-migration.js';
import { noKvm, repoRoot } from '../helpers/kvm.js';

const MIB = 1024 * 1024;
const nodeKvm = (args: string[], env?: Record<string, string>) => nodeKvmInProcess(args, { env });

/** One clear line on stderr and status 1. */
function failsWith(t: Test, result: CommandResult, message: string): void {
  t.equal(result.status, 1, `status 1 (${result.stderr.trim()})`);
  t.equal(result.stderr, `node-kvm: ${message}\n`);
}

const figures = (phase: MigrationStats['phase'], iterations: number, remainingPages: number): MigrationStats => ({
  phase, totalTimeMs: 100 * iterations, setupTimeMs: 2, downtimeMs: phase === 'completed' ? 7 : 0, expectedDowntimeMs: 3,
  bytesTransferred: iterations * MIB, pagesTransferred: iterations * 256, zeroPagesSkipped: 100, pagesResent: 10 * iterations,
  iterations, dirtyPagesRate: 1000, throughputBytesPerSec: 50 * MIB, remainingPages, memoryBytes: 64 * MIB, dirtyLogMode: 'bitmap',
});

class FakeMachine implements ApiMachine {
  state: ApiMachineState = 'running';
  readonly vcpuCount = 1;
  readonly memoryBytes = 64 * MIB;
  readonly calls: unknown[][] = [];
  async pause(): Promise<void> {
    this.state = 'paused';
  }
  resume(): void {
    this.state = 'running';
  }
  stop(): void {
    this.state = 'stopping';
  }
  async reset(): Promise<void> {
    // A reboot: the machine runs on.
  }
  async snapshot(file: string, options?: SnapshotOptions): Promise<SnapshotInfo> {
    this.calls.push(['snapshot', file, options]);
    return { path: file, kind: options?.diff ? 'diff' : 'full', ...(options?.diff ? { parent: '/snap/base' } : {}), bytesWritten: 3 * MIB, pagesWritten: 768, zeroPagesSkipped: 15616, pausedMs: 12.4, totalTimeMs: 40.2 };
  }
  async migrate(address: string, options?: MigrateOptions): Promise<MigrationStats> {
    const { onProgress, ...rest } = options ?? {};
    this.calls.push(['migrate', address, rest]);
    if (rest.token === 'wrong') throw new Error('migration refused: wrong token');
    onProgress?.(figures('setup', 0, 16384));
    onProgress?.(figures('precopy', 1, 300));
    onProgress?.(figures('stop-copy', 2, 20));
    return figures('completed', 2, 0);
  }
}

t.test('help for each command', async (t) => {
  const main = await nodeKvm(['--help']);
  t.equal(main.status, 0);
  for (const command of ['run', 'migrate', 'snapshot', 'status', 'pause', 'resume', 'stop', 'reset', 'info']) t.match(main.stdout, new RegExp(`^  ${command} `, 'm'));
  const usages: [string, RegExp][] = [
    ['run', /^usage: node-kvm run IMAGE \[options\]\n {7}node-kvm run --kernel FILE .*\n {7}node-kvm run --incoming tcp:HOST:PORT\|unix:PATH .*\n {7}node-kvm run --restore FILE/],
    ['migrate', /^usage: node-kvm migrate --api-socket PATH \[options\] tcp:HOST:PORT\|unix:PATH\n/],
    ['snapshot', /^usage: node-kvm snapshot --api-socket PATH \[--diff\] \[--json\] FILE\n/],
    ['status', /^usage: node-kvm status --api-socket PATH \[--json\]\n/],
    ['pause', /^usage: node-kvm pause --api-socket PATH\n/],
    ['resume', /^usage: node-kvm resume --api-socket PATH\n/],
    ['stop', /^usage: node-kvm stop --api-socket PATH\n/],
    ['reset', /^usage: node-kvm reset --api-socket PATH\n/],
  ];
  for (const [command, usage] of usages) {
    const help = await nodeKvm([command, '--help']);
    t.equal(help.status, 0, `${command} --help`);
    t.match(help.stdout, usage);
    t.equal(help.stderr, '');
  }
  const run = await nodeKvm(['run', '-h']);
  for (const option of ['--serial stdio|none|unix:PATH|file:PATH', '--api-socket PATH', '--incoming ADDRESS', '--token T', '--restore FILE', 'NODE_KVM_MIGRATION_TOKEN']) t.match(run.stdout, option);
});

t.test('argument errors are one clear line and status 1', async (t) => {
  const dir = socketDir(t);
  const missing = path.join(dir, 'nobody.sock');
  const cases: [string[], string][] = [
    [['migrate', '--api-socket', missing], 'migrate takes one destination ADDRESS, got 0 (see node-kvm migrate --help)'],
    [['migrate', 'unix:/x.sock'], 'migrate needs --api-socket PATH (the socket a machine serves with node-kvm run --api-socket)'],
    [['migrate', '--api-socket', missing, 'host:4444'], "migration address 'host:4444' must be tcp:HOST:PORT or unix:PATH"],
    [['migrate', '--api-socket', missing, 'tcp:host:99999', '--token', 't'], "migration address 'tcp:host:99999': port '99999' is not a number 0..65535"],
    [['migrate', '--api-socket', missing, 'tcp:host:4444'], 'migrating over tcp needs --token (or NODE_KVM_MIGRATION_TOKEN)'],
    [['migrate', '--api-socket', missing, 'tcp:host:4444', '--token', ''], '--token must not be empty'],
    [['migrate', '--api-socket', missing, 'unix:/x.sock', '--downtime-ms', 'soon'], "--downtime-ms must be a positive integer, got 'soon'"],
    [['migrate', '--api-socket', missing, 'unix:/x.sock', '--max-iterations', '0'], "--max-iterations must be a positive integer, got '0'"],
    [['migrate', '--api-socket', missing, 'unix:/x.sock', '--on-non-convergence', 'panic'], "--on-non-convergence must be finish or abort, got 'panic'"],
    [['migrate', '--api-socket', missing, 'unix:/x.sock'], `no machine is serving the API socket ${missing} (ENOENT)`],
    [['snapshot', '--api-socket', missing], 'snapshot takes one FILE, got 0 (see node-kvm snapshot --help)'],
    [['snapshot', 'file'], 'snapshot needs --api-socket PATH (the socket a machine serves with node-kvm run --api-socket)'],
    [['snapshot', '--api-socket', missing, 'file'], `no machine is serving the API socket ${missing} (ENOENT)`],
    [['status', '--api-socket', missing], `no machine is serving the API socket ${missing} (ENOENT)`],
    [['pause'], 'pause needs --api-socket PATH (the socket a machine serves with node-kvm run --api-socket)'],
    [['resume', '--api-socket', missing], `no machine is serving the API socket ${missing} (ENOENT)`],
    [['run', '--incoming', 'unix:/x.sock', '--restore', '/snap'], 'run takes one IMAGE, or --incoming ADDRESS, or --restore FILE (see node-kvm run --help)'],
    [['run', path.join(repoRoot, 'guests', 'build', 'hello.bin'), '--incoming', 'unix:/x.sock'], 'run takes one IMAGE, or --incoming ADDRESS, or --restore FILE (see node-kvm run --help)'],
    [['run', '--incoming', 'tcp:127.0.0.1:0'], '--incoming tcp:127.0.0.1:0 needs --token (or NODE_KVM_MIGRATION_TOKEN): anyone who can reach the port could send a guest'],
    [['run', '--incoming', 'tcp:127.0.0.1'], "migration address 'tcp:127.0.0.1' has no port (tcp:HOST:PORT)"],
    [['run', '--incoming', 'unix:/x.sock', '--mode', 'real'], '--mode applies to booting an IMAGE only'],
    [['run', '--restore', '/snap', '--memory', '1M'], '--memory and --vcpus come from the snapshot with --restore'],
    [['run', path.join(repoRoot, 'guests', 'build', 'hello.bin'), '--token', 't'], '--token applies to --incoming only'],
  ];
  for (const [args, message] of cases) {
    const result = await nodeKvmInProcess(args, { builtFirstThread: true });
    t.equal(result.status, 1, args.join(' '));
    t.equal(result.stderr, `node-kvm: ${message}\n`, args.join(' '));
  }
  const unknown = await nodeKvm(['migrate', '--speed', '9']);
  t.equal(unknown.status, 1);
  t.match(unknown.stderr, /^node-kvm: .*'--speed'.*\n$/);
  // The token may come from the environment instead of the command line.
  const fromEnv = await nodeKvm(['migrate', '--api-socket', missing, 'tcp:host:4444'], { NODE_KVM_MIGRATION_TOKEN: 'from-env' });
  failsWith(t, fromEnv, `no machine is serving the API socket ${missing} (ENOENT)`);
});

t.test('migrate, snapshot, status, pause, resume, reset and stop against a machine\'s API', async (t) => {
  const machine = new FakeMachine();
  const { dir, apiSocket } = await serveApi(t, machine);

  const migrate = await nodeKvm(['migrate', '--api-socket', apiSocket, '--token', 'secret', '--downtime-ms', '20', '--max-iterations', '4', 'tcp:10.1.2.3:4444']);
  t.equal(migrate.status, 0, migrate.stderr);
  t.equal(migrate.stderr, [
    'migrate: setup, sent 0.0 MiB, 16384 pages left, dirty 1000 pages/s',
    'migrate: precopy round 1, sent 1.0 MiB, 300 pages left, dirty 1000 pages/s, expected downtime 3.0 ms',
    'migrate: stop-copy round 2, sent 2.0 MiB, 20 pages left, dirty 1000 pages/s',
    '',
  ].join('\n'), 'one plain line per update when stderr is not a terminal');
  t.equal(migrate.stdout, [
    'status        completed',
    'total time    200 ms',
    'setup         2.0 ms',
    'downtime      7.0 ms',
    'transferred   2.0 MiB',
    'pages         512',
    'zero pages    100',
    'pages resent  20',
    'iterations    2',
    'dirty rate    1000 pages/s',
    'throughput    50.0 MiB/s',
    'guest memory  64.0 MiB',
    'dirty log     bitmap',
    '',
  ].join('\n'));

  const json = await nodeKvm(['migrate', '--api-socket', apiSocket, '--json', '--auto-converge', `unix:${path.relative(process.cwd(), path.join(dir, 'dest.sock'))}`]);
  t.equal(json.status, 0, json.stderr);
  t.same(JSON.parse(json.stdout), figures('completed', 2, 0));

  const refused = await nodeKvm(['migrate', '--api-socket', apiSocket, '--token', 'wrong', 'tcp:10.1.2.3:4444']);
  failsWith(t, refused, 'migration refused: wrong token');

  t.same(machine.calls, [
    ['migrate', 'tcp:10.1.2.3:4444', { token: 'secret', downtimeBudgetMs: 20, maxIterations: 4 }],
    ['migrate', `unix:${path.join(dir, 'dest.sock')}`, { autoConverge: true }], // made absolute for the machine
    ['migrate', 'tcp:10.1.2.3:4444', { token: 'wrong' }],
  ]);
  machine.calls.length = 0;

  const snapshot = await nodeKvm(['snapshot', '--api-socket', apiSocket, '/snap/one']);
  t.equal(snapshot.status, 0, snapshot.stderr);
  t.equal(snapshot.stdout, [
    'snapshot      /snap/one',
    'kind          full',
    'written       3.0 MiB',
    'pages         768',
    'zero pages    15616',
    'guest paused  12 ms',
    'total time    40 ms',
    '',
  ].join('\n'));
  const diff = await nodeKvm(['snapshot', '--api-socket', apiSocket, '--diff', '--json', '/snap/two']);
  t.same(JSON.parse(diff.stdout), { path: '/snap/two', kind: 'diff', parent: '/snap/base', bytesWritten: 3 * MIB, pagesWritten: 768, zeroPagesSkipped: 15616, pausedMs: 12.4, totalTimeMs: 40.2 });
  t.same(machine.calls, [['snapshot', '/snap/one', { diff: false }], ['snapshot', '/snap/two', { diff: true }]]);

  const status = await nodeKvm(['status', '--api-socket', apiSocket]);
  t.equal(status.stdout, 'state   running\nvCPUs   1\nmemory  64.0 MiB\n');
  t.equal((await nodeKvm(['pause', '--api-socket', apiSocket])).stdout, 'paused\n');
  t.same(JSON.parse((await nodeKvm(['status', '--api-socket', apiSocket, '--json'])).stdout), { state: 'paused', vcpuCount: 1, memoryBytes: 64 * MIB, migration: null });
  t.equal((await nodeKvm(['resume', '--api-socket', apiSocket])).stdout, 'running\n');
  t.equal(machine.state, 'running');
  t.equal((await nodeKvm(['reset', '--api-socket', apiSocket])).stdout, 'running\n', 'rebooted, running on');
  t.equal((await nodeKvm(['stop', '--api-socket', apiSocket])).stdout, 'stopping\n');
});

t.test('on a terminal, progress is one bar redrawn in place and cut to the width', async (t) => {
  const writes: string[] = [];
  const terminal = { isTTY: true, columns: 60, write: (text: string) => writes.push(text) } as unknown as NodeJS.WritableStream;
  const display = progressDisplay(terminal);
  display.update(figures('setup', 0, 16384));
  display.update(figures('precopy', 1, 4096));
  display.finish();
  display.finish();
  t.same(writes, [
    '\r\x1b[2K[--------------------]   0% setup | 0.0 MiB sent | 16384 pa',
    '\r\x1b[2K[###############-----]  75% precopy round 1 | 1.0 MiB sent ',
    '\n',
  ]);
});

t.test('a real guest: snapshot it, migrate it live to run --incoming, and restore the snapshot', { skip: noKvm }, async (t) => {
  const pair = await startRunPair(t, '32M');
  const { apiSocket, destinationSocket, source, destination } = pair;
  const snapshotFile = path.join(pair.dir, 'guest.snap');
  t.equal(fs.lstatSync(apiSocket).mode & 0o777, 0o600, 'the API socket is private');
  t.equal((await nodeKvm(['status', '--api-socket', apiSocket])).stdout, 'state   running\nvCPUs   1\nmemory  32.0 MiB\n');

  const snapshot = await nodeKvm(['snapshot', '--api-socket', apiSocket, path.relative(process.cwd(), snapshotFile)]);
  t.equal(snapshot.status, 0, snapshot.stderr);
  t.match(snapshot.stdout, new RegExp(`^snapshot +${snapshotFile.replace(/[.]/g, '\\.')}\nkind +full\n`));
  t.ok(fs.statSync(snapshotFile).size > 0, 'the snapshot file exists');

  await destinationListening(pair);
  const migrate = await nodeKvm(['migrate', '--api-socket', apiSocket, `unix:${destinationSocket}`]);
  t.equal(migrate.status, 0, migrate.stderr);
  t.match(migrate.stdout, /^status +completed\n/);
  t.match(migrate.stdout, /^iterations +\d+\n/m);

  const sourceEnd = await source.result;
  t.equal(sourceEnd.status, 0, 'the source exits 0 once its guest has moved');
  t.match(sourceEnd.stderr, /node-kvm: the guest migrated away; it runs at the destination now\n$/);
  t.notOk(fs.existsSync(apiSocket), 'the source removed its API socket');
  // Started while the destination runs on: it loads meanwhile.
  const restored = pair.track(startNodeKvm(['run', '--restore', snapshotFile]));
  const destinationEnd = await countGoesOn(t, sourceEnd, destination);
  t.equal(destinationEnd.status, 128 + os.constants.signals.SIGTERM, 'stopped by the signal');

  const [, firstPass] = await restored.waitFor(/^pass (\d+) ok$/m);
  t.ok(Number(firstPass) >= 2, `the restored guest goes on from where the snapshot was (pass ${firstPass})`);
  await restored.waitFor(new RegExp(`^pass ${Number(firstPass) + 1} ok$`, 'm'));
  t.notMatch(restored.stdout(), /BAD/);
  restored.kill('SIGTERM');
  await restored.result;
});
