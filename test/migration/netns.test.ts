// Live migration between two "hosts": a source and a destination process in two network
// namespaces joined by a veth pair, so the guest crosses a real network link rather than
// loopback. The guest's count goes on at the destination with no gap or restart. Also: a
// destination left on the default host (loopback) cannot be reached from the other namespace.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import path from 'node:path';
import t, { type Test } from 'tap';
import type { MigrationStats } from '../../lib/migration/types.js';
import { noKvm, repoRoot } from '../helpers/kvm.js';
import { isUnbrokenCount, lastPass } from '../helpers/migration.js';

const IP = '/usr/sbin/ip';
const TOKEN = 'netns-token-7a2e';
const destinationFixture = path.join(repoRoot, 'test', 'fixtures', 'migration-destination.ts');
const sourceFixture = path.join(repoRoot, 'test', 'fixtures', 'migration-netns-source.ts');

const sourceNamespace = `nkvm-src-${process.pid}`;
const destinationNamespace = `nkvm-dst-${process.pid}`;
// Interface names are at most 15 bytes (IFNAMSIZ - 1); a pid has at most 7 digits.
const sourceLink = `nkvs${process.pid}`;
const destinationLink = `nkvd${process.pid}`;
const subnet = `10.213.${process.pid % 256}`;
const sourceIp = `${subnet}.1`;
const destinationIp = `${subnet}.2`;

function ip(...args: string[]): { ok: boolean; stderr: string } {
  const result = spawnSync(IP, args, { encoding: 'utf8', timeout: 10_000 });
  return { ok: result.status === 0, stderr: (result.stderr ?? result.error?.message ?? '').trim() };
}

function mustIp(...args: string[]): void {
  const result = ip(...args);
  if (!result.ok) throw new Error(`ip ${args.join(' ')} failed: ${result.stderr}`);
}

/** Why this test cannot run here, or false. Probes with a throwaway namespace holding a veth pair. */
function cannotRun(): string | false {
  if (noKvm) return noKvm;
  if (process.getuid?.() !== 0) return 'not running as root: network namespace migration test skipped';
  if (!existsSync(IP)) return `${IP} (iproute2) is absent: network namespace migration test skipped`;
  const probe = `nkvm-probe-${process.pid}`;
  const added = ip('netns', 'add', probe);
  if (!added.ok) return `ip netns add failed (${added.stderr}; no CAP_SYS_ADMIN?): network namespace migration test skipped`;
  try {
    const veth = ip('-n', probe, 'link', 'add', 'nkvm-probe-a', 'type', 'veth', 'peer', 'name', 'nkvm-probe-b');
    if (!veth.ok) return `creating a veth pair failed (${veth.stderr}): network namespace migration test skipped`;
    return false;
  } finally {
    ip('netns', 'del', probe);
  }
}

const skipReason = cannotRun();
if (skipReason && skipReason !== noKvm) console.log(`# ${skipReason}`);

/** A node process running `fixture` inside `namespace`, with tap's loader (execArgv) for TypeScript. */
interface NamespacedProcess {
  child: ChildProcess;
  stdout(): string;
  stderr(): string;
  /** Resolves when stderr has a line matching `pattern`; rejects if the process ends first. */
  waitForStderr(pattern: RegExp, timeoutMs?: number): Promise<RegExpExecArray>;
  waitForStdout(text: string, timeoutMs?: number): Promise<void>;
  closed: Promise<{ status: number | null; signal: NodeJS.Signals | null }>;
}

function runInNamespace(namespace: string, fixture: string, args: string[]): NamespacedProcess {
  // `ip netns exec` execs the command in place, so the child's pid is node's and signals reach it.
  const child = spawn(IP, ['netns', 'exec', namespace, process.execPath, ...process.execArgv, fixture, ...args], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stdout = '';
  let stderr = '';
  let ended = false;
  child.stdout!.on('data', (chunk: Buffer) => (stdout += chunk.toString('latin1')));
  child.stderr!.on('data', (chunk: Buffer) => (stderr += chunk.toString('latin1')));
  const closed = new Promise<{ status: number | null; signal: NodeJS.Signals | null }>((resolve) => {
    child.on('close', (status, signal) => {
      ended = true;
      resolve({ status, signal });
    });
  });
  async function until<T>(found: () => T | null, what: string, timeoutMs: number): Promise<T> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const value = found();
      if (value !== null) return value;
      if (ended || Date.now() > deadline) {
        throw new Error(`${namespace}: no ${what}${ended ? ' (the process ended)' : ''}; stdout ${JSON.stringify(stdout.slice(-200))}; stderr ${stderr}`);
      }
      await new Promise((resolve) => setTimeout(resolve, 10));
    }
  }
  return {
    child,
    stdout: () => stdout,
    stderr: () => stderr,
    waitForStderr: (pattern, timeoutMs = 30_000) => until(() => pattern.exec(stderr), String(pattern), timeoutMs),
    waitForStdout: (text, timeoutMs = 30_000) => until(() => (stdout.includes(text) ? true : null), JSON.stringify(text), timeoutMs).then(() => {}),
    closed,
  };
}

function killOnTeardown(t: Test, running: NamespacedProcess): void {
  t.teardown(async () => {
    if (running.child.exitCode === null && running.child.signalCode === null) {
      running.child.kill('SIGKILL');
      await running.closed;
    }
  });
}

