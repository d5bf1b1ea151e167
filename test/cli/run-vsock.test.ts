// node-kvm run --vsock: the option's parsing, and a guest served on the socket it names, reached
// by a separate program over the hybrid protocol (CONNECT/OK), as with Firecracker.
import t from 'tap';
import { once } from 'node:events';
import { mkdtempSync, rmSync } from 'node:fs';
import { createConnection } from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { checkRunSource } from '../../lib/cli/run.js';
import { parseRunArgs, parseVsockOption } from '../../lib/cli/run-options.js';
import { startNodeKvm } from '../helpers/cli.js';
import { noKvm, repoRoot, throwsArgError } from '../helpers/kvm.js';

t.test('--vsock cid=N,uds=PATH is parsed and checked', async (t) => {
  t.same(parseVsockOption('cid=3,uds=/run/v.sock'), { cid: 3, uds: '/run/v.sock' });
  t.same(parseVsockOption('uds=/run/v.sock'), { uds: '/run/v.sock' }, 'cid may be left out (restore, incoming)');
  throwsArgError(t, () => parseVsockOption('cid=3'), 'ERR_INVALID_ARG_VALUE', '--vsock cid=3: uds=PATH is missing');
  throwsArgError(t, () => parseVsockOption('cid=x,uds=/a'), 'ERR_INVALID_ARG_VALUE', "--vsock cid=x,uds=/a: 'cid=x' is not cid=N or uds=PATH");
  throwsArgError(t, () => checkRunSource({ image: 'a.elf', vsock: 'uds=/a' }), 'ERR_INVALID_ARG_VALUE', '--vsock needs cid=N when booting an IMAGE');
  t.equal(parseRunArgs(['a.elf', '--vsock', 'cid=3,uds=/a']).options.vsock, 'cid=3,uds=/a', 'an option of the table (and so a configuration field)');
  throwsArgError(t, () => parseRunArgs(['a.elf', '--vsock', 'cid=3']), 'ERR_INVALID_ARG_VALUE', '--vsock cid=3: uds=PATH is missing');
});

t.test('a program outside reaches the guest through the socket', { skip: noKvm }, async (t) => {
  const dir = mkdtempSync(path.join(tmpdir(), 'node-kvm-run-vsock-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const uds = path.join(dir, 'v.sock');
  const child = startNodeKvm(['run', path.join(repoRoot, 'guests', 'build', 'vsock-echo.elf'), '--memory', '16M', '--vsock', `cid=7,uds=${uds}`, '--serial', 'stdio']);
  t.teardown(() => child.kill('SIGKILL'));
  await child.waitFor(/vsock-echo: ready, cid 7, port 5000\n/);
  const socket = createConnection(uds);
  socket.write('CONNECT 5000\nfirst bytes');
  let received = '';
  socket.on('data', (chunk: Buffer) => (received += chunk.toString()));
  while (!received.endsWith('first bytes')) await once(socket, 'data');
  t.match(received, /^OK \d+\nfirst bytes$/, 'the OK line, then the echo of what followed the CONNECT line');
  socket.destroy();
  child.kill('SIGTERM');
  await child.result;
});
