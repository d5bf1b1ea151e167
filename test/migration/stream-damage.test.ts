// Every kind of section a real pre-copy migration sends, damaged on its way (one bit of its type,
// flags, length, payload or CRC flipped) or cut off there, and the destination's replies likewise:
// whatever the damage, the guest is never lost nor run in two places. A damaged stream is refused
// by the destination before its guest runs, with a MigrationError that names a stream or
// connection failure (never a crash, a bare error or ERR_INTERNAL), and the guest runs on at the
// source or, once the whole stream has gone out, waits there paused (EUNCONFIRMED) for its owner;
// only page data may be mended (its pages asked for again), and the guest then arrives intact. A
// damaged reply before the pause makes the source give up and run on; a damaged or lost End (the
// destination's word that the guest runs there) leaves the guest running there and paused here.
// One source runs through all of it (made anew after a migration that completed), each attempt to
// a new destination in this process.
import t from 'tap';
import { Machine, MigrationError } from '../../lib/index.js';
import { HEADER_BYTES, SECTION_HEADER_BYTES, SectionType } from '../../lib/migration/format.js';
import { noKvm } from '../helpers/kvm.js';
import { assertCountsOnThere, assertRunsOn, MiB, startDirtier } from '../helpers/migration.js';
import { startLocalDestination } from '../helpers/migration-peer.js';
import { sharedPool } from '../helpers/pool.js';
import { startProxy, type ReplyTamper, type StreamTamper } from '../helpers/tamper-proxy.js';

const TOKEN = 'damage-token-5c1e';
const pool = noKvm ? undefined : sharedPool(2);
/** Short, for the damage that leaves one side waiting (an End that announces a payload never sent). */
const TIMEOUT_MS = 1500;

interface Damage {
  what: string;
  /** The section's type, or the stream's header. */
  type: number | 'header';
  /** Which section of that type (0: the first). */
  index: number;
  /** The byte, from the section's (or header's) start; negative: from its end (-1: the CRC's last byte). */
  at: number;
  /** Cut the stream before that byte instead of flipping a bit of it. */
  cut?: boolean;
  /** The destination may mend it (page data: its pages asked for again): the migration may complete. */
  mendable?: boolean;
  /** In the destination's replies (its header, acceptance, Sync answers, End) rather than the source's stream. */
  reply?: boolean;
  /** With it, damage to the source's stream too (for a reply that answers damage: a PageRequest). */
  alsoStream?: Damage;
}

