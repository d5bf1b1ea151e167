// Migrations that fail: whatever breaks (the destination, the source, the bytes in between, the
// token, the version, the machine's size), the source keeps running its guest, or the destination
// fails cleanly, and the error says what happened. A destination or a source has a process of its
// own where the test kills it, or leaves it waiting; otherwise the destination is in this process
// (each process takes seconds to load its TypeScript).
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import net from 'node:net';
import path from 'node:path';
import t, { type Test } from 'tap';
import { Machine, type MigrationError } from '../../lib/index.js';
import { noKvm, repoRoot } from '../helpers/kvm.js';
import { assertCountsOnThere, assertRunsOn, isUnbrokenCount, lastPass, MiB, startDirtier } from '../helpers/migration.js';
import { startDestination, startLocalDestination, type Destination, type LocalDestination } from '../helpers/migration-peer.js';
import { sharedPool } from '../helpers/pool.js';
import { childExecArgv } from '../helpers/spawn.js';
import { SectionType, encodeEnd, encodeErrorSection, encodeHeader, encodeSection, encodeSync } from '../../lib/migration/format.js';
import { MAX_BATCH_SECTION_BYTES, encodeLivePageBatch, encodePageBatch } from '../../lib/migration/pages.js';
import { decodePageRanges } from '../../lib/migration/postcopy-ranges.js';
import { SectionReader } from '../../lib/migration/section-reader.js';
import { socketSource } from '../../lib/migration/sources.js';
import { encodeConfigSection } from '../../lib/migration/state-sections.js';
import { startProxy } from '../helpers/tamper-proxy.js';
import { encodeStateSection } from '../../lib/migration/state-codec.js';
import { connectForMigration, parseMigrationAddress } from '../../lib/migration/transport.js';

const TOKEN = 'fault-token-91d2';
// vCPU threads for the sources and the destinations in this process, loaded once for the file.
const pool = noKvm ? undefined : sharedPool(2);

/** Changes the byte at `at` (stream offset) with `change`. */
const patchAt = (at: number, change: (byte: number) => number) => (chunk: Buffer, offset: number) => {
  if (at >= offset && at < offset + chunk.length) chunk[at - offset] = change(chunk[at - offset]!);
  return chunk;
};

/** A tamper that flips a bit just after the first `marker` the source's bytes hold (a section's payload), once. */
function damageFirst(marker: string): { tamper: (chunk: Buffer) => Buffer; done: () => boolean } {
  let patched = false;
  return {
    tamper: (chunk) => {
      const at = patched ? -1 : chunk.indexOf(marker);
      if (at >= 0) {
        chunk[at + 4] ^= 0x01;
        patched = true;
      }
      return chunk;
    },
    done: () => patched,
  };
}

/** A destination in this process listening on tcp, with TOKEN. */
const destinationHere = (t: Test, memoryBytes?: number) => startLocalDestination(t, 'tcp:127.0.0.1:0', { token: TOKEN, memoryBytes, pool });

/** A connection to `destination` past the handshake, for streams written by hand (no real source sends them). */
async function handMadeSource(t: Test, destination: { listening: Promise<string> }): Promise<net.Socket> {
  const socket = await connectForMigration(parseMigrationAddress(await destination.listening), { token: TOKEN, timeoutMs: 5000 });
  t.teardown(() => socket.destroy());
  socket.on('error', () => {}); // each test asserts what the destination says
  return socket;
}

async function migrateThroughFault<D extends Destination | LocalDestination>(t: Test, destination: D, options: {
  tamper?: Parameters<typeof startProxy>[2]; tamperReplies?: Parameters<typeof startProxy>[3]; sourceMemoryBytes?: number; timeoutMs?: number;
  /** Bytes of guest RAM above the guest's own range the VMM fills with data, for a longer stream. */
  fillBytes?: number;
} = {}) {
  let address = await destination.listening;
  if (options.tamper || options.tamperReplies) address = await startProxy(t, address, options.tamper ?? ((chunk) => chunk), options.tamperReplies);
  const source = await startDirtier({ memoryBytes: options.sourceMemoryBytes ?? 32 * MiB, rangeBytes: 2 * MiB, config: { pool } });
  t.teardown(() => source.machine.stop());
  if (options.fillBytes) source.machine.writeMemory(8 * MiB, randomBytes(options.fillBytes));
  await source.waitForOutput('pass 1 ok\n');
  const error = await source.machine.migrate(address, { token: TOKEN, timeoutMs: options.timeoutMs ?? 5000 }).then(
    () => null,
    (e: MigrationError) => e,
  );
  return { destination, source, error };
}

