import t from 'tap';
import { Worker } from 'node:worker_threads';
t.test('w', async (t) => {
  for (let i = 0; i < 3; i++) {
  const t0 = performance.now();
  const w = new Worker(new URL('../fixtures/zz-probe-worker.ts', import.meta.url));
  const msg = await new Promise((res, rej) => { w.once('message', res); w.once('error', rej); });
  t.comment(`msg after ${performance.now() - t0}`);
  await new Promise((res) => w.once('exit', res));
  }
  const t0 = performance.now();
  const ws = [0,1,2,3].map(() => new Worker(new URL('../fixtures/zz-probe-worker.ts', import.meta.url)));
  await Promise.all(ws.map(w => new Promise((res) => w.once('exit', res))));
  t.comment(`4 parallel ${performance.now() - t0}`);
  const t1 = performance.now();
  const w = new Worker(`import('${new URL('../../lib/index.ts', import.meta.url)}').then(()=>{})`, { eval: true });
  await new Promise((res) => w.once('exit', res));
  t.comment(`eval import ${performance.now() - t1}`);
});
