// TAP devices opened inside a network namespace the test creates: the fd's frames carry the
// 12-byte virtio_net_hdr_v1 both ways, reads do not block, and failures say why.
import t from 'tap';
import { closeSync, readvSync, writevSync } from 'node:fs';
import { adoptTap, openTap } from '../../lib/kvm/tap.js';
import { KvmError } from '../../lib/kvm/errors.js';
import { watchFd } from '../../lib/kvm/fd-watch.js';
import { NetNamespace, noNetns } from '../helpers/netns.js';
import { throwsArgError } from '../helpers/kvm.js';

const GUEST_MAC = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

t.test('argument checks', async (t) => {
  throwsArgError(t, () => openTap('a-name-that-is-too-long'), 'ERR_INVALID_ARG_VALUE', /at most 15 bytes/);
  throwsArgError(t, () => openTap(7 as unknown as string), 'ERR_INVALID_ARG_TYPE', 'name must be a string');
  throwsArgError(t, () => adoptTap(-1), 'ERR_OUT_OF_RANGE', /fd/);
});

t.test('a TAP in a namespace: frames both ways with the vnet header', { skip: noNetns }, async (t) => {
  const ns = NetNamespace.create();
  t.teardown(() => ns.remove());
  const tap = openTap('nkvm0', { netns: ns.path });
  t.teardown(() => closeSync(tap.fd));
  t.equal(tap.name, 'nkvm0');
  // The TAP is in the namespace, not in the host's.
  t.doesNotThrow(() => ns.ip(['link show nkvm0']));

  const busy = thrown(() => openTap('nkvm0', { netns: ns.path }));
  t.equal(busy.code, 'EBUSY');
  t.match(busy.message, /cannot open the TAP "nkvm0" in the network namespace .*: another process has it open/);
  const noNs = thrown(() => openTap('nkvm0', { netns: '/run/netns/nkvm-none' }));
  t.equal(noNs.code, 'ENOENT');
  t.match(noNs.message, /no such network namespace/);
  const notTap = thrown(() => adoptTap(0));
  t.match(notTap.message, /fd 0 is not an open TAP device/);

  // Nothing queued yet: a read fails with EAGAIN at once instead of blocking.
  t.equal(thrown(() => readvSync(tap.fd, [Buffer.alloc(2048)])).code, 'EAGAIN');

  ns.ip(['addr add 10.9.0.1/24 dev nkvm0', 'link set nkvm0 up', `neigh add 10.9.0.2 lladdr ${mac(GUEST_MAC)} dev nkvm0 nud permanent`]);
  // A host program sends a datagram to the "guest" at 10.9.0.2 and waits for the echo.
  const child = ns.exec(['node', '-e', `
    const s = require('dgram').createSocket('udp4');
    s.bind(9000, '10.9.0.1', () => s.send('hello tap', 7, '10.9.0.2'));
    s.on('message', (m, r) => { console.log(m.toString() + ' from ' + r.address + ':' + r.port); s.close(); });
  `]);
  const frame = await nextUdpFrame(tap.fd);
  t.same([...frame.subarray(0, 12)], new Array(12).fill(0), 'a zero virtio_net_hdr: no offloads, no GSO');
  const ether = frame.subarray(12);
  t.same([...ether.subarray(0, 6)], GUEST_MAC, 'to the guest MAC');
  t.equal(Buffer.from(ether.subarray(42)).toString(), 'hello tap');
  // The reply goes back through the TAP with a header in front, as a guest would send it.
  writevSync(tap.fd, [new Uint8Array(12), udpEcho(ether)]);
  const { code, stdout } = await child;
  t.equal(code, 0);
  t.equal(stdout.trim(), 'hello tap from 10.9.0.2:7');

  // An fd the library hands over: adopted as a duplicate, the caller's copy can close.
  const own = adoptTap(tap.fd);
  t.not(own.fd, tap.fd);
  t.equal(own.name, 'nkvm0');
  closeSync(own.fd);
});

function thrown(fn: () => unknown): KvmError {
  try {
    fn();
  } catch (error) {
    return error as KvmError;
  }
  throw new Error('did not throw');
}

const mac = (bytes: number[]) => bytes.map((b) => b.toString(16).padStart(2, '0')).join(':');

/** The next IPv4 UDP frame from the TAP (IPv6 chatter skipped), header included. */
function nextUdpFrame(fd: number): Promise<Buffer> {
  return new Promise((resolve) => {
    const watch = watchFd(fd, () => {
      for (;;) {
        const buffer = Buffer.alloc(2048);
        let n: number;
        try {
          n = readvSync(fd, [buffer]);
        } catch {
          return;
        }
        const frame = buffer.subarray(0, n);
        if (frame.readUInt16BE(12 + 12) === 0x0800 && frame[12 + 23] === 17) {
          watch.close();
          resolve(frame);
          return;
        }
      }
    });
  });
}

/** The frame's UDP datagram sent back (addresses and ports swapped, no UDP checksum). */
function udpEcho(frame: Uint8Array): Uint8Array {
  const out = Buffer.from(frame);
  out.set(frame.subarray(6, 12), 0);
  out.set(frame.subarray(0, 6), 6);
  out.set(frame.subarray(30, 34), 26);
  out.set(frame.subarray(26, 30), 30);
  out.set(frame.subarray(36, 38), 34);
  out.set(frame.subarray(34, 36), 36);
  out.writeUInt16BE(0, 40);
  out.writeUInt16BE(0, 24);
  let sum = 0;
  for (let i = 14; i < 34; i += 2) sum += out.readUInt16BE(i);
  while (sum > 0xffff) sum = (sum & 0xffff) + (sum >>> 16);
  out.writeUInt16BE(~sum & 0xffff, 24);
  return out;
}
