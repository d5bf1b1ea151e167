// Same-host live update when something goes wrong: a destination that refuses or dies before it
// runs the guest leaves it running at the source with its memory intact; a hostile source's fds
// are refused by the destination, which leaks none of them and does not crash; bad input is
// refused with a clear error before anything moves.
import { closeSync, mkdtempSync, openSync, readdirSync, readlinkSync, rmSync } from 'node:fs';
import type net from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import t, { type Test } from 'tap';
import { GuestMemory, Machine } from '../../lib/index.js';
import { sendWithFds } from '../../lib/kvm/host.js';
import { MigrationError } from '../../lib/migration/errors.js';
import { SectionType, decodeErrorSection, encodeEnd, encodeErrorSection, encodeHeader, encodeSection, encodeSync, type Section } from '../../lib/migration/format.js';
import { encodeFdsSection } from '../../lib/migration/local.js';
import { SectionReader } from '../../lib/migration/section-reader.js';
import { socketSource } from '../../lib/migration/sources.js';
import { encodeConfigSection } from '../../lib/migration/state-sections.js';
import { connectForMigration, listenForMigration, parseMigrationAddress } from '../../lib/migration/transport.js';
import { noKvm } from '../helpers/kvm.js';
import { isUnbrokenCount, lastPass, MiB, startDirtier } from '../helpers/migration.js';
import { sharedPool } from '../helpers/pool.js';

const pool = noKvm ? undefined : sharedPool(2);

