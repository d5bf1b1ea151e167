// A vCPU thread waits for the main thread as SCHED_BATCH (idle in its pool, built into a machine,
// until start()), so that waking it does not take the CPU from the main thread on a busy host,
// and runs its guest as SCHED_OTHER.
import { readdirSync, readFileSync } from 'node:fs';
import t from 'tap';
import { setThreadBatch, VcpuWorkerPool } from '../../lib/index.js';
import { noKvm } from '../helpers/kvm.js';
import { MiB, startDirtier } from '../helpers/migration.js';

const SCHED_OTHER = 0;
const SCHED_BATCH = 3;

/** A thread's scheduling policy: field 41 of its stat, counted after the name in parentheses (field 2). */
function policyOf(statPath: string): number {
  const stat = readFileSync(statPath, 'utf8');
  return Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[41 - 3]);
}

/** The policies of this process's threads named `name`. */
function threadPolicies(name: string): number[] {
  const policies: number[] = [];
  for (const tid of readdirSync('/proc/self/task')) {
    try {
      if (readFileSync(`/proc/self/task/${tid}/comm`, 'utf8').trim() === name) policies.push(policyOf(`/proc/self/task/${tid}/stat`));
    } catch {
      // ended between the listing and the look
    }
  }
  return policies;
}

t.test('setThreadBatch() sets the calling thread\'s policy and back', async (t) => {
  t.equal(policyOf('/proc/thread-self/stat'), SCHED_OTHER);
  setThreadBatch(true);
  t.equal(policyOf('/proc/thread-self/stat'), SCHED_BATCH);
  setThreadBatch(false);
  t.equal(policyOf('/proc/thread-self/stat'), SCHED_OTHER);
  t.throws(() => setThreadBatch(1 as unknown as boolean), { code: 'ERR_INVALID_ARG_TYPE' });
});

t.test('a vCPU thread is SCHED_BATCH while idle, SCHED_OTHER while its guest runs', { skip: noKvm }, async (t) => {
  const pool = await VcpuWorkerPool.create(1);
  t.teardown(() => pool.close());
  t.same(threadPolicies('vcpu-idle'), [SCHED_BATCH], 'the idle pool thread');
  const dirtier = await startDirtier({ memoryBytes: 16 * MiB, config: { pool } });
  await dirtier.waitForOutput('pass 1 ok\n');
  t.same(threadPolicies('vcpu0'), [SCHED_OTHER], 'the thread running the guest');
  await dirtier.machine.stop();
  t.same(threadPolicies('vcpu-idle'), [SCHED_BATCH], 'back in the pool');
});
