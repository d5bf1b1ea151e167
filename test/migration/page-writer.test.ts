// PageWriter: page data written into a memfd on a thread of its own, in the order given, from the
// buffers it lends to the socket; failures reported, nothing written after close().
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import t, { type Test } from 'tap';
import { GuestMemory } from '../../lib/index.js';
import { PAGE_WRITER_BUFFERS, PAGE_WRITER_BUFFER_BYTES, PageWriter } from '../../lib/migration/page-writer.js';
import { MigrationError } from '../../lib/migration/errors.js';

const PAGE = 4096;

function setup(t: Test): { writer: PageWriter; memory: GuestMemory } {
  const memory = GuestMemory.create(16 * 1024 * 1024, { backing: 'memfd' });
  const writer = new PageWriter(5000);
  writer.attach(memory.fd);
  t.teardown(() => {
    writer.close();
    memory.close();
  });
  return { writer, memory };
}

t.test('writes land in order: a page written twice ends with its later data', async (t) => {
  const { writer, memory } = setup(t);
  const buffers: Uint8Array[] = [];
  // Every buffer twice round: each is lent again only once its writes are done.
  for (let round = 0; round < 2 * PAGE_WRITER_BUFFERS; round++) {
    const buffer = writer.nextBuffer();
    t.equal(buffer.length, PAGE_WRITER_BUFFER_BYTES);
    buffers.push(buffer);
    buffer.fill(round + 1, 0, 3 * PAGE);
    // Page 0 every round (the last round's wins); page 10 + round once each; a piece that is not
    // page-aligned in the buffer.
    t.equal(writer.write(0, buffer.subarray(0, PAGE)), true);
    t.equal(writer.write((10 + round) * PAGE, buffer.subarray(PAGE, 2 * PAGE)), true);
    t.equal(writer.write(1024 * 1024 + round * 100, buffer.subarray(2 * PAGE + 7, 2 * PAGE + 107)), true);
  }
  t.equal(new Set(buffers.map((buffer) => buffer.buffer)).size, PAGE_WRITER_BUFFERS, 'its buffers, lent in turn');
  writer.drain();
  const ram = memory.bytes();
  t.ok(ram.subarray(0, PAGE).every((byte) => byte === 2 * PAGE_WRITER_BUFFERS), 'page 0 holds the last data written to it');
  for (let round = 0; round < 2 * PAGE_WRITER_BUFFERS; round++) {
    t.ok(ram.subarray((10 + round) * PAGE, (11 + round) * PAGE).every((byte) => byte === round + 1), `page ${10 + round}`);
    t.ok(ram.subarray(1024 * 1024 + round * 100, 1024 * 1024 + round * 100 + 100).every((byte) => byte === round + 1), `piece ${round}`);
  }
  t.equal(ram[9 * PAGE], 0, 'nothing else written');
});

t.test('data outside its buffers is left to the caller', async (t) => {
  const { writer } = setup(t);
  t.equal(writer.write(0, new Uint8Array(PAGE)), false);
  const notAttached = new PageWriter(1000);
  t.teardown(() => notAttached.close());
  await notAttached.online;
  t.throws(() => notAttached.write(0, notAttached.nextBuffer().subarray(0, PAGE)), { code: 'ERR_INVALID_STATE', message: 'the page writer has no memfd to write to' });
  t.throws(() => new PageWriter(0), { name: 'RangeError' });
  t.throws(() => notAttached.attach(-1), { name: 'TypeError' });
});

t.test('a failed write fails the next call; close() then ends the thread and nothing more is written', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nkvm-writer-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const file = path.join(dir, 'ram');
  fs.writeFileSync(file, Buffer.alloc(PAGE));
  const readOnly = fs.openSync(file, 'r');
  t.teardown(() => fs.closeSync(readOnly));
  const writer = new PageWriter(5000);
  writer.attach(readOnly);
  const buffer = writer.nextBuffer();
  buffer.fill(0xab, 0, PAGE);
  t.equal(writer.write(0, buffer.subarray(0, PAGE)), true);
  const error = (() => {
    try {
      writer.drain();
    } catch (caught) {
      return caught as MigrationError;
    }
    return null;
  })();
  t.type(error, MigrationError);
  t.equal(error?.message, 'writing guest RAM failed: errno 9', 'EBADF: the fd is read-only');
  t.throws(() => writer.write(0, buffer.subarray(0, PAGE)), { message: 'writing guest RAM failed: errno 9' }, 'and again');
  t.not(writer.nextBuffer().buffer, buffer.buffer, 'a read after the failure gets a spare buffer, and no throw');
  writer.close();
  t.equal(writer.write(0, buffer.subarray(0, PAGE)), false, 'closed: nothing queued');
  writer.drain();
  t.ok(fs.readFileSync(file).every((byte) => byte === 0), 'the file is unchanged');
});

t.test('close() waits for the write under way: the memfd may be closed right after', async (t) => {
  const memory = GuestMemory.create(64 * 1024 * 1024, { backing: 'memfd' });
  const writer = new PageWriter(5000);
  writer.attach(memory.fd);
  for (let round = 0; round < PAGE_WRITER_BUFFERS; round++) {
    const buffer = writer.nextBuffer();
    buffer.fill(7);
    writer.write(round * PAGE_WRITER_BUFFER_BYTES, buffer);
  }
  writer.close();
  const ram = memory.bytes();
  // What was written is whole: each buffer's range is all 7s or all zeros, none half.
  for (let round = 0; round < PAGE_WRITER_BUFFERS; round++) {
    const range = ram.subarray(round * PAGE_WRITER_BUFFER_BYTES, (round + 1) * PAGE_WRITER_BUFFER_BYTES);
    const first = range[0];
    t.ok(range.every((byte) => byte === first), `range ${round} whole (${first === 7 ? 'written' : 'dropped'})`);
  }
  memory.close();
});