function tempDir(t: Test): string {
  const dir = mkdtempSync(path.join(tmpdir(), 'node-kvm-local-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** This process's open fds and what each refers to (a socket, a memfd, a file). */
const openFds = (): Map<string, string> => {
  const fds = new Map<string, string>();
  for (const fd of readdirSync('/proc/self/fd')) {
    try {
      fds.set(fd, readlinkSync(`/proc/self/fd/${fd}`));
    } catch {
      // Closed while listed (the listing's own fd, say).
    }
  }
  return fds;
};
/** The fds open now that were not open (as the same thing) in `before`. */
const fdsOpenedSince = (before: Map<string, string>): string[] => [...openFds()].filter(([fd, target]) => before.get(fd) !== target).map(([fd, target]) => `${fd} -> ${target}`);

type FakeEnd = 'refuse-at-config' | 'close-after-fds' | 'close-after-state' | 'error-after-state' | 'stall-after-fds';

/**
 * A destination that speaks the protocol through Node's own socket (the fds that come are
 * dropped by the kernel: it has no use for them) and ends as `how` says, never running anything.
 */
async function fakeDestination(address: string, how: FakeEnd, onListening: () => void): Promise<string[]> {
  const socket: net.Socket = await listenForMigration(parseMigrationAddress(address), { onListening });
  socket.on('error', () => {});
  const seen: string[] = [];
  const reader = new SectionReader(socketSource(socket, 10_000));
  const header = await reader.readHeader();
  seen.push(header.kind);
  const config = await reader.next();
  seen.push(config.name);
  const reply = encodeHeader({ kind: 'local-migration', memoryBytes: header.memoryBytes, vcpuCount: header.vcpuCount });
  if (how === 'refuse-at-config') {
    socket.end(Buffer.concat([reply, encodeErrorSection('no room for this guest here')]));
    return seen;
  }
  socket.write(Buffer.concat([reply, encodeConfigSection({ machine: {} })]));
  seen.push((await reader.next()).name);
  if (how === 'close-after-fds') {
    socket.destroy();
    return seen;
  }
  if (how === 'stall-after-fds') {
    // Never answers: the source gives up (its signal) and says why.
    const why = await reader.next();
    seen.push(why.type === SectionType.Error ? decodeErrorSection(why.payload) : why.name);
    socket.destroy();
    return seen;
  }
  socket.write(encodeSync());
  let section: Section;
  do {
    section = await reader.next();
    seen.push(section.name);
  } while (section.type !== SectionType.End);
  if (how === 'error-after-state') socket.end(encodeErrorSection('cannot apply the state'));
  else socket.destroy();
  return seen;
}

for (const how of ['refuse-at-config', 'close-after-fds', 'close-after-state', 'error-after-state'] as const) {
  t.test(`a destination that ends '${how}' before it runs the guest: it runs on here, memory intact`, { skip: noKvm }, async (t) => {
    const dir = tempDir(t);
    const address = `unix:${path.join(dir, 'm.sock')}`;
    let onListening!: () => void;
    const listening = new Promise<void>((resolve) => (onListening = resolve));
    const fake = fakeDestination(address, how, onListening);
    fake.catch(() => {});
    const source = await startDirtier({ memoryBytes: 32 * MiB, rangeBytes: 2 * MiB, config: { pool } });
    t.teardown(() => source.machine.stop());
    await source.waitForOutput('pass 1 ok\n');
    await listening;
    const error = await source.machine.migrate(address, { local: true }).then(() => null, (e: unknown) => e);
    t.ok(error instanceof MigrationError, `a MigrationError: ${String(error)}`);
    const failure = error as MigrationError;
    t.match(failure.message, /the guest runs on here$/, failure.message);
    if (how === 'refuse-at-config') t.match(failure.message, /no room for this guest here/);
    if (how === 'error-after-state') t.match(failure.message, /cannot apply the state/);
    const seen = await fake;
    t.same(seen.slice(0, 2), ['local-migration', 'Config'], 'a local-migration stream');
    if (how !== 'refuse-at-config') t.equal(seen[2], 'Fds', 'the fds came with an Fds section');
    if (how.endsWith('after-state')) t.same(seen.slice(3, 5), ['Config', 'VmState'], 'the state went out');
    t.equal(source.machine.state, 'running', 'the source runs its guest on');
    const passAtFailure = lastPass(source.output());
    await source.waitForOutput(`pass ${passAtFailure + 2} ok\n`);
    t.ok(isUnbrokenCount(source.output()), 'one unbroken count');
    t.notMatch(source.output(), /BAD/, 'the guest found its memory intact');
  });
}

/**
 * A source that passes the handshake and sends a local-migration header and Config for a 16 MiB,
 * 1-vCPU machine, then what `fds` says after the destination's acceptance.
 */
async function hostileSource(address: string, send: (socketFd: number) => void, hangUp = false): Promise<string> {
  const socket = await connectForMigration(parseMigrationAddress(address));
  socket.on('error', () => {});
  socket.write(Buffer.concat([
    encodeHeader({ kind: 'local-migration', memoryBytes: 16 * MiB, vcpuCount: 1 }),
    encodeConfigSection({ machine: { memoryBytes: 16 * MiB, vcpus: 1, irqchip: true } }),
  ]));
  const reader = new SectionReader(socketSource(socket, 10_000));
  await reader.readHeader();
  const accepted = await reader.next();
  if (accepted.type !== SectionType.Config) return `not accepted: ${accepted.name}`;
  send((socket as unknown as { _handle: { fd: number } })._handle.fd);
  if (hangUp) {
    socket.destroy();
    return 'hung up';
  }
  const verdict = await reader.next().catch((error: Error) => ({ name: 'closed', type: -1, payload: Buffer.from(error.message) }) as unknown as Section);
  socket.destroy();
  return verdict.type === SectionType.Error ? decodeErrorSection(verdict.payload) : verdict.name;
}

const ram16 = { memory: [{ guestPhysAddr: 0, sizeBytes: 16 * MiB }], disks: 0, net: 0 };

const hostileCases: { name: string; send: (socketFd: number) => void; refusal: RegExp; hangUp?: boolean }[] = [
  {
    name: 'a regular file as guest RAM',
    send: (fd) => {
      const file = openSync(process.execPath, 'r');
      try {
        sendWithFds(fd, encodeFdsSection(ram16), [file]);
      } finally {
        closeSync(file);
      }
    },
    refusal: /the source's guest RAM cannot be mapped: fd is not a memfd/,
  },
  {
    name: 'a memfd of the wrong size',
    send: (fd) => {
      const other = GuestMemory.create(8 * MiB);
      const memfd = other.shareFd();
      try {
        sendWithFds(fd, encodeFdsSection(ram16), [memfd]);
      } finally {
        closeSync(memfd);
        other.close();
      }
    },
    refusal: /the source's guest RAM cannot be mapped: the memfd holds 8388608 bytes, not 16777216/,
  },
  {
    name: 'more fds than the Fds section names',
    send: (fd) => {
      const other = GuestMemory.create(16 * MiB);
      const memfd = other.shareFd();
      try {
        sendWithFds(fd, encodeFdsSection(ram16), [memfd, memfd, memfd]);
      } finally {
        closeSync(memfd);
        other.close();
      }
    },
    refusal: /the Fds section came with 3 file descriptors, not the 1 it names/,
  },
  {
    name: 'an Fds section that names disks the machine does not have',
    send: (fd) => sendWithFds(fd, encodeFdsSection({ ...ram16, disks: 2 }), [0, 0, 0]),
    refusal: /the Fds section hands over 2 disks for a machine with 0/,
  },
  {
    name: 'no fds at all, and a section of another type',
    send: (fd) => sendWithFds(fd, encodeSection(SectionType.Sync, new Uint8Array(0)), []),
    refusal: /sent a Sync section where its fds were due/,
  },
  {
    name: 'a source that hangs up instead',
    send: (fd) => sendWithFds(fd, encodeEnd().subarray(0, 5), []),
    refusal: /the source closed the connection after 5 bytes of its Fds section/,
    hangUp: true,
  },
];

t.test('a hostile source\'s fds are refused, none leaks, and the destination lives on', { skip: noKvm }, async (t) => {
  const dir = tempDir(t);
  // Warm: the first machine's build opens what later ones reuse (the pool's threads, /dev/kvm).
  const fdsBefore = openFds();
  for (const [index, hostile] of hostileCases.entries()) {
    const address = `unix:${path.join(dir, `h${index}.sock`)}`;
    let onListening!: () => void;
    const listening = new Promise<void>((resolve) => (onListening = resolve));
    const incoming = Machine.incoming(address, { onListening, serial: { output: null }, log: () => {}, pool, timeoutMs: 2000 });
    incoming.catch(() => {});
    await listening;
    const verdict = await hostileSource(address, hostile.send, hostile.hangUp);
    const error = await incoming.then(() => null, (e: unknown) => e as Error);
    t.ok(error, `${hostile.name}: refused`);
    t.match(error?.message, hostile.refusal, `${hostile.name}: ${error?.message}`);
    if (!hostile.hangUp) t.match(verdict, hostile.refusal, `${hostile.name}: the source is told why`);
  }
  // The destination closed every fd it was handed, and its own.
  await new Promise((resolve) => setTimeout(resolve, 50));
  // Compared by what each fd is: an earlier test's socket closing meanwhile is not this one's concern.
  t.same(fdsOpenedSince(fdsBefore), [], 'no fd leaked');
});

t.test('bad input is refused before anything moves', { skip: noKvm }, async (t) => {
  const dir = tempDir(t);
  const source = await startDirtier({ memoryBytes: 16 * MiB, config: { pool } });
  t.teardown(() => source.machine.stop());
  await t.rejects(source.machine.migrate('tcp:127.0.0.1:4444', { local: true, token: 'x' }), {
    name: 'RangeError',
    message: 'a local migration hands guest RAM over as a file descriptor, which only a unix socket on this host carries: tcp:127.0.0.1:4444 is not a unix:PATH address',
  });
  await t.rejects(source.machine.migrate(`unix:${path.join(dir, 'x.sock')}`, { local: 'yes' as unknown as boolean }), { name: 'TypeError', message: 'local must be a boolean' });
  await t.rejects(source.machine.migrate(`unix:${path.join(dir, 'nobody.sock')}`, { local: true, timeoutMs: 500 }), { code: 'ECONNECT' });
  t.equal(source.machine.state, 'running');

  // A restored machine's RAM is a copy-on-write mapping of the snapshot file: it cannot move.
  const snapshot = path.join(dir, 'm.snap');
  await source.machine.snapshot(snapshot);
  const restored = await Machine.restore(snapshot, { serial: { output: null }, log: () => {}, pool });
  t.teardown(() => restored.stop());
  t.equal(restored.memory.backing, 'file');
  restored.start();
  await t.rejects(restored.migrate(`unix:${path.join(dir, 'y.sock')}`, { local: true }), {
    code: 'ERR_MACHINE_STATE',
    message: /this machine's RAM is a copy-on-write mapping of a file \(a restored snapshot\): the pages it wrote are private to this process and cannot move/,
  });
  t.equal(restored.state, 'running', 'it runs on');
});

t.test('an abort while the destination builds: the guest runs on here, the destination is told why', { skip: noKvm }, async (t) => {
  const dir = tempDir(t);
  const address = `unix:${path.join(dir, 'm.sock')}`;
  let onListening!: () => void;
  const listening = new Promise<void>((resolve) => (onListening = resolve));
  const fake = fakeDestination(address, 'stall-after-fds', onListening);
  fake.catch(() => {});
  const source = await startDirtier({ memoryBytes: 16 * MiB, config: { pool } });
  t.teardown(() => source.machine.stop());
  await source.waitForOutput('pass 1 ok\n');
  await listening;
  const controller = new AbortController();
  const migration = source.machine.migrate(address, { local: true, signal: controller.signal });
  const seen = fake;
  setTimeout(() => controller.abort(), 200);
  await t.rejects(migration, { code: 'ABORT_ERR' });
  const told = await seen;
  t.equal(told[2], 'Fds');
  t.match(told[3], /aborted/, `the destination was told: ${told[3]}`);
  t.equal(source.machine.state, 'running');
  const pass = lastPass(source.output());
  await source.waitForOutput(`pass ${pass + 2} ok\n`);
  t.notMatch(source.output(), /BAD/);
});
