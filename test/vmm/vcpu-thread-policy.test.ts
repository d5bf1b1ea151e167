// A vCPU thread waits for its machine's start() as SCHED_BATCH, so that the wake does not take the
// CPU from the main thread on a busy host, and runs its guest (and idles in its pool) as
// SCHED_OTHER.
import { readdirSync, readFileSync } from 'node:fs';
import t from 'tap';
import { GUEST_PARAMS_ADDR, Machine, setThreadBatch, VcpuWorkerPool } from '../../lib/index.js';
import { noKvm } from '../helpers/kvm.js';
import { dirtierImage, dirtierParams, MiB } from '../helpers/migration.js';
import { serialCollector } from '../helpers/serial-collector.js';

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

t.test('a vCPU thread is SCHED_BATCH until its machine starts, SCHED_OTHER after and in its pool', { skip: noKvm }, async (t) => {
  const pool = await VcpuWorkerPool.create(1);
  t.teardown(() => pool.close());
  t.same(threadPolicies('vcpu-idle'), [SCHED_OTHER], 'the idle pool thread');
  const serial = serialCollector();
  const machine = await Machine.create({ image: dirtierImage('dirtier-user'), memoryBytes: 16 * MiB, pool, serial: { output: serial.sink }, log: () => {} });
  t.teardown(() => machine.stop());
  machine.writeMemory(GUEST_PARAMS_ADDR, dirtierParams(0, MiB));
  // The thread reaches its wait just after it reports its vCPU created.
  const deadline = performance.now() + 5000;
  while (threadPolicies('vcpu0')[0] !== SCHED_BATCH && performance.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 5));
  t.same(threadPolicies('vcpu0'), [SCHED_BATCH], 'built, waiting for start()');
  machine.start();
  await serial.waitFor('pass 1 ok\n');
  t.same(threadPolicies('vcpu0'), [SCHED_OTHER], 'the thread running the guest');
  await machine.stop();
  t.same(threadPolicies('vcpu-idle'), [SCHED_OTHER], 'back in the pool');
});
