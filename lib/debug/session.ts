// One debugger's connection: the GDB remote protocol's commands (gdb's manual, "Packets",
// "General Query Packets", "Stop Reply Packets") over a DebugTarget, in all-stop mode with every
// vCPU a thread (thread id = vCPU index + 1). Packets are served one at a time, in order; a
// Ctrl-C is served at once. Whatever the debugger sends, the worst it gets is an error reply:
// a handler that throws answers E01, and the machine runs on.
import type { Socket } from 'node:net';
import type { MachineExit } from '../vmm/machine.js';
import { MAX_PACKET_BYTES, PacketReader, escapeBinary, framePacket, fromHex, parseHexNumber, toHex, unescapeBinary } from './packets.js';
import { archFor, decodeRegister, decodeRegisters, encodeRegister, encodeRegisters, targetDescription, type TargetArch } from './registers.js';
import type { DebugTarget, InsertResult, StopReason } from './target.js';

const SIGINT = 2;
const SIGTRAP = 5;
const SIGABRT = 6;
const SIGKILL = 9;
const SIGSEGV = 11;
/** The longest memory read served in one reply (two hex digits a byte, and room for the framing). */
const MAX_READ_BYTES = (MAX_PACKET_BYTES - 8) / 2;

const hex2 = (value: number) => value.toString(16).padStart(2, '0');
const WATCHPOINT_KINDS = { 2: 'write', 3: 'read', 4: 'access' } as const;
/** The reply to a Z or z packet: OK, or an error gdb shows ("Could not insert ..."). */
const INSERT_REPLIES: Record<string, string> = { inserted: 'OK', true: 'OK', 'no-slot': 'E28', unmapped: 'E14', unsupported: 'E22', false: 'E22' };
/** The stop reply's field for a watchpoint hit (gdb's manual, "Stop Reply Packets"). */
const WATCH_FIELDS = { write: 'watch', read: 'rwatch', access: 'awatch' } as const;

/** The W or X reply for a machine's end: W with run's exit status, X with a signal for a crash. */
export function exitReply(exit: MachineExit): string {
  switch (exit.reason) {
    case 'debug-exit':
      return `W${hex2((((exit.code ?? 0) << 1) | 1) & 0xff)}`;
    case 'hlt':
    case 'reset':
    case 'migrated':
      return 'W00';
    case 'stopped':
      return `X${hex2(SIGKILL)}`;
    case 'shutdown':
      return `X${hex2(SIGSEGV)}`;
    default:
      return `X${hex2(SIGABRT)}`;
  }
}

export class GdbSession {
  readonly #socket: Socket;
  readonly #target: DebugTarget;
  readonly #log: (message: string) => void;
  readonly #reader = new PacketReader();
  #ackMode = true;
  #lastReply: Buffer | null = null;
  #queue: Promise<void> = Promise.resolve();
  #arch: TargetArch | null = null;
  /** The thread `g`/`m` and the like act on (Hg), and the one `c`/`s` do (Hc), as vCPU indices. */
  #registerThread = 0;
  #resumeThread = -1;
  #lastStop = `T${hex2(SIGTRAP)}thread:1;`;
  /** A resume is under way: its stop reply is due. */
  #running = false;
  #closed = false;
  readonly closed: Promise<void>;

  constructor(socket: Socket, target: DebugTarget, log: (message: string) => void) {
    this.#socket = socket;
    this.#target = target;
    this.#log = log;
    let done!: () => void;
    this.closed = new Promise((resolve) => (done = resolve));
    socket.setNoDelay?.(true);
    socket.on('data', (chunk: Buffer) => this.#receive(chunk));
    socket.on('error', () => {});
    const onExit = () => {
      if (!this.#running) this.#socket.end();
    };
    target.machine.once('exit', onExit);
    socket.on('close', () => {
      this.#closed = true;
      target.machine.off('exit', onExit);
      // A debugger gone without detaching leaves the guest running, with no breakpoint behind
      // (after what it sent last: a resume still queued must not arm anything again).
      this.#queue = this.#queue.then(() => this.#target.detach()).catch(() => {}).finally(done);
    });
    // Attaching stops the guest (as QEMU's stub does); `?` then answers where it is.
    this.#enqueue(async () => {
      await target.halt();
      if (target.ended) this.#socket.end();
    });
  }

