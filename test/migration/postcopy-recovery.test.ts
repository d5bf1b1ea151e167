// Post-copy across a broken connection: the destination pauses the guest and waits; the source
// reconnects, the destination says which pages it still lacks, and they come. A proxy between
// the two cuts the connection at several points. Nothing may be lost: the dirtier checks its own
// range, a filled region must arrive byte for byte, and a paused guest's whole RAM must hash the same.
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import t from 'tap';
import { Machine, PostcopyPausedError } from '../../lib/index.js';
import { Userfaultfd } from '../../lib/kvm/userfaultfd.js';
import { setPostcopyUffdOpener } from '../../lib/migration/postcopy-destination.js';
import { noKvm } from '../helpers/kvm.js';
import { isUnbrokenCount, lastPass, memoryHash, MiB, startDirtier } from '../helpers/migration.js';
import { startMigrationProxy, type MigrationProxy } from '../helpers/migration-proxy.js';
import { sharedPool } from '../helpers/pool.js';
import { PassThrough } from 'node:stream';

const pool = noKvm ? undefined : sharedPool(2);
const FILLED = { addr: 20 * MiB, bytes: 4 * MiB };

interface Setup {
  proxy: MigrationProxy;
  arrived: Promise<Machine>;
  /** The destination's machine once its guest runs (before every page is there). */
  running: Promise<Machine>;
  output(): string;
  waitForOutput(text: string): Promise<void>;
  /** The destination's machine state each time it logged a break. */
  statesAtBreak: string[];
  logs: string[];
}

async function setUp(t: { teardown(fn: () => unknown): void }, recoveryMs?: number): Promise<Setup> {
  const dir = mkdtempSync(path.join(tmpdir(), 'node-kvm-pc-recovery-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const destinationPath = path.join(dir, 'destination.sock');
  let output = '';
  const sink = new PassThrough();
  const waiters = new Set<() => void>();
  sink.on('data', (chunk: Buffer) => {
    output += chunk.toString('latin1');
    for (const waiter of waiters) waiter();
  });
  let onListening!: () => void;
  const listening = new Promise<void>((resolve) => (onListening = resolve));
  let onRunning!: (machine: Machine) => void;
  const running = new Promise<Machine>((resolve) => (onRunning = resolve));
  const statesAtBreak: string[] = [];
  const logs: string[] = [];
  let machine: Machine | undefined;
  const arrived = Machine.incoming(`unix:${destinationPath}`, {
    pool, serial: { output: sink }, onListening, postcopyRecoveryMs: recoveryMs,
    onPostcopy: (info) => {
      machine = info.machine;
      onRunning(info.machine);
    },
    log: (message) => {
      logs.push(message);
      if (message.includes('connection broke')) statesAtBreak.push(machine?.state ?? 'none');
    },
  });
  arrived.catch(() => {});
  t.teardown(async () => {
    const outcome = await arrived.catch((error: Error) => error);
    await (outcome instanceof PostcopyPausedError ? outcome.machine : outcome instanceof Machine ? outcome : null)?.stop();
  });
  await listening;
  const proxy = await startMigrationProxy(path.join(dir, 'proxy.sock'), destinationPath);
  t.teardown(() => proxy.close());
  return {
    proxy, arrived, running, output: () => output, statesAtBreak, logs,
    waitForOutput: (text) => new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`destination: no ${JSON.stringify(text)}; output ${JSON.stringify(output.slice(-200))}`)), 20_000);
      const check = () => {
        if (!output.includes(text)) return;
        waiters.delete(check);
        clearTimeout(timer);
        resolve();
      };
      waiters.add(check);
      check();
    }),
  };
}

async function dirtierWithFilledRegion(t: { teardown(fn: () => unknown): void }) {
  const source = await startDirtier({ memoryBytes: 32 * MiB, rangeBytes: 2 * MiB, config: { pool } });
  t.teardown(() => source.machine.stop());
  const filled = randomBytes(FILLED.bytes);
  source.machine.writeMemory(FILLED.addr, filled);
  await source.waitForOutput('pass 2 ok\n');
  return { source, filled };
}

