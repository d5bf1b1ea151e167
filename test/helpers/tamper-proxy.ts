// A TCP proxy between a migration's source and destination that hands each chunk of the
// source's stream (and of the destination's replies) to a function that may change it, cut the
// connection, or hold it: faults injected into real migrations, on loopback.
import net from 'node:net';
import type { Test } from 'tap';

/** Changes a chunk of the source's bytes (`streamOffset`: of its first byte, from the stream header's magic on; negative in the handshake's chunk). */
export type StreamTamper = (chunk: Buffer, streamOffset: number, cut: () => void, stopReading: () => void) => Buffer;
/** Changes a chunk of the destination's replies; `hold` keeps the destination's end of the connection from reaching the source. */
export type ReplyTamper = (chunk: Buffer, cut: () => void, hold: () => void) => Buffer;

/**
 * A TCP proxy between source and destination that lets `tamper` change or cut the source's bytes
 * (counted from the stream header's magic on, after the handshake), or stop reading them; and
 * `tamperReplies` the destination's.
 */
export async function startProxy(
  t: Test,
  target: string,
  tamper: StreamTamper,
  tamperReplies: ReplyTamper = (chunk) => chunk,
): Promise<string> {
  const [, host, port] = /^tcp:(.*):(\d+)$/.exec(target)!;
  const server = net.createServer((client) => {
    const upstream = net.connect(Number(port), host);
    const cut = () => {
      client.destroy();
      upstream.destroy();
    };
    const stopReading = () => client.pause();
    let seen = Buffer.alloc(0);
    let streamStart = -1;
    let forwarded = 0;
    client.on('data', (chunk: Buffer) => {
      let out = chunk;
      if (streamStart < 0) {
        seen = Buffer.concat([seen, chunk]);
        const magic = seen.indexOf('NODE-KVM');
        if (magic >= 0) streamStart = magic;
      }
      if (streamStart >= 0) {
        const offsetInStream = forwarded - streamStart;
        out = tamper(Buffer.from(chunk), offsetInStream, cut, stopReading);
      }
      forwarded += chunk.length;
      if (!upstream.destroyed) upstream.write(out);
    });
    // Held: the destination's end of the connection is not passed on (the source hears nothing more).
    let held = false;
    const hold = () => void (held = true);
    upstream.on('data', (chunk: Buffer) => {
      const out = tamperReplies(chunk, cut, hold);
      if (!client.destroyed && out.length > 0) client.write(out);
    });
    client.on('error', cut);
    upstream.on('error', cut);
    client.on('close', () => upstream.end());
    upstream.on('close', () => held || client.destroy());
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.teardown(() => server.close());
  return `tcp:127.0.0.1:${(server.address() as net.AddressInfo).port}`;
}