const T = SectionType;
// A live Pages section ends with its data, the data's CRC (u32) and the section's CRC (u32).
const DAMAGE: Damage[] = [
  { what: 'header, magic', type: 'header', index: 0, at: 3 },
  { what: 'header, kind', type: 'header', index: 0, at: 12 },
  { what: 'header, RAM size', type: 'header', index: 0, at: 19 },
  { what: 'header, vCPU count', type: 'header', index: 0, at: 24 },
  { what: 'header, stream id', type: 'header', index: 0, at: 40 },
  { what: 'header, CRC', type: 'header', index: 0, at: 67 },
  { what: 'Config, type', type: T.Config, index: 0, at: 0 },
  { what: 'Config, length', type: T.Config, index: 0, at: 4 },
  { what: 'Config, payload', type: T.Config, index: 0, at: SECTION_HEADER_BYTES + 2 },
  { what: 'Config, CRC', type: T.Config, index: 0, at: -1 },
  { what: 'Pages, type', type: T.Pages, index: 0, at: 0 },
  { what: 'Pages, live flag', type: T.Pages, index: 0, at: 2 },
  { what: 'Pages, length', type: T.Pages, index: 0, at: 6 },
  { what: 'Pages, range count', type: T.Pages, index: 0, at: SECTION_HEADER_BYTES },
  { what: 'Pages, first range\'s first page', type: T.Pages, index: 0, at: SECTION_HEADER_BYTES + 4 },
  { what: 'Pages, first range\'s page count', type: T.Pages, index: 0, at: SECTION_HEADER_BYTES + 12 },
  { what: 'Pages, page data', type: T.Pages, index: 0, at: -9, mendable: true },
  { what: 'Pages, data CRC', type: T.Pages, index: 0, at: -5 },
  { what: 'Pages, CRC', type: T.Pages, index: 0, at: -1 },
  { what: 'Sync, type', type: T.Sync, index: 0, at: 0 },
  { what: 'Sync, length', type: T.Sync, index: 0, at: 4 },
  { what: 'Sync, CRC', type: T.Sync, index: 0, at: -1 },
  { what: 'DeviceStateAhead, payload', type: T.DeviceStateAhead, index: 0, at: SECTION_HEADER_BYTES + 3 },
  { what: 'DeviceStateAhead, CRC', type: T.DeviceStateAhead, index: 0, at: -1 },
  { what: 'the state\'s Config, payload', type: T.Config, index: 1, at: SECTION_HEADER_BYTES + 2 },
  { what: 'VmState, type', type: T.VmState, index: 0, at: 0 },
  { what: 'VmState, payload', type: T.VmState, index: 0, at: SECTION_HEADER_BYTES + 40 },
  { what: 'VmState, CRC', type: T.VmState, index: 0, at: -1 },
  { what: 'VcpuState, type', type: T.VcpuState, index: 0, at: 0 },
  { what: 'VcpuState, length', type: T.VcpuState, index: 0, at: 5 },
  { what: 'VcpuState, payload', type: T.VcpuState, index: 0, at: SECTION_HEADER_BYTES + 100 },
  { what: 'VcpuState, CRC', type: T.VcpuState, index: 0, at: -1 },
  { what: 'DeviceState, payload', type: T.DeviceState, index: 0, at: SECTION_HEADER_BYTES + 3 },
  { what: 'DeviceState, CRC', type: T.DeviceState, index: 0, at: -1 },
  { what: 'End, type', type: T.End, index: 0, at: 0 },
  { what: 'End, length', type: T.End, index: 0, at: 4 },
  { what: 'End, CRC', type: T.End, index: 0, at: -1 },
  { what: 'cut inside the second Pages section', type: T.Pages, index: 1, at: 100, cut: true },
  { what: 'cut before the first Sync', type: T.Sync, index: 0, at: 0, cut: true },
  { what: 'cut inside VcpuState', type: T.VcpuState, index: 0, at: SECTION_HEADER_BYTES + 50, cut: true },
  { what: 'cut before DeviceState', type: T.DeviceState, index: 0, at: 0, cut: true },
  { what: 'cut before End', type: T.End, index: 0, at: 0, cut: true },
  { what: 'cut inside End', type: T.End, index: 0, at: 6, cut: true },
  // The destination's side: before the pause the source gives up and runs on; the End (its word
  // that the guest runs there) damaged, the destination runs the guest and the source, unable to
  // tell, keeps its copy paused.
  { what: 'reply header, CRC', type: 'header', index: 0, at: 67, reply: true },
  { what: 'reply acceptance (Config), payload', type: T.Config, index: 0, at: SECTION_HEADER_BYTES + 2, reply: true },
  { what: 'reply Sync answer, type', type: T.Sync, index: 0, at: 0, reply: true },
  { what: 'reply Sync answer, CRC', type: T.Sync, index: 0, at: -1, reply: true },
  {
    what: 'reply PageRequest (asking again for damaged page data), CRC', type: T.PageRequest, index: 0, at: -1, reply: true,
    alsoStream: { what: 'page data', type: T.Pages, index: 0, at: -9 },
  },
  { what: 'reply End, type', type: T.End, index: 0, at: 0, reply: true },
  { what: 'reply End, CRC', type: T.End, index: 0, at: -1, reply: true },
  { what: 'reply cut before End', type: T.End, index: 0, at: 0, cut: true, reply: true },
];

/** What a destination may fail with: the stream or the connection, said plainly. */
const DESTINATION_CODES = ['EMAGIC', 'EVERSION', 'ECHECKSUM', 'EFORMAT', 'ETRUNCATED', 'ETOOBIG', 'EMISMATCH', 'ECLOSED', 'ETIMEDOUT', 'ECANCELED'];
/** And a source: the destination's refusal, the connection, or (the whole stream out) no word at all. */
const SOURCE_CODES = ['EREFUSED', 'ECLOSED', 'ETIMEDOUT', 'EUNCONFIRMED'];

/**
 * A tamper that follows the sections of the source's stream as they pass (an incomplete section
 * header is held back until it is whole, so that every byte of a section is known before it goes
 * on) and damages `damage`'s byte once it comes.
 */
function damageSection(damage: Damage): { tamper: StreamTamper; reached: () => boolean } {
  let offset = 0; // stream offset of the next byte passed on
  let nextSection = HEADER_BYTES;
  let held = Buffer.alloc(0);
  let target = damage.type === 'header' ? damage.at : -1;
  let reached = false;
  let cutOff = false;
  const seen = new Map<number, number>();
  const tamper: StreamTamper = (chunk, streamOffset, cut) => {
    if (cutOff) return Buffer.alloc(0);
    // The handshake's last bytes may share the chunk with the stream's first: they go on as they are.
    const handshake = streamOffset < 0 ? chunk.subarray(0, -streamOffset) : Buffer.alloc(0);
    const stream = streamOffset < 0 ? chunk.subarray(-streamOffset) : chunk;
    const data = held.length > 0 ? Buffer.concat([held, stream]) : Buffer.from(stream);
    let whole = data.length;
    for (let at = nextSection - offset; at < data.length; at = nextSection - offset) {
      if (at + SECTION_HEADER_BYTES > data.length) {
        whole = at;
        break;
      }
      const type = data.readUInt16LE(at);
      const size = SECTION_HEADER_BYTES + data.readUInt32LE(at + 4) + 4;
      const index = seen.get(type) ?? 0;
      seen.set(type, index + 1);
      if (!reached && target < 0 && type === damage.type && index === damage.index) {
        target = nextSection + (damage.at >= 0 ? damage.at : size + damage.at);
      }
      nextSection += size;
    }
    held = Buffer.from(data.subarray(whole));
    let out = data.subarray(0, whole);
    if (target >= offset && target < offset + out.length) {
      reached = true;
      if (damage.cut) {
        out = out.subarray(0, target - offset);
        cutOff = true;
        setImmediate(cut);
      } else {
        out[target - offset]! ^= 0x01;
      }
      target = -1;
    }
    offset += out.length;
    return Buffer.concat([handshake, out]);
  };
  return { tamper, reached: () => reached };
}

