// A client of a console served on a unix socket (node-kvm run --serial unix:PATH), and waiting for
// such a socket to appear.
import { once } from 'node:events';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';

export interface ConsoleClient {
  readonly socket: net.Socket;
  /** Everything received so far, as latin1 text. */
  text(): string;
  /** Bytes received so far. */
  receivedBytes(): number;
  /** Resolves once the text received so far includes `expected`; rejects if the connection closes first. */
  waitFor(expected: string, timeoutMs?: number): Promise<void>;
  /** Resolves once `count` bytes have been received. */
  waitForBytes(count: number, timeoutMs?: number): Promise<void>;
  /** Resolves once the server has closed the connection. */
  closed: Promise<void>;
}

export async function connectConsole(socketPath: string): Promise<ConsoleClient> {
  const socket = net.createConnection(socketPath);
  socket.on('error', () => {});
  const chunks: Buffer[] = [];
  let bytes = 0;
  let ended = false;
  const waiters = new Set<() => void>();
  const wake = () => {
    for (const waiter of waiters) waiter();
  };
  socket.on('data', (chunk: Buffer) => {
    chunks.push(chunk);
    bytes += chunk.length;
    wake();
  });
  const closed = once(socket, 'close').then(() => {
    ended = true;
    wake();
  });
  await once(socket, 'connect');
  const text = () => Buffer.concat(chunks).toString('latin1');
  const waitUntil = (done: () => boolean, what: string, timeoutMs: number) => new Promise<void>((resolve, reject) => {
    const check = () => {
      if (done()) finish(null);
      else if (ended) finish(new Error(`the console connection closed before ${what}; got ${JSON.stringify(text().slice(-200))}`));
    };
    const finish = (error: Error | null) => {
      waiters.delete(check);
      clearTimeout(timer);
      if (error) reject(error);
      else resolve();
    };
    const timer = setTimeout(() => finish(new Error(`no ${what} within ${timeoutMs} ms; got ${JSON.stringify(text().slice(-200))}`)), timeoutMs);
    waiters.add(check);
    check();
  });
  return {
    socket,
    text,
    receivedBytes: () => bytes,
    waitFor: (expected, timeoutMs = 20_000) => waitUntil(() => text().includes(expected), JSON.stringify(expected), timeoutMs),
    waitForBytes: (count, timeoutMs = 20_000) => waitUntil(() => bytes >= count, `${count} bytes`, timeoutMs),
    closed,
  };
}

/** Resolves once `file` exists (watching its directory: no polling). */
export async function waitForPath(file: string, timeoutMs = 30_000): Promise<void> {
  const watcher = fs.watch(path.dirname(file));
  try {
    const appeared = new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`${file} did not appear within ${timeoutMs} ms`)), timeoutMs);
      const check = () => {
        if (fs.existsSync(file)) {
          clearTimeout(timer);
          resolve();
        }
      };
      watcher.on('change', check);
      check();
    });
    await appeared;
  } finally {
    watcher.close();
  }
}
