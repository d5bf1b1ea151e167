// The destination's reading of a stream's sections (receive.ts, receiveSections()): once the
// migration has failed there, nothing more of the stream reaches the machine being thrown away.
import net from 'node:net';
import { randomBytes } from 'node:crypto';
import t, { type Test } from 'tap';
import { encodeEnd } from '../../lib/migration/format.js';
import { MAX_BATCH_SECTION_BYTES, encodePageBatch } from '../../lib/migration/pages.js';
import { receiveSections } from '../../lib/migration/receive.js';

const MiB = 1024 * 1024;

/** A connected TCP pair on loopback; the accepted end paused, as listenForMigration() hands it over. */
async function tcpPair(t: Test): Promise<{ writer: net.Socket; reader: net.Socket }> {
  const server = net.createServer({ pauseOnConnect: true });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.teardown(() => server.close());
  const accepted = new Promise<net.Socket>((resolve) => server.once('connection', resolve));
  const writer = net.connect((server.address() as net.AddressInfo).port, '127.0.0.1');
  writer.on('error', () => {});
  await new Promise((resolve) => writer.once('connect', resolve));
  const reader = await accepted;
  reader.on('error', () => {});
  t.teardown(() => {
    writer.destroy();
    reader.destroy();
  });
  return { writer, reader };
}

t.test('stopped after a failure: what the source still sends is read and dropped, never written to guest RAM', async (t) => {
  const { writer, reader } = await tcpPair(t);
  const memoryBytes = 4 * MiB;
  const ram = randomBytes(memoryBytes);
  const batch = (firstPage: number) => encodePageBatch(ram, [{ firstPage, pageCount: 512 }], true, new Uint8Array(MAX_BATCH_SECTION_BYTES)).section.slice();
  let written = 0;
  let firstDone!: () => void;
  const firstIn = new Promise<void>((resolve) => (firstDone = resolve));
  const stream = receiveSections(reader, [], {
    memoryBytes,
    writePages: (_guestPhysAddr, data) => void (written += data.length),
    zeroPages: () => {},
    pagesDone: () => firstDone(),
    section: () => {},
  }, 10_000, undefined, 'a test stream');
  const first = batch(0);
  writer.write(first);
  await firstIn;
  t.equal(written, 2 * MiB, 'the first section went into guest RAM');

  stream.stop(new Error('the device state failed to apply'));
  const ended = t.rejects(stream.ended, /the device state failed to apply/, 'the stream ends with the failure');
  // The source, not told yet, sends its last pages and its End.
  writer.write(Buffer.concat([batch(512), encodeEnd()]));
  // (Read by the socket: it reads once more after the stop, then no longer.)
  while (stream.socket.bytesRead <= first.length) await new Promise((resolve) => setTimeout(resolve, 2));
  t.equal(written, 2 * MiB, 'bytes arrived after the stop, and none of them went into guest RAM');
  await ended;
});