t.test('wrong token: refused on both sides, the source runs on', { skip: noKvm }, async (t) => {
  // A process: it goes on waiting, and only a kill ends that.
  const waiting = startDestination('tcp:127.0.0.1:0', 'another-token');
  t.teardown(() => waiting.child.kill('SIGKILL'));
  const { destination, source, error } = await migrateThroughFault(t, waiting);
  t.match(error?.message, /wrong token/);
  await assertRunsOn(t, source);
  // The destination logs it on its side of the handshake, in its own time.
  await destination.waitForStderr(/refused a migration connection/, 5000);
  t.match(destination.stderr(), /refused a migration connection .*wrong token/, 'the destination logs the refused attempt');
  t.equal(destination.child.exitCode, null, 'the destination keeps waiting for the right source');
});

t.test('memory size mismatch: the destination refuses before anything is applied', { skip: noKvm }, async (t) => {
  const { destination, source, error } = await migrateThroughFault(t, destinationHere(t, 64 * MiB));
  t.match(error?.message, /the destination refused: the stream carries 33554432 bytes of guest RAM; this machine has 67108864/);
  await assertRunsOn(t, source);
  await t.rejects(destination.arrived, { code: 'EMISMATCH', message: /this machine has 67108864/ }, 'the destination fails with why');
});

t.test('a stream of another version is refused', { skip: noKvm }, async (t) => {
  const { destination, source, error } = await migrateThroughFault(t, destinationHere(t), { tamper: patchAt(8, () => 1) });
  t.match(error?.message, /stream version 1 is not supported \(this build reads versions 2 to 4\)/);
  t.equal(error?.code, 'EREFUSED', 'the destination refused it');
  await assertRunsOn(t, source);
  await t.rejects(destination.arrived, { name: 'MigrationError', code: 'EVERSION', message: /stream version 1 is not supported/ });
});

t.test('corrupted bytes in page data: the destination asks for those pages again, and the guest arrives intact', { skip: noKvm }, async (t) => {
  // The pre-copy round's pages go live (from guest RAM, the data's CRC apart): a page that fails
  // it is owed, asked for, and sent again, as a page the guest wrote while it went out would be.
  const { destination, source, error } = await migrateThroughFault(t, destinationHere(t), { tamper: patchAt(300_000, (byte) => byte ^ 0x40) });
  t.equal(error, null, 'the migration completes');
  const arrived = await destination.arrived;
  t.equal(arrived.state, 'running');
  const sourceOutput = source.output();
  await destination.waitForOutput(`pass ${lastPass(sourceOutput) + 2} ok\n`);
  t.ok(isUnbrokenCount(sourceOutput + destination.output()), 'it counts on unbroken there, its memory check passing');
});

t.test('corrupted bytes in a page range table: checksum error at the destination, the source runs on', { skip: noKvm }, async (t) => {
  // The first live Pages section's header (type 2, flags 1): a bit of its first range's first page.
  let patched = false;
  const tamper = (chunk: Buffer) => {
    const at = patched ? -1 : chunk.indexOf(Buffer.of(2, 0, 1, 0));
    if (at >= 0 && at + 12 < chunk.length) {
      chunk[at + 12] ^= 0x01;
      patched = true;
    }
    return chunk;
  };
  const { destination, source, error } = await migrateThroughFault(t, destinationHere(t), { tamper });
  t.ok(patched, 'the table was reached');
  t.match(error?.message, /checksum mismatch in Pages section/);
  await assertRunsOn(t, source);
  await t.rejects(destination.arrived, { code: 'ECHECKSUM', message: /checksum mismatch in Pages section/ }, 'the destination fails with why');
});

t.test('a damaged device state sent ahead of the pause: it fails before the pause, the source runs on', { skip: noKvm }, async (t) => {
  // The devices' state goes ahead with the last Sync (a record from serial on); the destination
  // puts it on its machine before it answers, so it fails before the source pauses.
  const damage = damageFirst('{"serial":');
  const { destination, source, error } = await migrateThroughFault(t, destinationHere(t), { tamper: damage.tamper });
  t.ok(damage.done(), 'the device state sent ahead was damaged on its way');
  t.match(error?.message, /checksum mismatch in DeviceStateAhead section/);
  t.equal(error?.phase, 'precopy', 'the source had not paused its guest yet');
  await assertRunsOn(t, source);
  await t.rejects(destination.arrived, { code: 'ECHECKSUM', message: /checksum mismatch in DeviceStateAhead section/ }, 'the destination fails with why');
});

