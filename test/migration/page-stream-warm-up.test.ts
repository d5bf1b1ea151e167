// The destination's warm-up before it listens: a made-up page stream parsed, and the stream's
// start (header, Config) read and written over a stream in memory; it touches no socket and
// leaves nothing running.
import t from 'tap';
import { warmUpPageStream } from '../../lib/migration/page-stream-warm-up.js';

t.test('runs once, settles within a few turns of the event loop, and leaves no handle behind', async (t) => {
  const active = () => (process as unknown as { _getActiveHandles(): unknown[] })._getActiveHandles().length;
  const handles = active();
  t.doesNotThrow(() => warmUpPageStream());
  for (let turn = 0; turn < 5; turn++) await new Promise((resolve) => setImmediate(resolve));
  t.equal(active(), handles, 'no socket, no timer left');
  t.doesNotThrow(() => warmUpPageStream(), 'again: nothing more to do');
});
