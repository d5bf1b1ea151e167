// A unix-socket proxy between a migration's source and destination that can break the connection
// at a chosen point: after so many bytes toward the destination, at once, or once a fault waits
// (it holds back what the source sends, and cuts when the destination asks for a page).
import net from 'node:net';

export interface MigrationProxy {
  /** The address the source connects to. */
  address: string;
  /** Connections made through the proxy so far. */
  readonly connections: number;
  /** Cuts the current connection once this many bytes (counted over all connections) have gone toward the destination. */
  cutAfterBytes(total: number): void;
  /** Flips one byte of what goes toward the destination: the one at this offset (counted over all connections). */
  corruptAt(offset: number): void;
  /** Cuts the current connection now. */
  cut(): void;
  /**
   * From now on, holds back what the source sends; cuts once the destination sends anything (a
   * PageRequest: a fault waits on a page that cannot come).
   */
  cutWhenFaultWaits(): Promise<void>;
  /** Cuts the current connection as the destination next sends anything, which never reaches the source. */
  cutOnReply(): Promise<void>;
  /** Refuses every connection from now on (a source or destination gone for good). */
  refuse(): void;
  /** Bytes toward the destination so far. */
  readonly bytesToDestination: number;
  close(): Promise<void>;
}

export async function startMigrationProxy(listenPath: string, destinationPath: string): Promise<MigrationProxy> {
  let current: { client: net.Socket; upstream: net.Socket } | null = null;
  let connections = 0;
  let toDestination = 0;
  let cutAt = Infinity;
  let corruptAt = Infinity;
  let holding = false;
  let onFaultWaits: (() => void) | null = null;
  let refusing = false;
  let onReply: (() => void) | null = null;
  const cut = () => {
    current?.client.destroy();
    current?.upstream.destroy();
    current = null;
  };
  const server = net.createServer((client) => {
    client.on('error', () => {});
    if (refusing) {
      client.destroy();
      return;
    }
    connections++;
    const upstream = net.createConnection(destinationPath);
    upstream.on('error', () => client.destroy());
    client.on('close', () => upstream.destroy());
    upstream.on('close', () => client.destroy());
    const connection = { client, upstream };
    current = connection;
    client.on('data', (chunk: Buffer) => {
      if (holding) return;
      const room = cutAt - toDestination;
      if (chunk.length >= room) {
        upstream.write(chunk.subarray(0, Math.max(0, room)), () => cut());
        toDestination += Math.max(0, room);
        cutAt = Infinity;
        return;
      }
      if (corruptAt >= toDestination && corruptAt < toDestination + chunk.length) {
        chunk = Buffer.from(chunk);
        chunk[corruptAt - toDestination] ^= 0x40;
        corruptAt = Infinity;
      }
      toDestination += chunk.length;
      upstream.write(chunk);
    });
    upstream.on('data', (chunk: Buffer) => {
      if (onReply) {
        const done = onReply;
        onReply = null;
        cut();
        done();
        return;
      }
      if (holding && onFaultWaits) {
        const done = onFaultWaits;
        onFaultWaits = null;
        holding = false;
        cut();
        done();
        return;
      }
      client.write(chunk);
    });
  });
  await new Promise<void>((resolve) => server.listen(listenPath, resolve));
  return {
    address: `unix:${listenPath}`,
    get connections() {
      return connections;
    },
    get bytesToDestination() {
      return toDestination;
    },
    cutAfterBytes: (total) => {
      cutAt = total;
    },
    corruptAt: (offset) => {
      corruptAt = offset;
    },
    cut,
    cutWhenFaultWaits: () => new Promise<void>((resolve) => {
      holding = true;
      onFaultWaits = resolve;
    }),
    cutOnReply: () => new Promise<void>((resolve) => {
      onReply = resolve;
    }),
    refuse: () => {
      refusing = true;
      cut();
    },
    close: () => new Promise<void>((resolve) => {
      cut();
      server.close(() => resolve());
    }),
  };
}