t.test('a damaged device state, after the VM and vCPU states the destination may have applied: it fails cleanly, the source runs on', { skip: noKvm }, async (t) => {
  // The VM's and the vCPUs' state come in a write of their own, applied as soon as they are in;
  // the devices' state, in the next write, is damaged on its way. (It holds the devices that
  // changed since their state went ahead: the ACPI PM timer's count always has.)
  const damage = damageFirst('{"acpiPm":');
  const { destination, source, error } = await migrateThroughFault(t, destinationHere(t), { tamper: damage.tamper });
  t.ok(damage.done(), 'the device state was damaged on its way');
  t.match(error?.message, /checksum mismatch in DeviceState section/);
  await assertRunsOn(t, source);
  await t.rejects(destination.arrived, { code: 'ECHECKSUM', message: /checksum mismatch in DeviceState section/ }, 'the destination fails with why');
});

t.test('a stream cut short: the destination reports it truncated, the source runs on', { skip: noKvm }, async (t) => {
  const { destination, source, error } = await migrateThroughFault(t, destinationHere(t), {
    tamper: (chunk, offset, cut) => {
      if (offset + chunk.length > 500_000) {
        cut();
        return chunk.subarray(0, Math.max(0, 500_000 - offset));
      }
      return chunk;
    },
  });
  t.match(error?.message, /migration failed .*the guest runs on here/);
  await assertRunsOn(t, source);
  await t.rejects(destination.arrived, /truncated|closed/, 'the destination fails with why');
});

/**
 * A reply tamper that drops the destination's End (its word that the guest runs there) and all
 * that follows; then cuts the connection, or holds it open with nothing more coming.
 */
function dropRunningWord(options: { cut: boolean }): { tamper: Parameters<typeof startProxy>[3]; dropped: () => boolean } {
  const end = Buffer.from(encodeEnd());
  let dropped = false;
  return {
    tamper: (chunk, cut, hold) => {
      if (dropped) return Buffer.alloc(0);
      const at = chunk.indexOf(end);
      if (at < 0) return chunk;
      dropped = true;
      if (options.cut) setImmediate(cut);
      else hold();
      return chunk.subarray(0, at);
    },
    dropped: () => dropped,
  };
}

/** The source left paused with EUNCONFIRMED while the destination runs the guest; the owner then stops that one and resumes this one. */
async function assertUnconfirmed(t: Test, outcome: Awaited<ReturnType<typeof migrateThroughFault<LocalDestination>>>, cause: RegExp): Promise<void> {
  const { destination, source, error } = outcome;
  t.equal(error?.code, 'EUNCONFIRMED', 'the source cannot know how it ended');
  t.equal(error?.phase, 'stop-copy');
  t.match(error?.message, /neither confirmed that the guest runs there nor said that it failed .*the guest stays paused here/);
  t.match((error?.cause as Error | undefined)?.message, cause, 'what broke is the cause');
  t.equal(source.machine.state, 'paused', 'the source keeps its guest paused, not resumed');
  const arrived = await destination.arrived;
  t.equal(arrived.state, 'running', 'the destination runs it');
  await assertCountsOnThere(t, source, destination);
  // Its owner, knowing it runs there no longer, resumes it here: the copy kept is whole.
  await arrived.stop();
  source.machine.resume();
  await assertRunsOn(t, source);
}

t.test('the destination\'s word that the guest runs there lost with the connection: the source keeps its guest paused (EUNCONFIRMED), never running it in two places', { skip: noKvm }, async (t) => {
  const drop = dropRunningWord({ cut: true });
  const outcome = await migrateThroughFault(t, destinationHere(t), { tamperReplies: drop.tamper });
  t.ok(drop.dropped(), 'the word was dropped');
  await assertUnconfirmed(t, outcome, /closed|reset|EPIPE|ECONNRESET/i);
});

t.test('the destination\'s word that the guest runs there never comes: after timeoutMs the source keeps its guest paused (EUNCONFIRMED)', { skip: noKvm }, async (t) => {
  const drop = dropRunningWord({ cut: false });
  const outcome = await migrateThroughFault(t, destinationHere(t), { tamperReplies: drop.tamper, timeoutMs: 1000 });
  t.ok(drop.dropped(), 'the word was dropped');
  await assertUnconfirmed(t, outcome, /1000 ms|timed out|no answer|waiting/i);
});