/** damageSection() for the destination's replies: their stream starts at the destination's header (after the handshake's bytes). */
function damageReplies(damage: Damage): { tamper: ReplyTamper; reached: () => boolean } {
  const damaged = damageSection(damage);
  let seen = Buffer.alloc(0);
  let streamStart = -1;
  let passed = 0;
  const tamper: ReplyTamper = (chunk, cut) => {
    if (streamStart < 0) {
      seen = Buffer.concat([seen, chunk]);
      const magic = seen.indexOf('NODE-KVM');
      if (magic >= 0) streamStart = magic;
    }
    const out = streamStart < 0 ? chunk : damaged.tamper(chunk, passed - streamStart, cut, () => {});
    passed += chunk.length;
    return out;
  };
  return { tamper, reached: damaged.reached };
}

type Source = Awaited<ReturnType<typeof startDirtier>>;

async function newSource(): Promise<Source> {
  const source = await startDirtier({ memoryBytes: 32 * MiB, rangeBytes: 2 * MiB, config: { pool } });
  // Stopped with the file: it serves the tests after the one that made it.
  t.teardown(() => source.machine.stop());
  await source.waitForOutput('pass 1 ok\n');
  return source;
}

// One source for every damage (a failed migration leaves it running), made anew after one mended.
let source: Source | undefined;

for (const damage of DAMAGE) {
  t.test(`${damage.what}: the guest never lost nor run in two places`, { skip: noKvm }, async (t) => {
    source ??= await newSource();
    const destination = startLocalDestination(t, 'tcp:127.0.0.1:0', { token: TOKEN, pool, timeoutMs: TIMEOUT_MS });
    const streamDamage = damage.reply ? damage.alsoStream : damage;
    const damagedStream = streamDamage ? damageSection(streamDamage) : null;
    const damagedReplies = damage.reply ? damageReplies(damage) : null;
    const address = await startProxy(t, await destination.listening, damagedStream?.tamper ?? ((chunk) => chunk), damagedReplies?.tamper);
    const error = await source.machine.migrate(address, { token: TOKEN, timeoutMs: TIMEOUT_MS }).then(() => null, (e: unknown) => e);
    const arrived = await destination.arrived.then((machine) => machine, (e: unknown) => e);
    if (damagedStream) t.ok(damagedStream.reached(), 'the stream reached the damage');
    if (damagedReplies) t.ok(damagedReplies.reached(), 'the replies reached the damage');
    if (error === null) {
      t.ok(damage.mendable, 'only damage the destination mends lets the migration complete');
      t.ok(arrived instanceof Machine && arrived.state === 'running', 'mended, the guest runs at the destination');
      await assertCountsOnThere(t, source, destination);
      await (arrived as Machine).stop();
      source = undefined;
      return;
    }
    t.type(error, MigrationError, 'the source fails with a MigrationError');
    const code = (error as MigrationError).code;
    t.ok(SOURCE_CODES.includes(code), `the source says ${code} (${(error as Error).message})`);
    if (code === 'EUNCONFIRMED') {
      // The whole stream went out, and no word it could read came back: the guest waits paused
      // for its owner. The destination either refused the stream or runs the guest; the owner,
      // who knows which, stops that one and resumes this one.
      t.equal(source.machine.state, 'paused', 'unconfirmed, the source keeps the guest paused');
      if (arrived instanceof Machine) {
        t.equal(arrived.state, 'running', 'the destination runs the guest (its word was lost)');
        await assertCountsOnThere(t, source, destination);
        await arrived.stop();
      } else {
        t.type(arrived, MigrationError, 'or the destination refused the stream');
        t.ok(DESTINATION_CODES.includes((arrived as MigrationError).code), `the destination says ${(arrived as MigrationError).code} (${(arrived as Error).message})`);
      }
      source.machine.resume();
    } else {
      t.type(arrived, MigrationError, 'the destination refuses the stream, never running the guest');
      const destinationCode = (arrived as MigrationError).code;
      t.ok(DESTINATION_CODES.includes(destinationCode), `the destination says ${destinationCode} (${(arrived as Error).message})`);
      t.equal(source.machine.state, 'running', 'the source runs the guest on');
    }
    await assertRunsOn(t, source);
  });
}
