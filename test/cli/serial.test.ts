// `node-kvm run --serial`: stdio through a pipe (child processes: the guest's output is fd 1),
// unix:PATH, file:PATH and none; and the control API's stop and reset ending the run.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import t, { type Test } from 'tap';
import { callApi } from '../../lib/cli/api-client.js';
import { CONSOLE_BUSY_MESSAGE, parseSerialOption } from '../../lib/cli/serial.js';
import { nodeKvmInProcess, startNodeKvm } from '../helpers/cli.js';
import { connectConsole, waitForPath } from '../helpers/console-client.js';
import { noKvm, repoRoot, throwsArgError } from '../helpers/kvm.js';

const guest = (name: string) => path.join(repoRoot, 'guests', 'build', `${name}.bin`);
/** echo.bin's exit on 'q': debug-exit 0x05. */
const ECHO_QUIT_STATUS = (0x05 << 1) | 1;

/** A private directory for sockets (a unix socket path must be short: not under t.testdir()). */
function socketDir(t: Test): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nkvm-serial-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

t.test('--serial forms', async (t) => {
  t.same(parseSerialOption(undefined), { kind: 'stdio' });
  t.same(parseSerialOption('stdio'), { kind: 'stdio' });
  t.same(parseSerialOption('none'), { kind: 'none' });
  t.same(parseSerialOption('unix:/run/vm.console'), { kind: 'unix', path: '/run/vm.console' });
  t.same(parseSerialOption('file:out.log'), { kind: 'file', path: 'out.log' });
  throwsArgError(t, () => parseSerialOption('pty'), 'ERR_INVALID_ARG_VALUE', "--serial must be stdio, none, unix:PATH or file:PATH, got 'pty'");
  throwsArgError(t, () => parseSerialOption('unix:'), 'ERR_INVALID_ARG_VALUE', "--serial must be stdio, none, unix:PATH or file:PATH, got 'unix:'");
  const bad = await nodeKvmInProcess(['run', guest('hello'), '--serial', 'tcp:1234'], { builtFirstThread: true });
  t.equal(bad.status, 1);
  t.equal(bad.stderr, "node-kvm: --serial must be stdio, none, unix:PATH or file:PATH, got 'tcp:1234'\n");
  const help = await nodeKvmInProcess(['run', '--help']);
  t.match(help.stdout, /--serial stdio\|none\|unix:PATH\|file:PATH/);
});

t.test('--serial stdio (the default) takes input from a pipe: the echo guest answers and exits with its status', { skip: noKvm }, async (t) => {
  const result = await startNodeKvm(['run', guest('echo')], {}, { input: 'hi q' }).result;
  t.equal(result.stdout, 'echo> hi q');
  t.equal(result.status, ECHO_QUIT_STATUS, result.stderr);
});

t.test('the end of piped input is not a quit: the guest runs on until the API stops it, and run exits 0', { skip: noKvm }, async (t) => {
  const dir = socketDir(t);
  const api = path.join(dir, 'api.sock');
  const run = startNodeKvm(['run', guest('echo'), '--api-socket', api], {}, { input: 'hi' });
  await run.waitFor(/echo> hi/);
  // Its stdin ended with 'hi'; the guest waits for more.
  t.equal((await callApi(api, 'status', {})).state, 'running');
  const stop = await nodeKvmInProcess(['stop', '--api-socket', api]);
  t.equal(stop.stdout, 'stopping\n', stop.stderr);
  t.equal(stop.status, 0);
  const result = await run.result;
  t.equal(result.status, 0, result.stderr);
  t.equal(result.stdout, 'echo> hi');
  t.notOk(fs.existsSync(api), 'the API socket is removed');
});