t.test('a destination that stops reading: the source, blocked writing, gives up after timeoutMs and runs on', { skip: noKvm }, async (t) => {
  let cutProxy!: () => void;
  const { destination, source, error } = await migrateThroughFault(t, destinationHere(t), {
    sourceMemoryBytes: 128 * MiB,
    fillBytes: 96 * MiB, // far more than the socket buffers between the two hold (at most 36 MiB here)
    timeoutMs: 1000,
    tamper: (chunk, offset, cut, stopReading) => {
      cutProxy = cut;
      if (offset + chunk.length > MiB) stopReading();
      return chunk;
    },
  });
  t.match(error?.message, /the destination stopped reading for 1000 ms/);
  t.equal(error?.code, 'ETIMEDOUT');
  await assertRunsOn(t, source);
  cutProxy();
  await t.rejects(destination.arrived, /truncated|closed/, 'the destination, cut off, fails with why');
});

t.test('the destination killed mid-stream: the source runs on', { skip: noKvm }, async (t) => {
  const destination = startDestination('tcp:127.0.0.1:0', TOKEN);
  const address = await destination.listening;
  const source = await startDirtier({ memoryBytes: 64 * MiB, rangeBytes: 8 * MiB, config: { pool } });
  t.teardown(() => source.machine.stop());
  await source.waitForOutput('pass 1 ok\n');
  const error = await source.machine.migrate(address, {
    token: TOKEN,
    downtimeBudgetMs: 0.001, // never converges: the destination is killed while pre-copy goes on
    maxIterations: 10_000,
    // Only the destination's acceptance can take long (a loaded host builds its machine slowly):
    // its death is seen at once, not by this timeout.
    timeoutMs: 30_000,
    // Killed after the first round, before the convergence check: on a loaded host the guest may
    // not have run during that round, so that it converges at once, and a later round never comes.
    onProgress: (progress) => {
      if (progress.phase === 'precopy' && progress.iterations === 1) destination.child.kill('SIGKILL');
    },
  }).then(() => null, (e: Error) => e);
  t.match(error?.message, /destination closed the connection|connection closed|ECONNRESET|EPIPE/);
  await assertRunsOn(t, source);
});

t.test('the source killed mid-stream: the destination fails cleanly and says why', { skip: noKvm }, async (t) => {
  let onListening: (address: string) => void;
  const listening = new Promise<string>((resolve) => (onListening = resolve));
  const logs: string[] = [];
  const incoming = Machine.incoming('tcp:127.0.0.1:0', { token: TOKEN, timeoutMs: 20_000, onListening: (a) => onListening(a), log: (m) => logs.push(m), pool });
  const address = await listening;
  const child = spawn(process.execPath, [...childExecArgv, path.join(repoRoot, 'test', 'fixtures', 'migration-source.ts'), address, TOKEN], { stdio: 'ignore' });
  const exited = new Promise<NodeJS.Signals | null>((resolve) => child.on('close', (_, signal) => resolve(signal)));
  await t.rejects(incoming, { message: /truncated|closed/ }, 'Machine.incoming() rejects: the stream ended early');
  t.equal(await exited, 'SIGKILL', 'the source died mid-migration');
});

t.test('a machine paused by its owner stays paused when a migration fails, and arrives paused when one succeeds', { skip: noKvm }, async (t) => {
  const refusing = destinationHere(t, 64 * MiB);
  const destination = destinationHere(t);
  const [refusingAddress, destinationAddress] = await Promise.all([refusing.listening, destination.listening]);
  const source = await startDirtier({ memoryBytes: 32 * MiB, rangeBytes: 2 * MiB, config: { pool } });
  t.teardown(() => source.machine.stop());
  await source.waitForOutput('pass 1 ok\n');
  await source.machine.pause();
  await t.rejects(source.machine.migrate(refusingAddress, { token: TOKEN }), /this machine has 67108864/);
  t.equal(source.machine.state, 'paused', 'still paused, as its owner left it');

  const stats = await source.machine.migrate(destinationAddress, { token: TOKEN });
  t.equal(stats.phase, 'completed');
  await t.rejects(refusing.arrived, /this machine has 67108864/);
  const arrived = await destination.arrived;
  t.equal(arrived.state, 'paused', 'the destination holds the guest paused');
  await new Promise((resolve) => setTimeout(resolve, 200));
  t.equal(destination.output(), '', 'and it runs nothing');
  arrived.resume();
  const sourceOutput = source.output();
  await destination.waitForOutput(`pass ${lastPass(sourceOutput) + 2} ok\n`);
  t.ok(isUnbrokenCount(sourceOutput + destination.output()), 'resumed, it counts on unbroken');
});

