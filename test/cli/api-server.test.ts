// The control API over a unix socket, served for a fake machine: every method, migration
// progress, bad input of every kind, clients that leave early, clients that do not read.
import { once } from 'node:events';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import t, { type Test } from 'tap';
import { ApiError, callApi } from '../../lib/cli/api-client.js';
import { MAX_REQUEST_LINE_BYTES, startApiServer, type ApiMachine, type ApiMachineState, type ApiServer, type ApiServerOptions } from '../../lib/cli/api-server.js';
import { ErrorCode, NodeKvmError } from '../../lib/kvm/errors.js';
import type { MigrateOptions, MigrationProgress, MigrationStats, SnapshotInfo, SnapshotOptions } from '../../lib/migration/types.js';

const MIB = 1024 * 1024;

function stats(phase: MigrationStats['phase'], iterations: number, remainingPages: number): MigrationStats {
  return {
    phase, totalTimeMs: 100 * iterations, setupTimeMs: 2, downtimeMs: phase === 'completed' ? 7 : 0, expectedDowntimeMs: 3,
    bytesTransferred: iterations * MIB, pagesTransferred: iterations * 256, zeroPagesSkipped: 100, pagesResent: 10 * iterations,
    iterations, dirtyPagesRate: 1000, throughputBytesPerSec: 50 * MIB, remainingPages, memoryBytes: 64 * MIB, dirtyLogMode: 'bitmap',
  };
}

const PROGRESS: MigrationProgress[] = [stats('setup', 0, 16384), stats('precopy', 1, 300), stats('stop-copy', 2, 20)];
const FINAL = stats('completed', 2, 0);
const STATUS = { state: 'running', vcpuCount: 2, memoryBytes: 64 * MIB, migration: null };
const STATUS_JSON = JSON.stringify(STATUS);
const isStatus = (result: unknown) => JSON.stringify(result) === STATUS_JSON;

class FakeMachine implements ApiMachine {
  state: ApiMachineState = 'running';
  readonly memoryBytes = 64 * MIB;
  readonly calls: unknown[][] = [];
  /** status is the only method that reads vcpuCount. */
  statusCalls = 0;
  /** migrate() waits for this after its progress reports. */
  migrationGate: Promise<void> = Promise.resolve();
  /** More precopy updates migrate() reports after PROGRESS, a batch per turn of the event loop. */
  extraProgressUpdates = 0;
  migrationStarted: Promise<void>;
  /** Settles with what the first migrate() returned or threw. */
  migrationEnded: Promise<MigrationStats | Error>;
  /** snapshot() waits for this before it writes. */
  snapshotGate: Promise<void> = Promise.resolve();
  snapshotsWritten = 0;
  #started!: () => void;
  #ended!: (outcome: MigrationStats | Error) => void;