/** The destination fixture's last JSON line on stderr: { exit, code } or { error, code }. */
function destinationReport(stderr: string): { exit?: string; code?: number | null; error?: string } {
  const last = stderr.trim().split('\n').filter((line) => line.startsWith('{')).pop();
  return last ? JSON.parse(last) : {};
}

/** From inside `namespace`, what a TCP connect to host:port gives: 'connected', 'timeout' or the error code. */
function connectFrom(namespace: string, host: string, port: number): string {
  const script = `
    const socket = require('node:net').connect({ host: process.argv[1], port: Number(process.argv[2]), timeout: 5000 });
    socket.on('connect', () => { console.log('connected'); socket.destroy(); });
    socket.on('timeout', () => { console.log('timeout'); socket.destroy(); });
    socket.on('error', (error) => console.log(error.code));
  `;
  const result = spawnSync(IP, ['netns', 'exec', namespace, process.execPath, '-e', script, host, String(port)], { encoding: 'utf8', timeout: 15_000 });
  return result.stdout.trim() || `no answer (status ${result.status}, ${result.stderr.trim()})`;
}

t.test('live migration between two network namespaces over a veth pair', { skip: skipReason, timeout: 60_000 }, async (t) => {
  for (const namespace of [sourceNamespace, destinationNamespace]) ip('netns', 'del', namespace);
  t.teardown(() => {
    for (const namespace of [sourceNamespace, destinationNamespace]) ip('netns', 'del', namespace);
  });
  mustIp('netns', 'add', sourceNamespace);
  mustIp('netns', 'add', destinationNamespace);
  mustIp('-n', sourceNamespace, 'link', 'add', sourceLink, 'type', 'veth', 'peer', 'name', destinationLink, 'netns', destinationNamespace);
  mustIp('-n', sourceNamespace, 'address', 'add', `${sourceIp}/30`, 'dev', sourceLink);
  mustIp('-n', destinationNamespace, 'address', 'add', `${destinationIp}/30`, 'dev', destinationLink);
  for (const [namespace, link] of [[sourceNamespace, sourceLink], [destinationNamespace, destinationLink]] as const) {
    mustIp('-n', namespace, 'link', 'set', 'lo', 'up');
    mustIp('-n', namespace, 'link', 'set', link, 'up');
  }

  t.test('the running guest moves to the other namespace and goes on counting', { timeout: 30_000 }, async (t) => {
    const destination = runInNamespace(destinationNamespace, destinationFixture, [`tcp:${destinationIp}:0`, TOKEN]);
    killOnTeardown(t, destination);
    const listening = await destination.waitForStderr(/^listening (tcp:(\S+):(\d+))$/m);
    t.equal(listening[2], destinationIp, 'the destination listens on its veth address');
    const bound = listening[1]!;

    const source = runInNamespace(sourceNamespace, sourceFixture, [bound, TOKEN]);
    killOnTeardown(t, source);
    const sourceEnd = await source.closed;
    const sourceTail = () => `stdout ...${JSON.stringify(source.stdout().slice(-400))}; stderr ${source.stderr()}`;
    t.same(sourceEnd, { status: 0, signal: null }, 'the source exits 0', { source: sourceTail() });
    const lines = source.stdout().trim().split('\n').filter((line) => line.startsWith('{')).map((line) => JSON.parse(line) as Record<string, unknown>);
    const sourceOutput = (lines.find((line) => 'console' in line)?.console ?? '') as string;
    const reported = lines.find((line) => 'stats' in line) as { stats: MigrationStats; exit: string } | undefined;
    if (!reported) {
      t.fail(`the source reported no stats: ${sourceTail()}`);
      return;
    }
    t.equal(reported.exit, 'migrated', 'the source ends as migrated');
    t.equal(reported.stats.phase, 'completed', 'the migration completed');
    t.ok(reported.stats.pagesTransferred > 0, `pages went over the link (${reported.stats.pagesTransferred})`);
    t.ok(lastPass(sourceOutput) >= 2, `the source ran the guest to pass ${lastPass(sourceOutput)}`);

    await destination.waitForStdout(`pass ${lastPass(sourceOutput) + 3} ok\n`);
    destination.child.kill('SIGTERM');
    await destination.closed;
    t.equal(destinationReport(destination.stderr()).exit, 'stopped', `the destination ran the guest until told to stop: ${destination.stderr()}`);
    const all = sourceOutput + destination.stdout();
    t.ok(isUnbrokenCount(all), `one unbroken count across the move: ...${JSON.stringify(all.slice(-120))}`);
    t.notMatch(destination.stdout(), /BAD/, 'the guest found its memory intact');
  });

  t.test('a destination on the default host (loopback) is out of reach from the other namespace', { timeout: 30_000 }, async (t) => {
    const destination = runInNamespace(destinationNamespace, destinationFixture, ['tcp:127.0.0.1:0', TOKEN]);
    killOnTeardown(t, destination);
    const listening = await destination.waitForStderr(/^listening tcp:127\.0\.0\.1:(\d+)$/m);
    const port = Number(listening[1]);
    t.equal(connectFrom(destinationNamespace, '127.0.0.1', port), 'connected', 'it is listening, inside its own namespace');
    t.equal(connectFrom(sourceNamespace, destinationIp, port), 'ECONNREFUSED', 'not on the veth address');
    t.equal(connectFrom(sourceNamespace, '127.0.0.1', port), 'ECONNREFUSED', "not on the other namespace's loopback");
    destination.child.kill('SIGTERM');
    await destination.closed;
  });
});