  /** Ends the connection (the server closes): what is sent goes out first; the guest runs on. */
  close(): void {
    this.#socket.end();
    setTimeout(() => this.#socket.destroy(), 1000).unref();
  }

  #receive(chunk: Buffer): void {
    for (const event of this.#reader.push(chunk)) {
      switch (event.kind) {
        case 'packet':
          if (this.#ackMode) this.#socket.write('+');
          this.#enqueue(() => this.#handle(event.data));
          break;
        case 'bad-checksum':
          if (this.#ackMode) this.#socket.write('-');
          break;
        case 'oversized':
          if (this.#ackMode) this.#socket.write('+');
          this.#enqueue(async () => this.#reply('E22'));
          break;
        case 'interrupt':
          if (this.#running) void this.#target.interrupt(Math.max(this.#resumeThread, 0)).catch(() => {});
          break;
        case 'nak':
          if (this.#ackMode && this.#lastReply) this.#socket.write(this.#lastReply);
          break;
        case 'ack':
          break;
      }
    }
  }

  #enqueue(work: () => Promise<void>): void {
    this.#queue = this.#queue.then(work).catch((error: Error) => {
      this.#log(`gdb: ${error.message}`);
      this.#reply('E01');
    });
  }

  #reply(data: string | Uint8Array): void {
    if (this.#closed) return;
    const packet = framePacket(data);
    this.#lastReply = packet;
    this.#socket.write(packet);
  }

  async #handle(packet: Buffer): Promise<void> {
    if (this.#closed) return;
    const text = packet.toString('latin1');
    const command = text[0];
    const args = text.slice(1);
    switch (command) {
      case '?':
        return this.#reply(this.#target.ended ? 'W00' : this.#lastStop);
      case 'q':
        return this.#query(args);
      case 'Q':
        if (args === 'StartNoAckMode') {
          this.#reply('OK');
          this.#ackMode = false;
          return;
        }
        return this.#reply('');
      case 'H':
        return this.#setThread(args);
      case 'T':
        return this.#reply(this.#threadId(args) === null ? 'E22' : 'OK');
      case 'g':
        return this.#reply(encodeRegisters(await this.#archOf(), await this.#target.registers(this.#registerThread)));
      case 'G':
        return this.#writeRegisters((state, arch) => decodeRegisters(arch, state, args));
      case 'p': {
        const number = parseHexNumber(args);
        const value = number === null ? null : encodeRegister(await this.#archOf(), await this.#target.registers(this.#registerThread), Number(number));
        return this.#reply(value ?? 'E22');
      }
      case 'P': {
        const [numberText, value] = args.split('=');
        const number = parseHexNumber(numberText ?? '');
        if (number === null || value === undefined) return this.#reply('E22');
        return this.#writeRegisters((state, arch) => decodeRegister(arch, state, Number(number), value));
      }
      case 'm':
        return this.#readMemory(args);
      case 'M':
      case 'X':
        return this.#writeMemory(command, packet);
      case 'c':
      case 's':
      case 'C':
      case 'S':
        return this.#resumeSimple(command, args);
      case 'v':
        return this.#verbose(args);
      case 'Z':
      case 'z':
        return this.#breakpoint(command === 'Z', args);
      case 'D':
        await this.#target.detach();
        this.#reply('OK');
        this.#socket.end();
        return;
      case 'k':
        await this.#kill();
        return;
      default:
        return this.#reply('');
    }
  }

  async #query(args: string): Promise<void> {
    if (args.startsWith('Supported')) {
      // swbreak only where breakpoints are int3s: a Z0 in a debug register stops as a hwbreak.
      const swbreak = this.#target.support.softwareBreakpoints ? 'swbreak+;' : '';
      return this.#reply(`PacketSize=${MAX_PACKET_BYTES.toString(16)};qXfer:features:read+;${swbreak}hwbreak+;QStartNoAckMode+;vContSupported+`);
    }
    if (args.startsWith('Xfer:features:read:')) {
      const match = /^Xfer:features:read:([^:]*):([0-9a-fA-F]+),([0-9a-fA-F]+)$/.exec(args);
      if (!match || match[1] !== 'target.xml') return this.#reply('E00');
      const xml = Buffer.from(targetDescription(await this.#archOf()));
      const offset = parseInt(match[2]!, 16);
      const length = Math.min(parseInt(match[3]!, 16), MAX_READ_BYTES);
      const chunk = xml.subarray(offset, offset + length);
      return this.#reply(Buffer.concat([Buffer.from(offset + length >= xml.length ? 'l' : 'm'), escapeBinary(chunk)]));
    }
    if (args === 'Attached') return this.#reply('1');
    if (args === 'C') return this.#reply(`QC${(this.#registerThread + 1).toString(16)}`);
    if (args === 'fThreadInfo') return this.#reply(`m${Array.from({ length: this.#target.vcpuCount }, (_, i) => (i + 1).toString(16)).join(',')}`);
    if (args === 'sThreadInfo') return this.#reply('l');
    if (args.startsWith('ThreadExtraInfo,')) {
      const vcpu = this.#threadId(args.slice('ThreadExtraInfo,'.length));
      return this.#reply(vcpu === null || vcpu < 0 ? 'E22' : toHex(Buffer.from(`vCPU ${vcpu}`)));
    }
    if (args.startsWith('Symbol')) return this.#reply('OK');
    return this.#reply('');
  }

  /** A thread id as a vCPU index: -1 for "all" or "any" (-1, 0), null for none of ours. */
  #threadId(text: string): number | null {
    if (text === '-1' || text === '0') return -1;
    const id = parseHexNumber(text);
    if (id === null || id < 1n || id > BigInt(this.#target.vcpuCount)) return null;
    return Number(id) - 1;
  }

  #setThread(args: string): void {
    const vcpu = this.#threadId(args.slice(1));
    if (vcpu === null || (args[0] !== 'g' && args[0] !== 'c')) return this.#reply('E22');
    if (args[0] === 'g') this.#registerThread = Math.max(vcpu, 0);
    else this.#resumeThread = vcpu;
    this.#reply('OK');
  }

  async #archOf(): Promise<TargetArch> {
    // Picked once a connection, from the vCPU's mode then (gdb reads the description once).
    this.#arch ??= archFor((await this.#target.registers(0)).sregs);
    return this.#arch;
  }

  async #writeRegisters(apply: (state: Parameters<typeof encodeRegisters>[1], arch: TargetArch) => boolean): Promise<void> {
    const arch = await this.#archOf();
    const current = await this.#target.registers(this.#registerThread);
    const state = structuredClone(current);
    if (!apply(state, arch)) return this.#reply('E22');
    await this.#target.setRegisters(this.#registerThread, state);
    this.#reply('OK');
  }

  async #readMemory(args: string): Promise<void> {
    const [addressText, lengthText] = args.split(',');
    const address = parseHexNumber(addressText ?? '');
    const length = parseHexNumber(lengthText ?? '');
    if (address === null || length === null) return this.#reply('E22');
    const bytes = await this.#target.readMemory(this.#registerThread, address, Math.min(Number(length), MAX_READ_BYTES));
    this.#reply(bytes ? toHex(bytes) : 'E14');
  }

  /** M addr,len:hex and X addr,len:binary. */
  async #writeMemory(command: 'M' | 'X', packet: Buffer): Promise<void> {
    const colon = packet.indexOf(0x3a);
    if (colon < 0) return this.#reply('E22');
    const [addressText, lengthText] = packet.subarray(1, colon).toString('latin1').split(',');
    const address = parseHexNumber(addressText ?? '');
    const length = parseHexNumber(lengthText ?? '');
    const payload = packet.subarray(colon + 1);
    const data = command === 'M' ? fromHex(payload.toString('latin1')) : unescapeBinary(payload);
    if (address === null || length === null || !data || BigInt(data.length) !== length) return this.#reply('E22');
    if (data.length === 0) return this.#reply('OK');
    this.#reply((await this.#target.writeMemory(this.#registerThread, address, data)) ? 'OK' : 'E14');
  }