t.test('a source that sends pages before it is accepted, then junk: the destination fails cleanly and says why', { skip: noKvm }, async (t) => {
  const destination = destinationHere(t);
  const socket = await handMadeSource(t, destination);
  const junk = new Uint8Array(12);
  junk[0] = 99; // section type 99
  // All at once: the destination holds the junk before it has even built the machine.
  socket.write(Buffer.concat([
    encodeHeader({ kind: 'migration', memoryBytes: 2 * MiB, vcpuCount: 1 }),
    encodeConfigSection({ machine: { memoryBytes: 2 * MiB, vcpus: 1 } }),
    encodeSection(2, new Uint8Array(4)), // an empty Pages section: valid
    junk,
  ]));
  await t.rejects(destination.arrived, { code: 'EFORMAT', message: /unknown section type 99/ }, 'a clean failure, not a crash');
});

t.test('a source that sends 32 MiB of pages before it is accepted, then junk: the destination parses them all, then refuses the junk', { skip: noKvm }, async (t) => {
  // No shape given ahead: the machine is built when the stream announces it, while the pages
  // arrive (up to 16 MiB are buffered meanwhile, see SocketSource; the rest waits in the socket).
  const destination = destinationHere(t);
  const socket = await handMadeSource(t, destination);
  const ram = randomBytes(32 * MiB);
  const pageSections: Uint8Array[] = [];
  for (let batch = 0; batch < 16; batch++) {
    const { section } = encodePageBatch(ram, [{ firstPage: batch * 512, pageCount: 512 }], true, new Uint8Array(MAX_BATCH_SECTION_BYTES));
    pageSections.push(section);
  }
  const junk = new Uint8Array(12);
  junk[0] = 99;
  socket.write(Buffer.concat([
    encodeHeader({ kind: 'migration', memoryBytes: 64 * MiB, vcpuCount: 1 }),
    encodeConfigSection({ machine: { memoryBytes: 64 * MiB, vcpus: 1 } }),
    ...pageSections,
    junk,
  ]));
  await t.rejects(destination.arrived, { code: 'EFORMAT', message: /unknown section type 99/ }, 'every page section parsed, then the junk after them refused');
});

t.test('a local migration offered over tcp: refused with why', { skip: noKvm }, async (t) => {
  const destination = destinationHere(t);
  const socket = await handMadeSource(t, destination);
  socket.write(Buffer.concat([
    encodeHeader({ kind: 'local-migration', memoryBytes: 2 * MiB, vcpuCount: 1 }),
    encodeConfigSection({ machine: { memoryBytes: 2 * MiB, vcpus: 1 } }),
  ]));
  await t.rejects(destination.arrived, { code: 'EPROTO', message: /a local migration must come over a unix socket on this host, not tcp/ }, 'the destination refuses it');
  const reader = new SectionReader(socketSource(socket, 5000));
  await reader.readHeader();
  const answer = await reader.next();
  t.equal(answer.type, SectionType.Error, 'and tells the source why');
});

