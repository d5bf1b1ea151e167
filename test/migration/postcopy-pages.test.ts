// Post-copy's placement at the destination (PostcopyPages): page data read into a lent read buffer
// is placed from it once its section checks out, a page split across two reads is put together,
// data from anyone else's buffer is copied first, and a section dropped (its connection broke)
// places nothing and gives its buffers back.
import { randomBytes } from 'node:crypto';
import t from 'tap';
import { GuestMemory } from '../../lib/index.js';
import { PostcopyPages, setPostcopyDirectPlacement } from '../../lib/migration/postcopy-destination.js';
import { noKvm } from '../helpers/kvm.js';

const PAGE = 4096;
const done = { pages: 0, zeroPages: 0 };

function setUp(t: { teardown(fn: () => unknown): void }) {
  const memory = GuestMemory.create(64 * PAGE, { backing: 'memfd' });
  const pages = new PostcopyPages(memory, [{ firstPage: 0, pageCount: 64 }]);
  t.teardown(() => {
    pages.close();
    memory.close();
  });
  return { memory, pages, target: pages.target as Required<typeof pages.target> };
}

t.test('a section split mid-page across two lent buffers is placed whole, from them', { skip: noKvm }, async (t) => {
  const { memory, pages, target } = setUp(t);
  const data = randomBytes(4 * PAGE);
  const first = pages.readBuffer()!;
  t.ok(first instanceof Uint8Array && first.length >= 6100, 'a read buffer is lent');
  first.set(data.subarray(0, 6000), 100);
  target.writePages(10 * PAGE, first.subarray(100, 6100));
  const second = pages.readBuffer()!;
  t.not(second, first, 'a buffer holding page data of an unchecked section is not lent again');
  second.set(data.subarray(6000), 0);
  target.writePages(10 * PAGE + 6000, second.subarray(0, 4 * PAGE - 6000));
  t.equal(pages.lackingCount, 64, 'nothing placed before the section checks out');
  target.pagesDone(done);
  t.equal(pages.lackingCount, 60, 'four pages placed');
  t.ok(Buffer.from(memory.bytes(10 * PAGE, 4 * PAGE)).equals(data), 'byte for byte, the split page too');
  t.equal(pages.readBuffer(), second, 'the last buffer is lent again once its section is placed');
});

t.test('a dropped section places nothing and frees its buffers; data from another buffer is copied first', { skip: noKvm }, async (t) => {
  const { memory, pages, target } = setUp(t);
  const lent = pages.readBuffer()!;
  lent.fill(0x77, 0, 2 * PAGE);
  target.writePages(20 * PAGE, lent.subarray(0, 2 * PAGE));
  pages.dropStaged();
  t.equal(pages.lackingCount, 64, 'a dropped section placed nothing');
  t.equal(pages.readBuffer(), lent, 'and holds no buffer');

  const own = new Uint8Array(PAGE).fill(0x5a);
  target.writePages(30 * PAGE, own);
  own.fill(0); // the caller's buffer is reused at once (the first connection's read buffer)
  target.pagesDone(done);
  t.ok(memory.bytes(30 * PAGE, PAGE).every((byte) => byte === 0x5a), 'data from a buffer not lent was copied as it came');

  setPostcopyDirectPlacement(false);
  t.teardown(() => setPostcopyDirectPlacement(true));
  t.equal(pages.readBuffer(), null, 'no buffer lent with direct placement off (the benchmark\'s staged row)');
});
