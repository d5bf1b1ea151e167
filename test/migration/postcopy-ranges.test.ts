// The page sets and range payloads of post-copy (pure code).
import t from 'tap';
import { PageSet, decodePageRanges, encodePageRanges, percentile, rangesOfPages } from '../../lib/migration/postcopy-ranges.js';
import { viewOf } from '../../lib/migration/format.js';

t.test('range payloads round-trip and are checked against guest RAM', async (t) => {
  const ranges = [{ firstPage: 0, pageCount: 3 }, { firstPage: 100, pageCount: 1 }, { firstPage: 2 ** 20, pageCount: 2 }];
  const payload = encodePageRanges(ranges);
  t.equal(payload.length, 4 + 3 * 16);
  t.same([...payload.subarray(0, 4)], [3, 0, 0, 0]);
  t.same(decodePageRanges(payload, 2 ** 20 + 2, 'x'), ranges);
  t.same(decodePageRanges(encodePageRanges([]), 1, 'x'), []);
  t.throws(() => decodePageRanges(payload, 2 ** 20 + 1, 'the Postcopy section'), { code: 'EFORMAT', message: /^the Postcopy section: range 2 \(2 pages from page 1048576\) lies outside guest RAM/ });
  t.throws(() => decodePageRanges(payload.subarray(0, 20), 2 ** 21, 'x'), { code: 'EFORMAT', message: 'x: 3 ranges announced in 20 bytes' });
  t.throws(() => decodePageRanges(new Uint8Array(2), 1, 'x'), { code: 'EFORMAT' });
  const zero = encodePageRanges([{ firstPage: 1, pageCount: 1 }]);
  viewOf(zero).setUint32(12, 0, true);
  t.throws(() => decodePageRanges(zero, 10, 'x'), { code: 'EFORMAT', message: /range 0 \(0 pages/ }, 'an empty range');
  const reserved = encodePageRanges([{ firstPage: 1, pageCount: 1 }]);
  viewOf(reserved).setUint32(16, 1, true);
  t.throws(() => decodePageRanges(reserved, 10, 'x'), { message: 'x: range 0 has a non-zero reserved field' });
  t.throws(() => encodePageRanges([{ firstPage: -1, pageCount: 1 }]), { code: 'ERR_OUT_OF_RANGE' });
  t.throws(() => encodePageRanges([{ firstPage: 0, pageCount: 0 }]), { code: 'ERR_OUT_OF_RANGE' });
});

t.test('PageSet: counts, ranges, the next page from a cursor', async (t) => {
  const set = new PageSet(16);
  set.addRanges([{ firstPage: 2, pageCount: 3 }, { firstPage: 10, pageCount: 1 }]);
  set.add(3);
  t.equal(set.size, 4);
  t.same(set.ranges(), [{ firstPage: 2, pageCount: 3 }, { firstPage: 10, pageCount: 1 }]);
  t.equal(set.nextFrom(5), 10);
  t.equal(set.nextFrom(11), 2, 'wraps around');
  t.ok(set.delete(3));
  t.notOk(set.delete(3), 'a second delete finds nothing');
  t.same(set.ranges(), [{ firstPage: 2, pageCount: 1 }, { firstPage: 4, pageCount: 1 }, { firstPage: 10, pageCount: 1 }]);
  set.clear();
  t.equal(set.size, 0);
  t.equal(set.nextFrom(0), -1);
});

t.test('rangesOfPages and percentile', async (t) => {
  t.same(rangesOfPages([7, 3, 4, 4, 5, 9]), [{ firstPage: 3, pageCount: 3 }, { firstPage: 7, pageCount: 1 }, { firstPage: 9, pageCount: 1 }]);
  t.same(rangesOfPages([]), []);
  const values = Array.from({ length: 100 }, (_, i) => 100 - i);
  t.equal(percentile(values, 50), 50);
  t.equal(percentile(values, 90), 90);
  t.equal(percentile(values, 99), 99);
  t.equal(percentile([4], 99), 4);
  t.equal(percentile([], 50), 0);
});