for (const point of ['before the first request', 'while a fault waits'] as const) {
  t.test(`a break ${point}: the guest pauses there, resumes after the reconnect, nothing lost`, { skip: noKvm }, async (t) => {
    const destination = await setUp(t);
    const { source, filled } = await dirtierWithFilledRegion(t);
    let armed = false;
    let faultCut: Promise<void> | undefined;
    const stats = await source.machine.migrate(destination.proxy.address, {
      postcopy: true,
      onProgress: (p) => {
        if (p.phase !== 'postcopy' || armed) return;
        armed = true;
        if (point === 'before the first request') destination.proxy.cut();
        else faultCut = destination.proxy.cutWhenFaultWaits();
      },
    });
    await faultCut;
    if (point === 'while a fault waits') {
      t.ok(stats.postcopy!.requests >= 1 && stats.postcopy!.pagesOnDemand >= 1, `the page a fault waited on was asked for again and sent on demand (${stats.postcopy!.pagesOnDemand} pages)`);
      t.ok(stats.postcopy!.faults >= 1 && stats.postcopy!.faultLatencyMs.max > 0, `fault latency measured (max ${stats.postcopy!.faultLatencyMs.max.toFixed(1)} ms)`);
    }
    t.ok(stats.postcopy!.recoveries >= 1, `resumed after the break (${stats.postcopy!.recoveries} recoveries)`);
    t.ok(destination.proxy.connections >= 2, 'a second connection');
    t.same(destination.statesAtBreak.slice(0, 1), ['paused'], 'the guest was paused at the destination while the connection was down');
    t.ok(destination.logs.some((line) => /the source resumed/.test(line)), 'the destination says the source resumed');
    t.equal((await source.machine.wait()).reason, 'migrated');
    const machine = await destination.arrived;
    t.equal(machine.state, 'running', 'the guest runs again');
    const sourceOutput = source.output();
    await destination.waitForOutput(`pass ${lastPass(sourceOutput) + 2} ok\n`);
    t.ok(isUnbrokenCount(sourceOutput + destination.output()), 'one unbroken count across the move and the break');
    t.notMatch(destination.output(), /BAD/);
    t.ok(Buffer.from(machine.memory.bytes(FILLED.addr, FILLED.bytes)).equals(filled), 'the filled region arrived byte for byte');
  });
}

t.test('breaks mid background stream (twice): every page of a paused guest arrives, SHA-256 equal', { skip: noKvm }, async (t) => {
  const destination = await setUp(t);
  const { source } = await dirtierWithFilledRegion(t);
  await source.machine.pause();
  const hash = memoryHash(source.machine.memory);
  let breaks = 0;
  const stats = await source.machine.migrate(destination.proxy.address, {
    postcopy: true,
    onProgress: (p) => {
      // Each new connection is cut again 1 MiB into its stream, twice.
      if (p.phase === 'postcopy' && breaks < 2) {
        breaks++;
        destination.proxy.cutAfterBytes(destination.proxy.bytesToDestination + MiB);
      }
    },
  });
  t.equal(stats.postcopy!.recoveries, 2, 'two recoveries');
  t.ok(stats.postcopy!.pagesBackground > stats.postcopy!.missingPages, `pages cut off in flight went again (${stats.postcopy!.pagesBackground} sent for ${stats.postcopy!.missingPages} missing)`);
  const machine = await destination.arrived;
  t.equal(machine.state, 'paused', 'arrived paused, as it left');
  t.equal(memoryHash(machine.memory), hash, 'the whole RAM arrived');
});

