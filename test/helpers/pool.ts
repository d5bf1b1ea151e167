// One vCPU thread pool for the machines of a test file (not for fixtures: it uses tap).
import t, { type Test } from 'tap';
import { VcpuWorkerPool } from '../../lib/index.js';

let filePool: VcpuWorkerPool | undefined;

/**
 * vCPU threads for the machines of a test file. A machine without a pool starts a thread per
 * vCPU, and under tap's TypeScript loader each takes a second or more to load; machines given
 * this pool borrow loaded ones, and give them back. Its `size` threads start loading at the first
 * call (at the top of the file: while the first tests run); it closes when the file's tests end.
 */
export function sharedPool(size = 1): VcpuWorkerPool {
  if (!filePool) {
    const pool = VcpuWorkerPool.start(size);
    filePool = pool;
    t.teardown(() => pool.close());
  }
  return filePool;
}

/** Until `done()` holds, looked at each few ms (a pool makes its spare VM on a timer of its own); fails `test` after 5 s. */
export async function untilPool(test: Test, done: () => boolean, what: string): Promise<void> {
  const deadline = performance.now() + 5000;
  while (!done()) {
    if (performance.now() > deadline) {
      test.fail(`timed out waiting for ${what}`);
      return;
    }
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
}
