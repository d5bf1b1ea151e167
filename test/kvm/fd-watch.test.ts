// watchFd: readiness of an arbitrary fd on the calling thread's event loop (device threads wait
// on their notify eventfd and a TAP this way).
import t from 'tap';
import { Worker } from 'node:worker_threads';
import { EventFd, watchFd } from '../../lib/kvm/index.js';

t.test('calls back while readable, once per readiness, until closed', async (t) => {
  const fd = EventFd.create();
  const seen: bigint[] = [];
  const done = new Promise<void>((resolve) => {
    const watch = watchFd(fd.fd, () => {
      seen.push(fd.read());
      if (seen.length === 1) setImmediate(() => fd.write(5n));
      if (seen.length === 2) {
        watch.close();
        watch.close();
        // Closed: a further write calls nothing.
        fd.write(7n);
        setTimeout(resolve, 20);
      }
    });
  });
  fd.write(3n);
  await done;
  t.same(seen, [3n, 5n]);
  t.equal(fd.read(), 7n, 'the write after close was left unread');
  fd.close();
});

t.test('bad arguments are refused before anything is watched', async (t) => {
  t.throws(() => watchFd(-1, () => {}), { code: 'ERR_OUT_OF_RANGE' });
  t.throws(() => watchFd(1.5, () => {}), { code: 'ERR_OUT_OF_RANGE' });
  t.throws(() => watchFd('3' as unknown as number, () => {}), { code: 'ERR_INVALID_ARG_TYPE' });
  const fd = EventFd.create();
  t.throws(() => watchFd(fd.fd, null as unknown as () => void), { code: 'ERR_INVALID_ARG_TYPE' });
  fd.close();
  t.throws(() => watchFd(999_999, () => {}), { code: 'EBADF' });
});

t.test('a worker that ends, or is terminated, with watches open leaves the process intact', async (t) => {
  // The addon itself, loaded in a worker without our TypeScript: its per-thread cleanup closes
  // the watches a thread leaves open.
  const addon = new URL('../../build/Release/node_kvm.node', import.meta.url).pathname;
  const source = `
    const { parentPort, workerData } = require('node:worker_threads');
    const native = require(workerData.addon);
    const fd = native.createEventFd(1, false, true);
    let calls = 0;
    native.watchFd(fd, () => { if (++calls === 1) parentPort.postMessage('readable'); });
    if (workerData.end) setTimeout(() => process.exit(0), 20);
  `;
  for (const end of [true, false]) {
    const worker = new Worker(source, { eval: true, workerData: { addon, end } });
    const first = await new Promise((resolve) => worker.once('message', resolve));
    t.equal(first, 'readable', 'an eventfd holding 1 reads as readable');
    const exit = end ? await new Promise((resolve) => worker.once('exit', resolve)) : await worker.terminate();
    t.type(exit, 'number', end ? 'ended by itself' : 'terminated');
  }
});