t.test('a corrupt byte in the post-copy stream: nothing of that section is placed, the source resumes, every page arrives', { skip: noKvm }, async (t) => {
  const destination = await setUp(t);
  const { source } = await dirtierWithFilledRegion(t);
  await source.machine.pause();
  const hash = memoryHash(source.machine.memory);
  let corrupted = false;
  const stats = await source.machine.migrate(destination.proxy.address, {
    postcopy: true,
    onProgress: (p) => {
      if (p.phase === 'postcopy' && !corrupted) {
        corrupted = true;
        destination.proxy.corruptAt(destination.proxy.bytesToDestination + 3 * MiB / 2);
      }
    },
  });
  t.equal(stats.postcopy!.recoveries, 1, 'one recovery');
  t.ok(destination.logs.some((line) => /connection broke \(checksum mismatch in Pages section\)/.test(line)), 'the destination saw the bad section and dropped the connection');
  const machine = await destination.arrived;
  t.equal(memoryHash(machine.memory), hash, 'the whole RAM arrived, the corrupt section replaced');
});

t.test('a break just as the destination sends its final End: the source resumes, hears nothing is lacking, completes as migrated', { skip: noKvm }, async (t) => {
  const destination = await setUp(t);
  const { source } = await dirtierWithFilledRegion(t);
  // Paused: no fault at the destination, so the next thing it sends after its word that the guest
  // runs there is its figures and End, once it has every page.
  await source.machine.pause();
  const hash = memoryHash(source.machine.memory);
  let replyCut: Promise<void> | undefined;
  const stats = await source.machine.migrate(destination.proxy.address, {
    postcopy: true,
    onProgress: (p) => {
      if (p.phase === 'postcopy' && !replyCut) replyCut = destination.proxy.cutOnReply();
    },
  });
  await replyCut;
  t.equal((await source.machine.wait()).reason, 'migrated', 'the source completes as migrated, not EPOSTCOPY');
  t.equal(stats.postcopy!.recoveries, 1, 'after one resume');
  t.equal(stats.postcopy!.pagesBackground, stats.postcopy!.missingPages, 'the resume found nothing lacking: no page went twice');
  t.ok(destination.logs.some((line) => /every page is here, but the connection broke .* before the source acknowledged it/.test(line)), 'the destination waited for the source to acknowledge');
  t.ok(destination.logs.some((line) => /the source resumed; 0 pages to go/.test(line)), 'and told it nothing is lacking');
  const machine = await destination.arrived;
  t.equal(machine.state, 'paused', 'arrived paused, as it left');
  t.equal(memoryHash(machine.memory), hash, 'the whole RAM arrived');
});

t.test('a source gone for good leaves the guest paused at the destination with a clear error', { skip: noKvm }, async (t) => {
  const destination = await setUp(t, 1500);
  const { source } = await dirtierWithFilledRegion(t);
  let resumeDuringPostcopy: unknown;
  const error = await source.machine.migrate(destination.proxy.address, {
    postcopy: true, postcopyRecoveryMs: 500,
    onProgress: (p) => {
      if (p.phase !== 'postcopy' || resumeDuringPostcopy) return;
      destination.proxy.refuse();
      try {
        source.machine.resume();
        resumeDuringPostcopy = 'resumed';
      } catch (e) {
        resumeDuringPostcopy = e;
      }
    },
  }).then(() => null, (e: Error & { code?: string }) => e);
  t.equal(error?.code, 'EPOSTCOPY', 'the source fails with EPOSTCOPY');
  t.match(error?.message, /cannot resume here: it stays paused here/);
  t.equal(source.machine.state, 'paused', 'the source keeps its copy, paused');
  const refusal = /post-copy migration to unix:\S+ has started: the guest may run at the destination, so it cannot resume here/;
  t.match(resumeDuringPostcopy, { code: 'ERR_MACHINE_STATE', message: refusal }, 'resume() during post-copy is refused');
  t.throws(() => source.machine.resume(), { code: 'ERR_MACHINE_STATE', message: refusal }, 'resume() after EPOSTCOPY is refused, saying why');
  await t.rejects(source.machine.reset(), { code: 'ERR_MACHINE_STATE' }, 'so is reset() (it would clear the pages only this side has)');
  await t.rejects(source.machine.migrate('unix:/nonexistent/elsewhere.sock'), { code: 'ERR_MACHINE_STATE', message: /nor can it migrate again/ }, 'and a second migration of the held copy');
  t.equal(source.machine.state, 'paused', 'still paused');
  const outcome = await destination.arrived.then(() => null, (e: Error) => e);
  t.type(outcome, PostcopyPausedError, 'the destination fails with a PostcopyPausedError');
  const paused = outcome as PostcopyPausedError;
  t.equal(paused.code, 'EPOSTCOPY');
  t.match(paused.message, /the source did not resume within 1500 ms: the guest is paused here, lacking \d+ pages that only the source has/);
  t.equal(paused.machine.state, 'paused', 'the guest is paused there, not lost');
  t.equal(paused.machine, await destination.running, 'the error holds the machine');
  t.equal((await source.machine.stop()).reason, 'stopped', 'stop() still gives the source\'s copy up');
});