t.test('a device state sent ahead that is malformed, or comes after the state has begun: refused as it comes', { skip: noKvm }, async (t) => {
  const cases: [string, Uint8Array[], RegExp][] = [
    ['virtio state ahead', [encodeStateSection(SectionType.DeviceStateAhead, { virtio: [] }), encodeSync()], /the device state sent ahead is malformed/],
    ['an unknown device', [encodeStateSection(SectionType.DeviceStateAhead, { floppy: {} }), encodeSync()], /the device state sent ahead is malformed/],
    ['a bad RTC state', [encodeStateSection(SectionType.DeviceStateAhead, { cmosRtc: { index: 0, cmos: [1, 2] } }), encodeSync()], /the device state sent ahead is malformed/],
    ['sent twice', [encodeStateSection(SectionType.DeviceStateAhead, {}), encodeStateSection(SectionType.DeviceStateAhead, {}), encodeSync()], /unexpected DeviceStateAhead section/],
    ['after the state began', [encodeConfigSection({ machine: { memoryBytes: 2 * MiB, vcpus: 1 } }), encodeStateSection(SectionType.DeviceStateAhead, {})], /unexpected DeviceStateAhead section/],
  ];
  for (const [name, sections, message] of cases) {
    const destination = destinationHere(t);
    const socket = await handMadeSource(t, destination);
    socket.write(Buffer.concat([
      encodeHeader({ kind: 'migration', memoryBytes: 2 * MiB, vcpuCount: 1 }),
      encodeConfigSection({ machine: { memoryBytes: 2 * MiB, vcpus: 1 } }),
      encodeSection(SectionType.Pages, new Uint8Array(4)), // no ranges
      ...sections,
    ]));
    await t.rejects(destination.arrived, { code: 'EFORMAT', message }, name);
  }
});

t.test('a source that sends a Sync before it is accepted: the destination answers it after its acceptance', { skip: noKvm }, async (t) => {
  const destination = destinationHere(t);
  const socket = await handMadeSource(t, destination);
  const replies = new SectionReader(socketSource(socket, 10_000));
  // All at once, as a source that starts pre-copy without waiting for the answer may send them.
  socket.write(Buffer.concat([
    encodeHeader({ kind: 'migration', memoryBytes: 2 * MiB, vcpuCount: 1 }),
    encodeConfigSection({ machine: { memoryBytes: 2 * MiB, vcpus: 1 } }),
    encodeSection(SectionType.Pages, new Uint8Array(4)), // no ranges
    encodeSync(),
  ]));
  const header = await replies.readHeader();
  t.equal(header.kind, 'migration', 'the destination answers with its own header');
  t.equal((await replies.next()).type, SectionType.Config, 'then its acceptance');
  t.equal((await replies.next()).type, SectionType.Sync, 'then the answer to the Sync');
  socket.end(encodeErrorSection('the test ends here'));
  await t.rejects(destination.arrived, { code: 'ECANCELED', message: 'the source gave up: the test ends here' });
});

t.test('a live Pages section with a page changed after its CRC: the destination asks for its ranges again, before the Sync\'s answer, and the stream may end only once they came', { skip: noKvm }, async (t) => {
  for (const sentAgain of [false, true]) {
    const destination = destinationHere(t);
    const socket = await handMadeSource(t, destination);
    const replies = new SectionReader(socketSource(socket, 10_000));
    const ram = new Uint8Array(randomBytes(2 * MiB));
    const live = encodeLivePageBatch(ram, [{ firstPage: 16, pageCount: 8 }, { firstPage: 100, pageCount: 2 }], true);
    ram[20 * 4096 + 7]! ^= 0x10; // as if the guest wrote it between the CRC and the socket's copy
    // Before the acceptance, as a source that starts pre-copy without waiting for it sends them.
    socket.write(Buffer.concat([
      encodeHeader({ kind: 'migration', memoryBytes: 2 * MiB, vcpuCount: 1 }),
      encodeConfigSection({ machine: { memoryBytes: 2 * MiB, vcpus: 1 } }),
      ...live.chunks,
      encodeSync(),
    ]));
    await replies.readHeader();
    t.equal((await replies.next()).type, SectionType.Config, 'the acceptance first');
    const request = await replies.next();
    t.equal(request.type, SectionType.PageRequest, 'then a PageRequest');
    t.same(decodePageRanges(request.payload, 512, 'the request'), [{ firstPage: 16, pageCount: 8 }, { firstPage: 100, pageCount: 2 }], 'for the whole section');
    t.equal((await replies.next()).type, SectionType.Sync, 'then the answer to the Sync');
    if (sentAgain) socket.write(encodePageBatch(ram, [{ firstPage: 16, pageCount: 8 }, { firstPage: 100, pageCount: 2 }], false, new Uint8Array(MAX_BATCH_SECTION_BYTES)).section);
    socket.write(encodeEnd());
    if (sentAgain) {
      // Nothing owed: the End is refused only for the state it lacks.
      await t.rejects(destination.arrived, { code: 'EFORMAT', message: /^(?!.*checksum)/ }, 'not for its pages');
    } else {
      await t.rejects(destination.arrived, { code: 'ECHECKSUM', message: /10 pages failed their checksum in a live Pages section and were not sent again before the End section/ });
    }
  }
});
