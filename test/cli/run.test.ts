// `node-kvm run`: guests whose console is the command's stdout as child processes, from the
// TypeScript source (the child inherits tap's loader); exits, argument errors and help in this
// process.
import { writeFileSync } from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { requireApiSocket } from '../../lib/cli/api-client.js';
import { checkRunSource, parseAddress, parseDiskOption, parseSize } from '../../lib/cli/run.js';
import { migrationToken } from '../../lib/cli/token.js';
import { nodeKvmInProcess, startNodeKvm } from '../helpers/cli.js';
import { noKvm, repoRoot, throwsArgError } from '../helpers/kvm.js';

const guest = (name: string) => path.join(repoRoot, 'guests', 'build', `${name}.bin`);
const nodeKvm = (...args: string[]) => startNodeKvm(args).result;
/** For argument errors: the thread run starts is one from the built bundle, which only starts and quits. */
const badRun = (...args: string[]) => nodeKvmInProcess(['run', ...args], { builtFirstThread: true });

t.test('run boots a guest with its console on stdout and exits 0 on HLT', { skip: noKvm }, async (t) => {
  const result = await nodeKvm('run', guest('hello'));
  t.equal(result.stdout, 'Hello from node-kvm!\n');
  t.equal(result.status, 0, result.stderr);
});

t.test('the exit status is (debug-exit value << 1) | 1, and unknown accesses are logged', { skip: noKvm }, async (t) => {
  const result = await nodeKvm('run', guest('wild'), '--memory', '1M');
  t.equal(result.stdout, 'wild ok\n');
  t.equal(result.status, (0x33 << 1) | 1);
  t.match(result.stderr, /unknown port write to 0x2f0/);
  t.match(result.stderr, /unknown MMIO write to 0x100000/);
});

// These guests print nothing on their console, so they can run in this process.
t.test('a triple fault exits 1 with one line and a register dump', { skip: noKvm }, async (t) => {
  const result = await nodeKvmInProcess(['run', guest('triple'), '--mode', 'protected', '--memory', '2M']);
  t.equal(result.status, 1);
  t.match(result.stderr, /^node-kvm: guest stopped: shutdown on vCPU 0 \(triple fault\)\n/);
  t.match(result.stderr, /rax 0x0000000000001111 rbx 0x0000000000002222/);
  t.match(result.stderr, /idt 0x0000000000001000\/2047/);
});

t.test('--no-irqchip: no interrupt controllers and no firmware tables for the guest to find', { skip: noKvm }, async (t) => {
  const tables = path.join(repoRoot, 'guests', 'build', 'pc-tables.elf');
  const result = await nodeKvm('run', tables, '--memory', '16M', '--no-irqchip');
  t.equal(result.stdout, 'FAIL: no RSDP in 0xe0000-0xfffff\n');
  t.equal(result.status, (0x11 << 1) | 1, result.stderr);
  const refused = await badRun('--restore', '/nonexistent.snap', '--no-irqchip');
  t.equal(refused.status, 1);
  t.match(refused.stderr, /^node-kvm: --no-irqchip applies to booting an IMAGE only/);
});

t.test('a reset exits 0', { skip: noKvm }, async (t) => {
  const result = await nodeKvmInProcess(['run', guest('reset')]);
  t.equal(result.status, 0, result.stderr);
});

t.test('bad input is one clear line and status 1', async (t) => {
  const missing = await badRun('/nonexistent/guest.bin');
  t.equal(missing.status, 1);
  t.equal(missing.stderr, 'node-kvm: cannot read the image /nonexistent/guest.bin: ENOENT\n');
  const empty = path.join(t.testdir(), 'empty.bin');
  writeFileSync(empty, '');
  const emptyRun = await badRun(empty);
  t.equal(emptyRun.status, 1);
  t.equal(emptyRun.stderr.trim().split('\n').length, 1, emptyRun.stderr);
  const badMemory = await badRun(guest('hello'), '--memory', 'lots');
  t.equal(badMemory.status, 1);
  t.match(badMemory.stderr, /^node-kvm: --memory: 'lots' is not a size/);
  const badMode = await badRun(guest('hello'), '--mode', 'unreal');
  t.match(badMode.stderr, /--mode must be real, protected or long/);
  const noImage = await badRun();
  t.equal(noImage.status, 1);
  t.match(noImage.stderr, /run takes one IMAGE/);
});