for (const guest of ['paused', 'running'] as const) t.test(`a uffd error at the destination (UFFDIO_COPY fails), ${guest} guest: paused there with a clear error, the source told at once, nothing lost`, { skip: noKvm }, async (t) => {
  let copies = 0;
  setPostcopyUffdOpener((memory) => {
    const uffd = Userfaultfd.register(memory);
    return {
      fd: uffd.fd,
      readFaults: () => uffd.readFaults(),
      zero: (firstPage, pageCount) => uffd.zero(firstPage, pageCount),
      close: () => uffd.close(),
      copy: (firstPage, data) => {
        if (++copies === 3) throw Object.assign(new Error('UFFDIO_COPY failed: EFAULT (injected)'), { code: 'EFAULT' });
        return uffd.copy(firstPage, data);
      },
    };
  });
  t.teardown(() => setPostcopyUffdOpener(null));
  const destination = await setUp(t);
  const { source, filled } = await dirtierWithFilledRegion(t);
  // A running guest may wait at the destination on a page that can never come now.
  if (guest === 'paused') await source.machine.pause();
  const hash = guest === 'paused' ? memoryHash(source.machine.memory) : '';
  const started = performance.now();
  // The default recovery time (60 s) would time the test out: the source must hear at once.
  const error = await source.machine.migrate(destination.proxy.address, { postcopy: true }).then(() => null, (e: Error & { code?: string }) => e);
  t.ok(performance.now() - started < 10_000, 'the source fails promptly, without waiting to resume');
  t.equal(error?.code, 'EPOSTCOPY', 'the source fails with EPOSTCOPY');
  t.match(error?.message, /the destination gave up: post-copy failed here: UFFDIO_COPY failed: EFAULT \(injected\); the guest is paused here, lacking \d+ pages/);
  t.equal(destination.proxy.connections, 1, 'no resume was tried: it could not help');
  t.equal(source.machine.state, 'paused', 'the source keeps its copy, paused');
  if (guest === 'paused') t.equal(memoryHash(source.machine.memory), hash, 'with all its memory');
  else t.ok(Buffer.from(source.machine.memory.bytes(FILLED.addr, FILLED.bytes)).equals(filled), 'with all its memory');
  t.throws(() => source.machine.resume(), { code: 'ERR_MACHINE_STATE' }, 'which cannot resume there');
  const outcome = await destination.arrived.then(() => null, (e: Error) => e);
  t.type(outcome, PostcopyPausedError, 'the destination fails with a PostcopyPausedError');
  const paused = outcome as PostcopyPausedError;
  t.match(paused.message, /^post-copy failed here: UFFDIO_COPY failed: EFAULT \(injected\); the guest is paused here, lacking \d+ pages$/);
  t.match(paused.cause, { code: 'EFAULT' }, 'the uffd error is its cause');
  t.equal(paused.machine, await destination.running, 'the error holds the machine');
  t.equal(paused.machine.state, 'paused', 'the guest is paused there, not lost');
  t.ok(copies >= 3, 'the injected failure was hit');
});
