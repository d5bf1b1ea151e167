// `node-kvm run --net tap=NAME[,mac=MAC][,netns=PATH]`.
import t from 'tap';
import { parseNetOption } from '../../lib/cli/run.js';
import { throwsArgError } from '../helpers/kvm.js';

t.test('--net values', async (t) => {
  t.same(parseNetOption('tap=tap0'), { tap: 'tap0' });
  t.same(parseNetOption('tap=tap1,mac=02:00:00:00:00:01,netns=/run/netns/a'), { tap: 'tap1', mac: '02:00:00:00:00:01', netns: '/run/netns/a' });
  throwsArgError(t, () => parseNetOption('mac=02:00:00:00:00:01'), 'ERR_INVALID_ARG_VALUE', "--net needs a TAP: --net tap=NAME[,mac=MAC][,netns=PATH], got 'mac=02:00:00:00:00:01'");
  throwsArgError(t, () => parseNetOption('tap0'), 'ERR_INVALID_ARG_VALUE', "--net tap0: 'tap0' is not KEY=VALUE (tap=NAME, mac=MAC, netns=PATH)");
  throwsArgError(t, () => parseNetOption('tap=a,vhost=on'), 'ERR_INVALID_ARG_VALUE', "--net tap=a,vhost=on: unknown key 'vhost' (tap, mac, netns)");
  throwsArgError(t, () => parseNetOption('tap='), 'ERR_INVALID_ARG_VALUE', /is not KEY=VALUE/);
});
