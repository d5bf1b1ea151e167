// The `net` configuration: checks, default MACs, and what a saved machine's cards need.
import t from 'tap';
import { checkShape } from '../../lib/migration/state-sections.js';
import { checkNetConfigs, netConfigsFor, netMismatch } from '../../lib/vmm/nets.js';
import { throwsArgError } from '../helpers/kvm.js';

t.test('checkNetConfigs fills in MACs and refuses what cannot work', async (t) => {
  t.same(checkNetConfigs(undefined), []);
  t.same(checkNetConfigs([{ tap: 'tap0' }, { fd: 7, mac: '02:AA:bb:CC:dd:EE' }, { tap: 'tap1', netns: '/run/netns/x' }]), [
    { tap: 'tap0', mac: '52:54:00:12:34:56' },
    { fd: 7, mac: '02:aa:bb:cc:dd:ee' },
    { tap: 'tap1', netns: '/run/netns/x', mac: '52:54:00:12:34:58' },
  ]);
  throwsArgError(t, () => checkNetConfigs({}), 'ERR_INVALID_ARG_TYPE', /net must be an array/);
  throwsArgError(t, () => checkNetConfigs([{}]), 'ERR_INVALID_ARG_TYPE', 'net[0] needs either tap (a TAP\'s name) or fd (an open TAP)');
  throwsArgError(t, () => checkNetConfigs([{ tap: 'a', fd: 3 }]), 'ERR_INVALID_ARG_TYPE', /either tap/);
  throwsArgError(t, () => checkNetConfigs([{ tap: 'x'.repeat(16) }]), 'ERR_INVALID_ARG_VALUE', /1\.\.15 bytes/);
  throwsArgError(t, () => checkNetConfigs([{ fd: -1 }]), 'ERR_INVALID_ARG_TYPE', /fd must be an open fd/);
  throwsArgError(t, () => checkNetConfigs([{ fd: 3, netns: '/run/netns/x' }]), 'ERR_INVALID_ARG_VALUE', /netns applies to tap only/);
  throwsArgError(t, () => checkNetConfigs([{ tap: 'a', mac: 'nope' }]), 'ERR_INVALID_ARG_VALUE', /six hex bytes/);
  throwsArgError(t, () => checkNetConfigs([{ tap: 'a' }, { tap: 'b', mac: '52:54:00:12:34:56' }]), 'ERR_INVALID_ARG_VALUE', /same MAC/);
});

t.test('a saved machine keeps its MACs on the TAPs this host gives', async (t) => {
  const saved = [{ mac: '02:00:00:00:00:01' }];
  t.same(netConfigsFor(saved, [{ tap: 'dst0', netns: '/run/netns/b' }]), [{ tap: 'dst0', netns: '/run/netns/b', mac: '02:00:00:00:00:01' }]);
  t.same(netConfigsFor([], undefined), []);
  throwsArgError(t, () => netConfigsFor(saved, undefined), 'ERR_INVALID_ARG_VALUE', /had 1 network card; give a TAP for each in net \(got 0\)/);
  throwsArgError(t, () => netConfigsFor(saved, [{ tap: 'x', mac: '02:00:00:00:00:02' }]), 'ERR_INVALID_ARG_VALUE', /is not the saved card's/);
  t.equal(netMismatch(saved, saved), null);
  t.equal(netMismatch(undefined, []), null);
  t.equal(netMismatch(saved, undefined), 'it had 1 network card, this machine 0');
  t.equal(netMismatch(saved, [{ mac: '02:00:00:00:00:09' }]), 'network card 0 had MAC 02:00:00:00:00:01, this machine\'s 02:00:00:00:00:09');
});

t.test('a stream\'s machine shape carries the cards\' MACs, checked', async (t) => {
  const base = { memoryBytes: 1 << 20, vcpus: 1, irqchip: true };
  t.same(checkShape({ ...base, net: [{ mac: '52:54:00:12:34:56' }] }, 'here').net, [{ mac: '52:54:00:12:34:56' }]);
  t.equal(checkShape(base, 'here').net, undefined);
  t.throws(() => checkShape({ ...base, net: [{ mac: 'zz' }] }, 'here'), /here: bad description of network card 0/);
  t.throws(() => checkShape({ ...base, net: 'x' }, 'here'), /here: bad network card list/);
});
