// Userfaultfd over guest memory: another thread's access to a missing page blocks until this
// thread places it; ranges are checked against the memory; pages already there stay as they are.
import t from 'tap';
import { GuestMemory, Userfaultfd, watchFd } from '../../lib/index.js';
import { FixtureWorker } from '../helpers/worker.js';

const PAGE = 4096;

t.test('a missing page blocks the reader until copy() or zero() places it', async (t) => {
  const memory = GuestMemory.create(64 * PAGE, { backing: 'memfd' });
  t.teardown(() => memory.close());
  memory.fill(3 * PAGE, PAGE, 0x33); // present before registering: never faults
  const uffd = Userfaultfd.register(memory);
  t.teardown(() => uffd.close());
  const reader = new FixtureWorker('uffd-reader', { memory: memory.handle });
  t.teardown(() => reader.worker.terminate());
  t.equal(await reader.next(), 'ready');

  t.same(await (reader.post({ pages: [3] }), reader.next()), [0x33], 'a present page reads at once');

  const faults: number[] = [];
  let onFault: () => void = () => {};
  const watch = watchFd(uffd.fd, () => {
    faults.push(...uffd.readFaults());
    onFault();
  });
  t.teardown(() => watch.close());
  const faulted = () => new Promise<void>((resolve) => (onFault = resolve));

  reader.post({ pages: [5] });
  await faulted();
  t.same(faults, [5], 'the fault names the page');
  const data = new Uint8Array(PAGE).fill(0xa5);
  t.equal(uffd.copy(5, data), 1, 'one page placed');
  t.same(await reader.next(), [0xa5], 'the reader goes on with the copied bytes');

  reader.post({ pages: [9] });
  await faulted();
  t.equal(uffd.zero(9, 1), 1);
  t.same(await reader.next(), [0], 'a zero page');

  t.equal(uffd.copy(5, new Uint8Array(PAGE).fill(0x11)), 0, 'a page already there is left alone (EEXIST)');
  t.equal(uffd.copy(4, new Uint8Array(3 * PAGE).fill(0x44)), 2, 'a range across a present page places the others');
  t.same(await (reader.post({ pages: [4, 5, 6] }), reader.next()), [0x44, 0xa5, 0x44]);
  t.same(faults, [5, 9], 'no fault for pages placed before they were read');
});

t.test('ranges outside the memory and bad arguments are refused; close() unregisters', async (t) => {
  const memory = GuestMemory.create(16 * PAGE, { backing: 'memfd' });
  t.teardown(() => memory.close());
  const uffd = Userfaultfd.register(memory);
  t.throws(() => uffd.copy(15, new Uint8Array(2 * PAGE)), { code: 'ERR_OUT_OF_RANGE' }, 'past the end');
  t.throws(() => uffd.copy(16, new Uint8Array(PAGE)), { code: 'ERR_OUT_OF_RANGE' });
  t.throws(() => uffd.copy(0, new Uint8Array(100)), { code: 'ERR_INVALID_ARG_VALUE' }, 'not whole pages');
  t.throws(() => uffd.copy(-1, new Uint8Array(PAGE)), { code: 'ERR_OUT_OF_RANGE' });
  t.throws(() => uffd.zero(0, 17), { code: 'ERR_OUT_OF_RANGE' });
  t.throws(() => uffd.wake(10, 7), { code: 'ERR_OUT_OF_RANGE' });
  t.throws(() => uffd.copy(0, 'x' as unknown as Uint8Array), TypeError);
  t.throws(() => Userfaultfd.register({} as GuestMemory), TypeError);
  t.same(uffd.readFaults(), [], 'no faults pending: an empty list, at once');
  uffd.close();
  t.throws(() => uffd.copy(0, new Uint8Array(PAGE)), { code: 'EBADF' });
  uffd.close();
  t.equal(memory.bytes()[0], 0, 'unregistered: a hole reads as zero again, from this thread');
});