  /** Z/z TYPE,ADDR,KIND: 0 and 1 breakpoints, 2-4 watchpoints of KIND bytes (write, read, access). */
  async #breakpoint(insert: boolean, args: string): Promise<void> {
    const [type, addressText, kindText] = args.split(',');
    const address = parseHexNumber(addressText ?? '');
    if (address === null) return this.#reply('E22');
    let result: InsertResult | boolean;
    if (type === '0' || type === '1') {
      const kind = type === '0' ? 'software' : 'hardware';
      result = insert ? await this.#target.insertBreakpoint(address, kind, this.#registerThread) : await this.#target.removeBreakpoint(address, kind);
    } else if (type === '2' || type === '3' || type === '4') {
      const length = parseHexNumber(kindText ?? '');
      if (length === null || length > 8n) return this.#reply('E22');
      const kind = WATCHPOINT_KINDS[type];
      // Refused where the host never triggers data breakpoints (README, Debugging with gdb):
      // gdb then says it could not insert the watchpoint.
      result = insert ? this.#target.insertWatchpoint(address, Number(length), kind) : this.#target.removeWatchpoint(address, Number(length), kind);
    } else {
      return this.#reply('');
    }
    this.#reply(INSERT_REPLIES[String(result)] ?? 'E22');
  }

  async #verbose(args: string): Promise<void> {
    if (args === 'Cont?') return this.#reply('vCont;c;C;s;S');
    if (args.startsWith('Cont;')) {
      const step = new Set<number>();
      const decided = new Set<number>();
      // The leftmost action naming a thread wins; one with no thread applies to the rest.
      for (const action of args.slice('Cont;'.length).split(';')) {
        const [what, threadText] = action.split(':');
        const verb = what?.[0];
        if (verb !== 'c' && verb !== 's' && verb !== 'C' && verb !== 'S') return this.#reply('E22');
        const vcpus = threadText === undefined ? [...Array(this.#target.vcpuCount).keys()] : [this.#threadId(threadText)];
        for (const vcpu of vcpus) {
          if (vcpu === null) return this.#reply('E22');
          const targets = vcpu === -1 ? [...Array(this.#target.vcpuCount).keys()] : [vcpu];
          for (const id of targets) {
            if (decided.has(id)) continue;
            decided.add(id);
            if (verb === 's' || verb === 'S') step.add(id);
          }
        }
      }
      return this.#resume(step);
    }
    if (args.startsWith('Kill')) {
      await this.#kill('OK');
      return;
    }
    // vMustReplyEmpty and whatever else we do not know.
    return this.#reply('');
  }

  async #resumeSimple(command: string, args: string): Promise<void> {
    // c [addr], s [addr], C sig[;addr], S sig[;addr]: the signal is dropped (nothing to deliver it to).
    const addressText = command === 'c' || command === 's' ? args : args.split(';')[1] ?? '';
    const thread = this.#resumeThread >= 0 ? this.#resumeThread : this.#registerThread;
    if (addressText !== '') {
      const address = parseHexNumber(addressText);
      if (address === null) return this.#reply('E22');
      const state = structuredClone(await this.#target.registers(thread));
      state.regs.rip = address;
      await this.#target.setRegisters(thread, state);
    }
    return this.#resume(command === 's' || command === 'S' ? new Set([thread]) : new Set());
  }

  async #resume(step: Set<number>): Promise<void> {
    if (this.#target.ended) return this.#reply('W00');
    this.#running = true;
    this.#target.onStop((reason) => this.#stopped(reason));
    try {
      await this.#target.resume({ step });
    } catch (error) {
      this.#running = false;
      this.#target.onStop(null);
      throw error;
    }
  }

  #stopped(reason: StopReason): void {
    this.#running = false;
    if (reason.kind === 'exit') {
      this.#reply(exitReply(reason.exit));
      this.#socket.end();
      return;
    }
    const thread = `thread:${(reason.vcpu + 1).toString(16)};`;
    if (reason.kind === 'breakpoint') {
      this.#lastStop = `T${hex2(SIGTRAP)}${thread}${reason.breakpoint === 'software' ? 'swbreak' : 'hwbreak'}:;`;
    } else if (reason.kind === 'watchpoint') {
      this.#lastStop = `T${hex2(SIGTRAP)}${thread}${WATCH_FIELDS[reason.watchpoint]}:${reason.address.toString(16)};`;
    } else {
      this.#lastStop = `T${hex2(reason.kind === 'interrupt' ? SIGINT : SIGTRAP)}${thread}`;
    }
    this.#registerThread = reason.vcpu;
    this.#reply(this.#lastStop);
  }

  /** Ends the machine; vKill is answered (`reply`), k is not. */
  async #kill(reply?: string): Promise<void> {
    // Ending first: the detach then lets go of a machine that never runs again.
    const stopped = this.#target.machine.stop();
    await this.#target.detach();
    if (reply) this.#reply(reply);
    this.#socket.end();
    await stopped;
  }
}