// While a command runs in this process its stdout is captured, tap's included: the assertions
// come once it has ended.
t.test('--serial unix:PATH: a 0600 socket, one client at a time, kept over a reboot; the API stop ends the run with 0', { skip: noKvm }, async (t) => {
  const dir = socketDir(t);
  const consolePath = path.join(dir, 'console.sock');
  const api = path.join(dir, 'api.sock');
  const run = nodeKvmInProcess(['run', guest('echo'), '--serial', `unix:${consolePath}`, '--api-socket', api]);
  await waitForPath(consolePath);
  const stats = fs.lstatSync(consolePath);
  const client = await connectConsole(consolePath);
  await client.waitFor('echo> ');
  client.socket.write('hi');
  await client.waitFor('echo> hi');
  const second = await connectConsole(consolePath);
  await second.closed;
  client.socket.write('!');
  await client.waitFor('echo> hi!');
  await waitForPath(api);
  const reset = await callApi(api, 'reset', {});
  // The rebooted guest prompts again on the same console.
  await client.waitFor('echo> hi!echo> ');
  const stop = await callApi(api, 'stop', {});
  const result = await run;
  await client.closed;

  t.ok(stats.isSocket());
  t.equal(stats.mode & 0o777, 0o600, 'only its owner may connect');
  t.equal(second.text(), CONSOLE_BUSY_MESSAGE, 'a second client is told why, and closed');
  t.same(reset, { state: 'running' });
  t.same(stop, { state: 'stopping' });
  t.equal(result.status, 0, result.stderr);
  t.match(result.stderr, `node-kvm: serial console on unix:${consolePath}\n`);
  t.equal(client.text(), 'echo> hi!echo> ', 'the first client still had the console');
  t.notOk(fs.existsSync(consolePath), 'the console socket is removed at exit');
  t.notOk(fs.existsSync(api), 'the API socket is removed at exit');
});

t.test('--serial unix:PATH refuses a path that is not a socket, before any guest runs', async (t) => {
  const dir = socketDir(t);
  const file = path.join(dir, 'notes.txt');
  fs.writeFileSync(file, 'keep me');
  const result = await nodeKvmInProcess(['run', guest('hello'), '--serial', `unix:${file}`], { builtFirstThread: true });
  t.equal(result.status, 1);
  t.equal(result.stderr, `node-kvm: --serial unix:${file}: refusing to replace ${file}: it exists and is not a socket\n`);
  t.equal(fs.readFileSync(file, 'utf8'), 'keep me');
});

t.test('--serial file:PATH writes the output to a new 0600 file, or an emptied one', { skip: noKvm }, async (t) => {
  const dir = socketDir(t);
  const fresh = path.join(dir, 'fresh.log');
  const first = await nodeKvmInProcess(['run', guest('hello'), '--serial', `file:${fresh}`]);
  t.equal(first.status, 0, first.stderr);
  t.equal(first.stdout, '');
  t.equal(fs.readFileSync(fresh, 'utf8'), 'Hello from node-kvm!\n');
  t.equal(fs.statSync(fresh).mode & 0o777, 0o600);
  fs.writeFileSync(fresh, 'an older and much longer run of output\n');
  const again = await nodeKvmInProcess(['run', guest('hello'), '--serial', `file:${fresh}`]);
  t.equal(again.status, 0, again.stderr);
  t.equal(fs.readFileSync(fresh, 'utf8'), 'Hello from node-kvm!\n', 'truncated, as QEMU does');
  const unwritable = await nodeKvmInProcess(['run', guest('hello'), '--serial', `file:${dir}/missing/out.log`], { builtFirstThread: true });
  t.equal(unwritable.status, 1);
  t.equal(unwritable.stderr, `node-kvm: --serial file:${dir}/missing/out.log: ENOENT\n`);
});

t.test('--serial none: the output of the guest goes nowhere', { skip: noKvm }, async (t) => {
  const result = await startNodeKvm(['run', guest('hello'), '--serial', 'none']).result;
  t.equal(result.status, 0, result.stderr);
  t.equal(result.stdout, '', 'the guest printed, nothing came out');
});

t.test('the console socket of a run that ends is closed after its last output', { skip: noKvm }, async (t) => {
  const dir = socketDir(t);
  const consolePath = path.join(dir, 'console.sock');
  const run = nodeKvmInProcess(['run', guest('echo'), '--serial', `unix:${consolePath}`]);
  await waitForPath(consolePath);
  const client = await connectConsole(consolePath);
  client.socket.write('abq');
  await client.closed;
  const result = await run;
  t.equal(client.text(), 'echo> abq', 'the guest echoes q before it exits; the client gets it all');
  t.equal(result.status, ECHO_QUIT_STATUS, result.stderr);
});