t.test("the command's option errors carry ERR_INVALID_ARG_VALUE; main() prints only their message", async (t) => {
  throwsArgError(t, () => parseDiskOption(',ro'), 'ERR_INVALID_ARG_VALUE', "--disk needs a file: --disk FILE[,ro][,id=ID], got ',ro'");
  throwsArgError(t, () => parseDiskOption('a.img,rw'), 'ERR_INVALID_ARG_VALUE', "--disk a.img,rw: unknown flag 'rw' (ro, id=ID)");
  t.same(parseDiskOption('a.img,ro,id=data'), { path: 'a.img', readOnly: true, id: 'data' });
  throwsArgError(t, () => parseSize('lots'), 'ERR_INVALID_ARG_VALUE', "--memory: 'lots' is not a size like 64M, 1.5G or 0x4000000");
  throwsArgError(t, () => parseAddress('0xzz', '--load-addr'), 'ERR_INVALID_ARG_VALUE', "--load-addr: '0xzz' is not an address (decimal or 0x hex)");
  throwsArgError(t, () => checkRunSource({ image: 'a', kernel: 'b' }), 'ERR_INVALID_ARG_VALUE', 'give the kernel as IMAGE or as --kernel FILE, not both');
  throwsArgError(t, () => migrationToken(''), 'ERR_INVALID_ARG_VALUE', '--token must not be empty');
  throwsArgError(t, () => requireApiSocket(undefined, 'pause'), 'ERR_INVALID_ARG_VALUE', 'pause needs --api-socket PATH (the socket a machine serves with node-kvm run --api-socket)');
  const printed = await nodeKvmInProcess(['run', '--disk', ',ro', guest('hello')], { builtFirstThread: true });
  t.equal(printed.status, 1);
  t.equal(printed.stderr, "node-kvm: --disk needs a file: --disk FILE[,ro][,id=ID], got ',ro'\n", 'one line, as before: no code, no stack');
});

t.test('run --help', async (t) => {
  const result = await nodeKvmInProcess(['run', '--help']);
  t.equal(result.status, 0);
  t.match(result.stdout, /usage: node-kvm run IMAGE/);
  t.match(result.stdout, /--vcpus N/);
});

t.test('--disk FILE[,ro][,id=ID] gives the guest virtio-blk disks', { skip: noKvm }, async (t) => {
  const rw = path.join(t.testdir(), 'rw.img');
  const ro = path.join(t.testdir(), 'ro.img');
  writeFileSync(rw, Buffer.concat([Buffer.from('cli disk\n'), Buffer.alloc(64 * 1024)]));
  writeFileSync(ro, Buffer.concat([Buffer.from('cli read-only\n'), Buffer.alloc(32 * 1024)]));
  const disk = path.join(repoRoot, 'guests', 'build', 'disk.elf');
  const result = await nodeKvm('run', disk, '--disk', `${rw},id=cli-0`, '--disk', `${ro},ro`);
  t.equal(result.status, (0x10 << 1) | 1, result.stderr);
  t.match(result.stdout, 'disk0: 128 sectors, rw, id "cli-0"\n', 'a partial last sector is not part of the disk');
  t.match(result.stdout, 'disk0: sector 0 says "cli disk"\n');
  t.match(result.stdout, 'disk1: 64 sectors, ro, id "ro.img"\n');
  t.match(result.stdout, 'disk1: write refused (read-only)\n');
  const bad = await badRun(disk, '--disk', `${rw},rw`);
  t.equal(bad.status, 1);
  t.match(bad.stderr, /^node-kvm: --disk .*rw\.img,rw: unknown flag 'rw' \(ro, id=ID\)\n$/);
});