  constructor() {
    this.migrationStarted = new Promise((resolve) => (this.#started = resolve));
    this.migrationEnded = new Promise((resolve) => (this.#ended = resolve));
  }

  get vcpuCount(): number {
    this.statusCalls++;
    return 2;
  }

  async pause(): Promise<void> {
    // As Machine refuses: with code ERR_MACHINE_STATE.
    if (this.state !== 'running') throw new NodeKvmError(ErrorCode.MachineState, `machine is ${this.state}, not running`);
    this.calls.push(['pause']);
    this.state = 'paused';
  }

  resume(): void {
    if (this.state !== 'paused') throw new NodeKvmError(ErrorCode.MachineState, `machine is ${this.state}, not paused`);
    this.calls.push(['resume']);
    this.state = 'running';
  }

  stop(): void {
    this.calls.push(['stop']);
    if (this.state !== 'stopped') this.state = 'stopping';
  }

  async reset(): Promise<void> {
    this.calls.push(['reset']);
  }

  async snapshot(file: string, options?: SnapshotOptions): Promise<SnapshotInfo> {
    this.calls.push(['snapshot', file, options]);
    await this.snapshotGate;
    this.snapshotsWritten++;
    if (file.endsWith('/fail')) throw Object.assign(new Error('cannot write the snapshot: ENOSPC'), { code: 'ENOSPC' });
    return {
      path: file, kind: options?.diff ? 'diff' : 'full', ...(options?.diff ? { parent: '/snap/base' } : {}),
      bytesWritten: 4096 * 3, pagesWritten: 3, zeroPagesSkipped: 5, pausedMs: 1.5, totalTimeMs: 4,
    };
  }

  async migrate(address: string, options?: MigrateOptions): Promise<MigrationStats> {
    const { onProgress, ...rest } = options ?? {};
    this.calls.push(['migrate', address, rest]);
    this.#started();
    try {
      for (const update of PROGRESS) onProgress?.(update);
      for (let sent = 0; sent < this.extraProgressUpdates; sent++) {
        if (sent % 100 === 0) await new Promise((resolve) => setImmediate(resolve));
        onProgress?.(stats('precopy', 3 + sent, 300));
      }
      await this.migrationGate;
      // An error without a code: the client gives it ERR_API_CALL_FAILED.
      if (address.endsWith(':1')) throw new Error('migration refused: wrong token');
      this.#ended(FINAL);
      return FINAL;
    } catch (error) {
      this.#ended(error as Error);
      throw error;
    }
  }
}

interface Served {
  machine: FakeMachine;
  server: ApiServer;
  socketPath: string;
}

async function serve(t: Test, options?: ApiServerOptions): Promise<Served> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nkvm-api-'));
  const socketPath = path.join(dir, 'api.sock');
  const machine = new FakeMachine();
  const server = await startApiServer(socketPath, machine, options);
  t.teardown(async () => {
    await server.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });
  return { machine, server, socketPath };
}

/** A raw connection: send lines, read the answers as parsed JSON (from the start, or once told to). */
async function rawClient(socketPath: string, { reading = true } = {}) {
  const socket = net.createConnection(socketPath);
  await new Promise<void>((resolve, reject) => {
    socket.once('connect', resolve);
    socket.once('error', reject);
  });
  let buffered = '';
  const messages: unknown[] = [];
  const waiters: (() => void)[] = [];
  let ended = false;
  const wakeAll = () => {
    for (const wake of waiters.splice(0)) wake();
  };
  const startReading = () => {
    socket.setEncoding('utf8');
    socket.on('data', (text: string) => {
      buffered += text;
      let start = 0;
      for (let newline = buffered.indexOf('\n'); newline >= 0; newline = buffered.indexOf('\n', start)) {
        messages.push(JSON.parse(buffered.slice(start, newline)));
        start = newline + 1;
      }
      buffered = buffered.slice(start);
      wakeAll();
    });
  };
  socket.on('error', () => {});
  socket.on('close', () => {
    ended = true;
    wakeAll();
  });
  if (reading) startReading();
  return {
    socket,
    startReading,
    send: (text: string) => socket.write(text),
    /** Resolves with the first `count` messages received. */
    async receive(count: number): Promise<unknown[]> {
      while (messages.length < count && !ended) await new Promise<void>((resolve) => waiters.push(resolve));
      return messages.slice(0, count);
    },
    /** Resolves once `condition` holds after a message arrives, or the connection closes. */
    async until(condition: () => boolean): Promise<void> {
      while (!condition() && !ended) await new Promise<void>((resolve) => waiters.push(resolve));
    },
    get closed() {
      return ended;
    },
    messages,
  };
}

/** `promise`, or a rejection saying what did not happen within `timeoutMs`. */
async function within<T>(promise: Promise<T>, timeoutMs: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`not within ${timeoutMs} ms: ${what}`)), timeoutMs)));
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** Checks `condition` every few ms until it holds: for a state that comes with no event. */
async function poll(condition: () => boolean, timeoutMs: number, what: string): Promise<void> {
  const deadline = performance.now() + timeoutMs;
  while (!condition()) {
    if (performance.now() > deadline) throw new Error(`not within ${timeoutMs} ms: ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 2));
  }
}

/** Status requests for ids first..first+count-1, one per line. */
function statusRequests(first: number, count: number): string {
  let text = '';
  for (let id = first; id < first + count; id++) text += `{"id":${id},"method":"status"}\n`;
  return text;
}

t.test('the socket is private, and removed on close', async (t) => {
  const { server, socketPath } = await serve(t);
  t.equal(fs.lstatSync(socketPath).mode & 0o777, 0o600);
  await server.close();
  t.notOk(fs.existsSync(socketPath));
  const unserved = await callApi(socketPath, 'status', {}).catch((error: unknown) => error);
  t.match(unserved, { name: 'NodeKvmError', code: 'ENOENT', message: `no machine is serving the API socket ${socketPath} (ENOENT)` });
  t.match((unserved as Error).cause, { code: 'ENOENT', syscall: 'connect' }, "the socket's own error is the cause");
});

t.test('status, pause, resume and snapshot', async (t) => {
  const { machine, socketPath } = await serve(t);
  t.same(await callApi(socketPath, 'status', {}), { state: 'running', vcpuCount: 2, memoryBytes: 64 * MIB, migration: null });
  t.same(await callApi(socketPath, 'pause', {}), { state: 'paused' });
  t.same(await callApi(socketPath, 'status', {}), { state: 'paused', vcpuCount: 2, memoryBytes: 64 * MIB, migration: null });
  await t.rejects(callApi(socketPath, 'pause', {}), { name: 'ApiError', code: 'ERR_MACHINE_STATE', message: 'machine is paused, not running' }, "the machine's code reaches the client");
  t.same(await callApi(socketPath, 'resume', {}), { state: 'running' });
  t.same(await callApi(socketPath, 'snapshot', { path: '/snap/one' }), {
    path: '/snap/one', kind: 'full', bytesWritten: 12288, pagesWritten: 3, zeroPagesSkipped: 5, pausedMs: 1.5, totalTimeMs: 4,
  });
  t.same(await callApi(socketPath, 'snapshot', { path: '/snap/two', diff: true }), {
    path: '/snap/two', kind: 'diff', parent: '/snap/base', bytesWritten: 12288, pagesWritten: 3, zeroPagesSkipped: 5, pausedMs: 1.5, totalTimeMs: 4,
  });
  const failed = await callApi(socketPath, 'snapshot', { path: '/snap/fail' }).catch((error: unknown) => error);
  t.type(failed, ApiError);
  t.type(failed, NodeKvmError);
  t.equal((failed as ApiError).message, 'cannot write the snapshot: ENOSPC');
  t.equal((failed as ApiError).code, 'ENOSPC');
  t.same(machine.calls, [
    ['pause'], ['resume'], ['snapshot', '/snap/one', { diff: false }], ['snapshot', '/snap/two', { diff: true }], ['snapshot', '/snap/fail', { diff: false }],
  ]);
});

t.test('stop and reset: stop answered as the machine begins to end; reset once rebooted, only while there is a guest', async (t) => {
  const { machine, socketPath } = await serve(t);
  t.same(await callApi(socketPath, 'reset', {}), { state: 'running' });
  machine.state = 'paused';
  t.same(await callApi(socketPath, 'reset', {}), { state: 'paused' }, 'a paused guest resets too, and stays paused');
  machine.state = 'stopping';
  await t.rejects(callApi(socketPath, 'reset', {}), { name: 'ApiError', code: 'ERR_MACHINE_STATE', message: 'machine is stopping: there is no guest to reset' });
  t.same(await callApi(socketPath, 'stop', {}), { state: 'stopping' }, 'stop is allowed in every state');
  machine.state = 'stopped';
  t.same(await callApi(socketPath, 'stop', {}), { state: 'stopped' });
  await t.rejects(callApi(socketPath, 'stop', { now: true } as never), { code: 'ERR_INVALID_ARG_VALUE', message: "stop: unknown parameter 'now'" });
  t.same(machine.calls, [['reset'], ['reset'], ['stop'], ['stop']]);
});

t.test('migrate: progress notifications, then the statistics', async (t) => {
  const { machine, socketPath } = await serve(t);
  const progress: MigrationProgress[] = [];
  const result = await callApi(socketPath, 'migrate', { address: 'tcp:10.0.0.2:4444', token: 'secret', downtimeBudgetMs: 20, maxIterations: 5, onNonConvergence: 'abort' }, (update) => progress.push(update));
  t.same(result, FINAL);
  t.same(progress, PROGRESS);
  t.same(machine.calls, [['migrate', 'tcp:10.0.0.2:4444', { token: 'secret', downtimeBudgetMs: 20, maxIterations: 5, onNonConvergence: 'abort' }]]);
  await t.rejects(callApi(socketPath, 'migrate', { address: 'tcp:10.0.0.2:1', token: 'x' }), { name: 'ApiError', code: 'ERR_API_CALL_FAILED', message: 'migration refused: wrong token' });

  // The raw protocol: the progress lines carry the request's id.
  const client = await rawClient(socketPath);
  client.send('{"id":"m1","method":"migrate","params":{"address":"unix:/run/dest.sock"}}\n');
  t.same(await client.receive(4), [
    ...PROGRESS.map((update) => ({ id: 'm1', progress: update })),
    { id: 'm1', result: FINAL },
  ]);
  client.socket.destroy();
});

t.test('while a migration runs: status shows it, a second one is refused, and a client that leaves does not hurt', async (t) => {
  const { machine, socketPath } = await serve(t);
  let open!: () => void;
  machine.migrationGate = new Promise((resolve) => (open = resolve));
  const client = await rawClient(socketPath);
  client.send('{"id":7,"method":"migrate","params":{"address":"unix:/run/dest.sock"}}\n');
  await machine.migrationStarted;
  await client.receive(3);
  client.socket.destroy(); // gone mid-call

  const status = await callApi(socketPath, 'status', {});
  t.same(status.migration, PROGRESS[2], 'the latest progress');
  await t.rejects(callApi(socketPath, 'migrate', { address: 'unix:/run/other.sock' }), { name: 'ApiError', code: 'ERR_MACHINE_STATE', message: 'a migration is already under way' });
  open();
  await new Promise((resolve) => setTimeout(resolve, 20));
  t.same((await callApi(socketPath, 'status', {})).migration, null, 'done');
  t.same(await callApi(socketPath, 'migrate', { address: 'unix:/run/dest.sock' }), FINAL, 'and the server still serves');
});

t.test('bad requests get an error answer, never a crash', async (t) => {
  const { machine, socketPath } = await serve(t);
  const client = await rawClient(socketPath);
  const requests = [
    'this is not json',
    '[1,2,3]',
    '{"method":"status"}',
    '{"id":{"a":1},"method":"status"}',
    '{"id":1,"method":"reboot"}',
    '{"id":2}',
    '{"id":3,"method":"status","params":[1]}',
    '{"id":4,"method":"status","params":{"verbose":true}}',
    '{"id":5,"method":"snapshot","params":{"path":"relative/file"}}',
    '{"id":6,"method":"snapshot","params":{"path":"/x","diff":"yes"}}',
    '{"id":7,"method":"snapshot"}',
    '{"id":8,"method":"migrate","params":{"address":"ftp:host:1"}}',
    '{"id":9,"method":"migrate","params":{"address":"unix:relative.sock"}}',
    '{"id":10,"method":"migrate","params":{"address":"tcp:h:1","maxIterations":0}}',
    '{"id":11,"method":"migrate","params":{"address":"tcp:h:1","downtimeBudgetMs":"fast"}}',
    '{"id":12,"method":"migrate","params":{"address":"tcp:h:1","onNonConvergence":"retry"}}',
    '{"id":13,"method":"migrate","params":{"address":"tcp:h:1","token":""}}',
    '{"id":14,"method":"migrate","params":{"address":"tcp:h:1","speed":9}}',
    '{"id":15,"method":"migrate","params":{}}',
    '{"id":16,"method":"resume"}',
    '{"id":17,"method":"migrate","params":{"address":"tcp:h:1","autoConverge":{"throttleMax":100}}}',
    '{"id":18,"method":"migrate","params":{"address":"tcp:h:1","autoConverge":"on"}}',
  ];
  // In one write, split across lines, with a \r\n and a blank line mixed in.
  client.send(`${requests.slice(0, 10).join('\n')}\r\n\n${requests.slice(10).join('\n')}\n`);
  const answers = await client.receive(requests.length);
  const errors = new Map((answers as { id: unknown; error: { message: string } }[]).map((answer, index) => [index, answer]));
  const messageFor = (index: number) => errors.get(index)!;
  t.match(messageFor(0), { id: null, error: { message: /^malformed JSON: Unexpected token/, code: 'ERR_API_PROTOCOL' } });
  // Each answer's error: its message and code.
  const byId = (id: unknown) => (answers as { id: unknown; error: { message: string; code?: string } }[]).filter((answer) => answer.id === id).map((answer) => answer.error);
  const protocol = (message: string) => ({ message, code: 'ERR_API_PROTOCOL' });
  const argType = (message: string) => ({ message, code: 'ERR_INVALID_ARG_TYPE' });
  const argValue = (message: string) => ({ message, code: 'ERR_INVALID_ARG_VALUE' });
  const outOfRange = (message: string) => ({ message, code: 'ERR_OUT_OF_RANGE' });
  t.same(byId(null).slice(1), [
    protocol('a request is a JSON object {"id":..., "method":..., "params":{...}}'),
    protocol('request id must be a number or a string'),
    protocol('request id must be a number or a string'),
  ]);
  t.same(byId(1), [argValue('unknown method "reboot" (methods: status, pause, resume, stop, reset, snapshot, migrate, gdb, regs, x, stats, stats-reset, trace-start, trace-stop, config)')]);
  t.same(byId(2), [argValue('unknown method undefined (methods: status, pause, resume, stop, reset, snapshot, migrate, gdb, regs, x, stats, stats-reset, trace-start, trace-stop, config)')]);
  t.same(byId(3), [argType('status: params must be an object')]);
  t.same(byId(4), [argValue("status: unknown parameter 'verbose'")]);
  t.same(byId(5), [argValue('snapshot: params.path must be an absolute file path')]);
  t.same(byId(6), [argType('snapshot: params.diff must be a boolean')]);
  t.same(byId(7), [argType('snapshot: params.path must be an absolute file path')]);
  // The address is read by lib/migration's parser, which gives the error its code.
  t.match(byId(8), [{ message: "migration address 'ftp:host:1' must be tcp:HOST:PORT or unix:PATH" }]);
  t.same(byId(9), [argValue('migrate: a unix socket path must be absolute')]);
  t.same(byId(10), [outOfRange('migrate: params.maxIterations must be a positive integer')]);
  t.same(byId(11), [argType('migrate: params.downtimeBudgetMs must be a positive number')]);
  t.same(byId(12), [argValue("migrate: params.onNonConvergence must be 'finish' or 'abort'")]);
  t.same(byId(13), [argValue('migrate: params.token must be a non-empty string')]);
  t.same(byId(14), [argValue("migrate: unknown parameter 'speed'")]);
  t.same(byId(15), [argType('migrate: params.address must be a string (tcp:HOST:PORT or unix:PATH)')]);
  t.same(byId(16), [{ message: 'machine is running, not paused', code: 'ERR_MACHINE_STATE' }], "the machine's refusal keeps its code");
  t.same(byId(17), [outOfRange('autoConverge.throttleMax must be an integer percentage 1..99, got 100')]);
  t.same(byId(18), [argType('autoConverge must be a boolean or an object')]);
  t.same(machine.calls, [], 'nothing reached the machine');
  // The same connection still works.
  client.send('{"id":99,"method":"status"}\n');
  t.same((await client.receive(requests.length + 1)).at(-1), { id: 99, result: { state: 'running', vcpuCount: 2, memoryBytes: 64 * MIB, migration: null } });
  client.socket.destroy();
});

t.test('a request split across writes, and an over-long line', async (t) => {
  const { socketPath } = await serve(t);
  const client = await rawClient(socketPath);
  client.send('{"id":1,"me');
  await new Promise((resolve) => setTimeout(resolve, 20));
  client.send('thod":"status"}\n{"id":2,');
  await new Promise((resolve) => setTimeout(resolve, 20));
  client.send('"method":"pause"}\n');
  t.same(await client.receive(2), [
    { id: 1, result: { state: 'running', vcpuCount: 2, memoryBytes: 64 * MIB, migration: null } },
    { id: 2, result: { state: 'paused' } },
  ]);

  const flood = await rawClient(socketPath);
  flood.send(`{"id":3,"method":"status","params":{"pad":"${'x'.repeat(MAX_REQUEST_LINE_BYTES)}"}}\n`);
  t.same(await flood.receive(1), [{ id: null, error: { message: `request line longer than ${MAX_REQUEST_LINE_BYTES} bytes`, code: 'ERR_API_PROTOCOL' } }]);
  await flood.receive(2);
  t.ok(flood.closed, 'the connection is closed');
  t.same(await callApi(socketPath, 'resume', {}), { state: 'running' }, 'others are still served');
  client.socket.destroy();
});

t.test('several clients at once', async (t) => {
  const { socketPath } = await serve(t);
  const answers = await Promise.all(Array.from({ length: 8 }, () => callApi(socketPath, 'status', {})));
  t.same(answers.map((answer) => answer.state), Array(8).fill('running'));
});

t.test('the client: a machine that hangs up, and bad arguments', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nkvm-api-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const socketPath = path.join(dir, 'rude.sock');
  const rude = net.createServer((socket) => socket.end());
  await new Promise<void>((resolve) => rude.listen(socketPath, resolve));
  await t.rejects(callApi(socketPath, 'status', {}), { name: 'NodeKvmError', code: 'ERR_API_CLOSED', message: `the machine closed the API connection on ${socketPath} before answering status` });
  rude.close();
  const babblerPath = path.join(dir, 'babbler.sock');
  const babbler = net.createServer((socket) => socket.end('hello\n'));
  await new Promise<void>((resolve) => babbler.listen(babblerPath, resolve));
  const babbled = await callApi(babblerPath, 'status', {}).catch((error: unknown) => error);
  t.match(babbled, { name: 'NodeKvmError', code: 'ERR_API_PROTOCOL', message: `API socket ${babblerPath}: the answer is not JSON` });
  t.type((babbled as Error).cause, SyntaxError, "JSON.parse's error is the cause");
  babbler.close();
  await t.rejects(callApi('', 'status', {}), { name: 'TypeError', code: 'ERR_INVALID_ARG_TYPE', message: 'socketPath must be a file path' });
  await t.rejects(startApiServer('', new FakeMachine()), { name: 'TypeError', code: 'ERR_INVALID_ARG_TYPE', message: 'socketPath must be a file path' });
  fs.writeFileSync(path.join(dir, 'file'), 'data');
  await t.rejects(startApiServer(path.join(dir, 'file'), new FakeMachine()), { message: `refusing to replace ${path.join(dir, 'file')}: it exists and is not a socket` });
});

t.test('a client that sends without reading is paused with its replies bounded, others are served meanwhile, and once it reads every request is answered in order', async (t) => {
  const limits = { highWaterBytes: 16 * 1024, maxQueuedReplyBytes: 256 * 1024, maxCallsUnderWay: 16 };
  const { machine, server, socketPath } = await serve(t, limits);
  const REQUESTS = 100_000;
  const REQUESTS_PER_WRITE = 2000;
  const flooder = await rawClient(socketPath, { reading: false });
  t.teardown(() => flooder.socket.destroy());
  // Paused for good: its replies past the high-water mark are never taken while it does not read.
  const stalled = () => {
    const [client] = server.stats().clients;
    return client !== undefined && client.readingPaused && client.queuedReplyBytes >= limits.highWaterBytes;
  };
  let sent = 0;
  while (!stalled() && sent < REQUESTS) {
    flooder.send(statusRequests(sent + 1, REQUESTS_PER_WRITE));
    sent += REQUESTS_PER_WRITE;
    // Its own back-pressure: write on once the socket took the last chunk, unless the server stopped reading.
    await poll(() => !flooder.socket.writableNeedDrain || stalled(), 10_000, 'the socket drains or the server stops reading');
  }
  t.ok(stalled(), 'the server stopped reading from the client');
  const served = machine.statusCalls;
  const [client] = server.stats().clients;
  t.ok(client!.queuedReplyBytes <= limits.maxQueuedReplyBytes, `queued replies ${client!.queuedReplyBytes} bytes, the cap ${limits.maxQueuedReplyBytes}`);
  t.ok(client!.callsUnderWay <= limits.maxCallsUnderWay);
  // Answered so far: what the server holds (under the cap), what the kernel holds in between (its
  // send buffer, wmem_default, plus at most one more skb of half that) and what the client's stream
  // read ahead (its high-water mark and one 64 KiB read).
  const kernelBytes = 1.5 * Number(fs.readFileSync('/proc/sys/net/core/wmem_default', 'utf8'));
  const smallestReplyBytes = JSON.stringify({ id: 1, result: STATUS }).length + 1;
  const servedBound = Math.floor((limits.maxQueuedReplyBytes + kernelBytes + flooder.socket.readableHighWaterMark + 64 * 1024) / smallestReplyBytes);
  t.ok(served <= servedBound, `${served} of ${sent} sent requests served, at most ${servedBound}`);
  t.same(server.stats().droppedClients, 0, 'paused, not dropped');

  // Another client is served meanwhile; the paused one still is not.
  t.same(await callApi(socketPath, 'status', {}), STATUS);
  t.equal(machine.statusCalls, served + 1);

  // It reads now, and sends the rest as its socket takes them.
  flooder.startReading();
  while (sent < REQUESTS) {
    const count = Math.min(REQUESTS_PER_WRITE, REQUESTS - sent);
    if (!flooder.send(statusRequests(sent + 1, count))) await once(flooder.socket, 'drain');
    sent += count;
  }
  await within(flooder.until(() => flooder.messages.length >= REQUESTS), 30_000, 'every answer');
  t.equal(flooder.messages.length, REQUESTS, 'every request answered');
  const wrong = (flooder.messages as { id: number; result: unknown }[]).findIndex((message, index) => message.id !== index + 1 || !isStatus(message.result));
  t.equal(wrong, -1, 'in order, each with the status');
  t.equal(machine.statusCalls, REQUESTS + 1);
  t.same(server.stats().droppedClients, 0);
  flooder.socket.destroy();
});

t.test('a client with more requests waiting than the cap is dropped; its calls under way complete, and another client is served meanwhile', async (t) => {
  const { machine, server, socketPath } = await serve(t, { maxCallsUnderWay: 4, maxPendingRequests: 8 });
  let openSnapshots!: () => void;
  machine.snapshotGate = new Promise((resolve) => (openSnapshots = resolve));
  const other = await rawClient(socketPath);
  other.send('{"id":1,"method":"status"}\n');
  t.same(await other.receive(1), [{ id: 1, result: STATUS }]);

  // In one write: 4 start (and wait at the gate), 8 may wait, the 13th is one too many.
  const greedy = await rawClient(socketPath);
  t.teardown(() => greedy.socket.destroy());
  greedy.send(Array.from({ length: 13 }, (_, index) => `{"id":${index},"method":"snapshot","params":{"path":"/snap/${index}"}}\n`).join(''));
  await within(greedy.until(() => greedy.messages.length > 0), 5000, 'the greedy client is dropped');
  t.ok(greedy.closed, 'the connection is closed');
  t.same(greedy.messages, [], 'dropped without an answer');
  t.equal(server.stats().droppedClients, 1);

  other.send('{"id":2,"method":"status"}\n');
  t.same(await other.receive(2), [{ id: 1, result: STATUS }, { id: 2, result: STATUS }], 'the other client is served meanwhile');
  t.same(machine.calls, [0, 1, 2, 3].map((index) => ['snapshot', `/snap/${index}`, { diff: false }]), 'the calls under way, and no more, reached the machine');
  t.equal(machine.snapshotsWritten, 0);
  openSnapshots();
  other.send('{"id":3,"method":"status"}\n');
  t.same((await other.receive(3))[2], { id: 3, result: STATUS });
  t.equal(machine.snapshotsWritten, 4, 'the calls under way completed on the machine');
  t.same(server.stats(), { clients: [{ queuedReplyBytes: 0, callsUnderWay: 0, pendingRequests: 0, readingPaused: false }], droppedClients: 1 });
  other.socket.destroy();
});

t.test('a migration\'s progress to a client that does not read: the client is dropped past the cap, the migration completes', async (t) => {
  const limits = { highWaterBytes: 16 * 1024, maxQueuedReplyBytes: 64 * 1024 };
  const { machine, server, socketPath } = await serve(t, limits);
  const UPDATES = PROGRESS.length + 5000;
  machine.extraProgressUpdates = UPDATES - PROGRESS.length;
  const mute = await rawClient(socketPath, { reading: false });
  t.teardown(() => mute.socket.destroy());
  mute.send('{"id":"m","method":"migrate","params":{"address":"unix:/run/dest.sock"}}\n');
  t.same(await within(machine.migrationEnded, 10_000, 'the migration ends'), FINAL, 'the migration completed');

  // What reached the client before it was dropped, then the end: no result, most progress lost.
  mute.startReading();
  await within(mute.until(() => mute.messages.some((message) => 'result' in (message as object))), 10_000, 'the connection ends');
  t.ok(mute.closed, 'the connection is closed');
  const progress = mute.messages as { id: string; progress?: MigrationProgress }[];
  t.ok(progress.length < UPDATES, `${progress.length} of ${UPDATES} progress updates arrived`);
  t.equal(progress.findIndex((message) => message.id !== 'm' || message.progress === undefined), -1, 'only progress');
  t.same(progress.slice(0, 3).map((message) => message.progress), PROGRESS);
  t.same(server.stats(), { clients: [], droppedClients: 1 }, 'the client was dropped');
  t.same(await callApi(socketPath, 'status', {}), STATUS, 'no migration under way any more');
  t.same(await callApi(socketPath, 'migrate', { address: 'unix:/run/dest.sock' }), FINAL, 'and a client that reads gets a migration\'s progress and result');
});

t.test('the server\'s limits are checked', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nkvm-api-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const socketPath = path.join(dir, 'api.sock');
  const machine = new FakeMachine();
  // A server that starts anyway is closed again.
  const start = (options: ApiServerOptions) => startApiServer(socketPath, machine, options).then((server) => server.close());
  await t.rejects(start({ highWaterBytes: 0 }), { name: 'RangeError', code: 'ERR_OUT_OF_RANGE', message: 'startApiServer: highWaterBytes must be a positive integer' });
  await t.rejects(start({ maxCallsUnderWay: 1.5 }), { name: 'RangeError', code: 'ERR_OUT_OF_RANGE', message: 'startApiServer: maxCallsUnderWay must be a positive integer' });
  await t.rejects(start({ maxQueuedReplyBytes: 4096, highWaterBytes: 8192 }), {
    name: 'RangeError', code: 'ERR_OUT_OF_RANGE', message: 'startApiServer: maxQueuedReplyBytes (4096) must be at least highWaterBytes (8192)',
  });
  await t.rejects(start({ maxQueue: 1 } as ApiServerOptions), { name: 'RangeError', code: 'ERR_INVALID_ARG_VALUE', message: "startApiServer: unknown option 'maxQueue'" });
  await t.rejects(start({ toString: 1 } as ApiServerOptions), { name: 'RangeError', code: 'ERR_INVALID_ARG_VALUE', message: "startApiServer: unknown option 'toString'" });
  await t.rejects(start(null as unknown as ApiServerOptions), { name: 'TypeError', code: 'ERR_INVALID_ARG_TYPE', message: 'startApiServer: options must be an object' });
  t.notOk(fs.existsSync(socketPath), 'nothing listens');
});
