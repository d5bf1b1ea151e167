// `node-kvm migrate --local`: the option reaches the machine through its control API (a fake one
// here), is refused for a tcp destination, and moves a real guest between two `run` processes
// with nothing copied: the source exits 0 and the destination's count goes on.
import path from 'node:path';
import t from 'tap';
import type { ApiMachine, ApiMachineState } from '../../lib/cli/api-server.js';
import type { MigrateOptions, MigrationStats } from '../../lib/migration/types.js';
import { nodeKvmInProcess } from '../helpers/cli.js';
import { countGoesOn, destinationListening, serveApi, startRunPair } from '../helpers/cli-migration.js';
import { noKvm } from '../helpers/kvm.js';

const MIB = 1024 * 1024;

const completed: MigrationStats = {
  phase: 'completed', totalTimeMs: 120, setupTimeMs: 110, downtimeMs: 1.5, expectedDowntimeMs: 0, bytesTransferred: 20_000, pagesTransferred: 0,
  zeroPagesSkipped: 0, pagesResent: 0, iterations: 0, dirtyPagesRate: 0, throughputBytesPerSec: 0, remainingPages: 0, memoryBytes: 64 * MIB, dirtyLogMode: 'bitmap',
};

class FakeMachine implements ApiMachine {
  state: ApiMachineState = 'running';
  readonly vcpuCount = 1;
  readonly memoryBytes = 64 * MIB;
  readonly calls: unknown[][] = [];
  async pause(): Promise<void> {}
  resume(): void {}
  stop(): void {}
  async reset(): Promise<void> {}
  async snapshot(): Promise<never> {
    throw new Error('not here');
  }
  async migrate(address: string, options?: MigrateOptions): Promise<MigrationStats> {
    const { onProgress: _progress, ...rest } = options ?? {};
    this.calls.push(['migrate', address, rest]);
    return completed;
  }
}

t.test('--local reaches the machine as local: true; a tcp destination is refused', async (t) => {
  const machine = new FakeMachine();
  const { dir, apiSocket } = await serveApi(t, machine);
  const result = await nodeKvmInProcess(['migrate', '--api-socket', apiSocket, '--local', '--json', `unix:${path.join(dir, 'dest.sock')}`], {});
  t.equal(result.status, 0, result.stderr);
  t.same(JSON.parse(result.stdout), completed);
  t.same(machine.calls, [['migrate', `unix:${path.join(dir, 'dest.sock')}`, { local: true }]]);
  const tcp = await nodeKvmInProcess(['migrate', '--api-socket', apiSocket, '--local', '--token', 't', 'tcp:127.0.0.1:4444'], {});
  t.equal(tcp.status, 1);
  t.equal(tcp.stderr, 'node-kvm: --local needs a unix:PATH destination: it hands file descriptors to a process on this host\n');
  t.equal(machine.calls.length, 1, 'nothing reached the machine');
});

t.test('a real guest moves between two run processes with migrate --local', { skip: noKvm }, async (t) => {
  const pair = await startRunPair(t, '64M');
  const { apiSocket, destinationSocket, source, destination } = pair;
  await destinationListening(pair);

  const migrate = await nodeKvmInProcess(['migrate', '--api-socket', apiSocket, '--local', '--json', `unix:${destinationSocket}`], {});
  t.equal(migrate.status, 0, migrate.stderr);
  const stats = JSON.parse(migrate.stdout) as MigrationStats;
  t.equal(stats.phase, 'completed');
  t.equal(stats.pagesTransferred, 0, 'no page copied');
  t.ok(stats.bytesTransferred < 256 * 1024, `only the state went over (${stats.bytesTransferred} bytes)`);
  t.ok(stats.downtimeMs > 0, `downtime ${stats.downtimeMs.toFixed(2)} ms`);

  const sourceEnd = await source.result;
  t.equal(sourceEnd.status, 0, 'the source exits 0 once its guest has moved');
  t.match(sourceEnd.stderr, /node-kvm: the guest migrated away; it runs at the destination now\n$/);
  await countGoesOn(t, sourceEnd, destination);
});
