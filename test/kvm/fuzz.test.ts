// Random calls with hostile arguments over a small pool of live and closed handles. The process
// must survive, and every error must be a KvmError, TypeError or RangeError: anything else is a
// bug, reported with the call, its arguments and the seed that replays it (FUZZ_SEED=<seed>).
//
// Guest code never runs: a vCPU whose state the fuzzer scrambled could loop or block forever, so
// run() is only called right after kick(), which makes KVM_RUN return before entering the guest.
import { spawnSync } from 'node:child_process';
import { closeSync, existsSync, mkdtempSync, openSync, readdirSync, readFileSync, rmSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { inspect } from 'node:util';
import {
  Cap, EventFd, ExitReason, GuestMemory, harvestDirtyRing, kickVcpu, Kvm, KvmError, Vcpu, Vm,
} from '../../lib/index.js';
import { native, ops } from '../../lib/kvm/native.js';
import { noKvm } from '../helpers/kvm.js';

const CALLS = 20000;
// FUZZ_TRACE=1 adds each call's arguments to the log of calls (shown when the child dies).
const trace = process.env.FUZZ_TRACE === '1';
const seed = process.env.FUZZ_SEED !== undefined ? Number(process.env.FUZZ_SEED) >>> 0 : Math.floor(Math.random() * 2 ** 32);

/** mulberry32: a tiny seeded PRNG, uniform in [0, 1). */
function mulberry32(state: number): () => number {
  return () => {
    state = (state + 0x6d2b79f5) | 0;
    let x = Math.imul(state ^ (state >>> 15), 1 | state);
    x = (x + Math.imul(x ^ (x >>> 7), 61 | x)) ^ x;
    return ((x ^ (x >>> 14)) >>> 0) / 4294967296;
  };
}
const random = mulberry32(seed);
const int = (n: number) => Math.floor(random() * n);
const chance = (p: number) => random() < p;
const pick = <T>(items: readonly T[]): T => items[int(items.length)]!;

const turn = () => new Promise<void>((resolve) => setImmediate(resolve));
const MiB = 1 << 20;

// ---- The pool of handles, live and closed ----

type Kind = 'kvm' | 'vm' | 'vcpu' | 'memory' | 'eventfd';
type Handle = Kvm | Vm | Vcpu | GuestMemory | EventFd;
const OPEN_LIMIT: Record<Kind, number> = { kvm: 2, vm: 4, vcpu: 8, memory: 6, eventfd: 6 };
const CLOSED_KEPT = 3;
const pool: Record<Kind, Handle[]> = { kvm: [], vm: [], vcpu: [], memory: [], eventfd: [] };
const everything: Handle[] = [];

function kindOf(value: unknown): Kind | null {
  if (value instanceof Kvm) return 'kvm';
  if (value instanceof Vm) return 'vm';
  if (value instanceof Vcpu) return 'vcpu';
  if (value instanceof GuestMemory) return 'memory';
  if (value instanceof EventFd) return 'eventfd';
  return null;
}

/** Adds a handle the fuzzer obtained; closes the oldest open one of its kind beyond the limit. */
function adopt(handle: Handle): void {
  const kind = kindOf(handle)!;
  const list = pool[kind];
  list.push(handle);
  everything.push(handle);
  const open = list.filter((h) => !h.closed);
  if (open.length > OPEN_LIMIT[kind]) open[0]!.close();
  const closed = list.filter((h) => h.closed);
  for (const stale of closed.slice(0, Math.max(0, closed.length - CLOSED_KEPT))) list.splice(list.indexOf(stale), 1);
}

const openOf = <K extends Kind>(kind: K) => pool[kind].filter((h) => !h.closed) as Handle[];

function replenish(): void {
  if (openOf('kvm').length === 0) adopt(Kvm.open());
  const kvm = pick(openOf('kvm')) as Kvm;
  if (openOf('vm').length === 0) adopt(kvm.createVm());
  if (openOf('memory').length === 0) adopt(GuestMemory.create(pick([4096, 65536, MiB]), { backing: pick(['anonymous', 'memfd'] as const) }));
  if (openOf('eventfd').length === 0) adopt(EventFd.create());
  if (openOf('vcpu').length === 0) {
    const vm = pick(openOf('vm')) as Vm;
    for (let id = 0; id < 64; id++) {
      try {
        adopt(vm.createVcpu(id));
        break;
      } catch (error) {
        if (!(error instanceof KvmError)) throw error;
      }
    }
  }
}

// ---- Argument generators ----

// Keys the API reads from option and struct objects. `nonBlocking` is left out: a blocking
// eventfd would make read() wait forever.
const KEYS = [
  'slot', 'guestPhysAddr', 'memory', 'offset', 'size', 'flags', 'logDirtyPages', 'readonly', 'addr', 'len',
  'datamatch', 'pio', 'gsi', 'type', 'irqchip', 'pin', 'addressLo', 'addressHi', 'data', 'devid', 'index',
  'function', 'eax', 'rip', 'regs', 'chipId', 'chip', 'mpState', 'debugreg', 'singlestep', 'guestMemory',
  'vcpuKick', 'initialValue', 'semaphore', 'backing', 'hugepages', 'speakerDummy', 'cs', 'limit', 'xcr', 'value',
];

function primitive(): unknown {
  return pick<() => unknown>([
    () => undefined, () => null, () => -1, () => 0, () => 1, () => 2 ** 31, () => 2 ** 32, () => 2 ** 53, () => NaN,
    () => Infinity, () => -Infinity, () => 1.5, () => -0, () => '1', () => '', () => 'memfd', () => true, () => false,
    () => 1n, () => -1n, () => 2n ** 64n, () => 2n ** 64n - 1n, () => 2n ** 63n, () => Symbol('fuzz'),
    () => int(64), () => int(256) * 4096,
  ])();
}

function hostile(depth = 0): unknown {
  return pick<() => unknown>([
    primitive, primitive, primitive,
    () => ({}), () => [], () => [0], () => () => 0,
    () => new Uint8Array(0), () => new Uint8Array(4096), () => new Uint8Array(new SharedArrayBuffer(144)),
    () => new Float64Array(4), () => new ArrayBuffer(8),
    () => anyHandle(),
    () => (depth < 1 ? randomObject(depth + 1) : {}),
    () => (depth < 1 ? mutated(pick(samples)()) : null),
  ])();
}

function randomObject(depth: number): Record<string, unknown> {
  const object: Record<string, unknown> = {};
  for (let i = int(4); i > 0; i--) object[pick(KEYS)] = hostile(depth);
  return object;
}

/** A live or closed handle, its fd, or one of its cross-thread handles. */
function anyHandle(): unknown {
  const kind = pick(Object.keys(pool) as Kind[]);
  const handle = pool[kind].length ? pick(pool[kind]) : undefined;
  if (!handle || chance(0.6)) return handle;
  if (handle instanceof Vm || handle instanceof Vcpu || handle instanceof EventFd) return handle.fd;
  if (handle instanceof GuestMemory) return tryGet(() => handle.handle) ?? handle.buffer;
  return handle;
}

const tryGet = <T>(fn: () => T): T | undefined => {
  try {
    return fn();
  } catch {
    return undefined;
  }
};

function clone(value: unknown): unknown {
  if (value instanceof Uint8Array) return value.slice();
  if (Array.isArray(value)) return value.map(clone);
  if (value !== null && typeof value === 'object' && Object.getPrototypeOf(value) === Object.prototype) {
    return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, clone(v)]));
  }
  return value;
}

/** Paths to every leaf of a plain structure (arrays and plain objects are inner nodes). */
function leaves(value: unknown, path: (string | number)[] = [], out: (string | number)[][] = []): (string | number)[][] {
  if (Array.isArray(value)) value.forEach((v, i) => leaves(v, [...path, i], out));
  else if (value !== null && typeof value === 'object' && Object.getPrototypeOf(value) === Object.prototype) {
    for (const [k, v] of Object.entries(value)) leaves(v, [...path, k], out);
  } else out.push(path);
  return out;
}

/** A copy of a valid structure with up to three fields replaced, deleted or nudged. */
function mutated(sample: unknown): unknown {
  const copy = clone(sample);
  if (chance(0.2)) return copy;
  const paths = leaves(copy);
  for (let n = 1 + int(3); n > 0 && paths.length; n--) {
    const path = pick(paths);
    if (path.length === 0) return hostile(1);
    let parent = copy as Record<string | number, unknown>;
    for (const key of path.slice(0, -1)) parent = parent[key] as Record<string | number, unknown>;
    const key = path[path.length - 1]!;
    const old = parent[key];
    const roll = int(4);
    if (roll === 0) delete parent[key];
    else if (roll === 1 && typeof old === 'bigint') parent[key] = old ^ (1n << BigInt(int(64)));
    else if (roll === 1 && typeof old === 'number') parent[key] = old ^ (1 << int(31));
    else if (roll === 2 && Array.isArray(parent)) parent.push(hostile(1));
    else parent[key] = hostile(1);
  }
  return copy;
}

// Valid structures taken from a real vCPU and VM at setup; the fuzzer mutates them.
let samples: (() => unknown)[] = [];
let featureMsrs: number[] = [];
const CAPS = Object.values(Cap) as number[];

const cap = () => (chance(0.8) ? pick(CAPS) : int(300));
const eventfdArg = () => (chance(0.8) && openOf('eventfd').length ? pick(openOf('eventfd')) : anyHandle());
const memoryArg = () => (chance(0.8) && openOf('memory').length ? pick(openOf('memory')) : anyHandle());
const region = () => mutatedMaybe({
  slot: int(4), guestPhysAddr: int(64) * 4096, memory: memoryArg(),
  ...(chance(0.5) ? { size: pick([4096, 65536, MiB]) } : {}),
  ...(chance(0.5) ? { offset: pick([0, 4096]) } : {}),
  ...(chance(0.5) ? { flags: { logDirtyPages: chance(0.5), readonly: chance(0.2) } } : {}),
});
const ioeventfdOptions = () => mutatedMaybe({ addr: pick([0x80, 0x3f8, 0x1000, 0xfee00000]), len: pick([0, 1, 2, 4, 8]), pio: chance(0.5), ...(chance(0.3) ? { datamatch: int(256) } : {}) });
const mutatedMaybe = (value: unknown) => (chance(0.3) ? mutated(value) : value);

// ---- The calls ----

interface Method {
  kind: Kind | 'static' | 'native';
  name: string;
  /** Arguments that are valid or nearly so; without it, only hostile ones are used. */
  plausible?: () => unknown[];
  /** For static and native calls, and for calls that need more than `target[name](...args)`. */
  call?: (target: Handle | null, args: unknown[]) => unknown;
}

const none = () => [];
const methods: Method[] = [
  ...['apiVersion', 'vcpuMmapSize', 'maxVcpus', 'nrMemslots', 'getSupportedCpuid', 'getEmulatedCpuid', 'getMsrIndexList', 'getMsrFeatureIndexList', 'close']
    .map((name) => ({ kind: 'kvm' as const, name, plausible: none })),
  { kind: 'kvm', name: 'checkExtension', plausible: () => [cap()] },
  { kind: 'kvm', name: 'getMsrs', plausible: () => [featureMsrs.filter(() => chance(0.3))] },
  { kind: 'kvm', name: 'createVm', plausible: () => (chance(0.5) ? [] : [int(3)]) },

  ...['createIrqChip', 'getPit2', 'getClock', 'resetDirtyRings', 'owning', 'close']
    .map((name) => ({ kind: 'vm' as const, name, plausible: none })),
  { kind: 'vm', name: 'checkExtension', plausible: () => [cap()] },
  { kind: 'vm', name: 'enableCap', plausible: () => [cap(), Array.from({ length: int(5) }, () => (chance(0.7) ? int(4) : primitive())), chance(0.8) ? 0 : primitive()] },
  { kind: 'vm', name: 'setUserMemoryRegion', plausible: () => [region()] },
  { kind: 'vm', name: 'deleteUserMemoryRegion', plausible: () => [int(4)] },
  { kind: 'vm', name: 'createVcpu', plausible: () => [int(4)] },
  { kind: 'vm', name: 'setBootCpuId', plausible: () => [int(4)] },
  { kind: 'vm', name: 'createPit2', plausible: () => [chance(0.5) ? { speakerDummy: chance(0.5) } : int(2)] },
  { kind: 'vm', name: 'setPit2', plausible: () => [mutated(samples[0]!())] },
  { kind: 'vm', name: 'getIrqChip', plausible: () => [int(3)] },
  { kind: 'vm', name: 'setIrqChip', plausible: () => [mutated(samples[1]!())] },
  { kind: 'vm', name: 'setIrqLine', plausible: () => [int(24), int(2)] },
  { kind: 'vm', name: 'signalMsi', plausible: () => [mutatedMaybe({ addressLo: 0xfee00000, data: 0x30 + int(16) })] },
  { kind: 'vm', name: 'setGsiRouting', plausible: () => [mutatedMaybe([{ gsi: int(24), type: 'irqchip', irqchip: int(3), pin: int(24) }, { gsi: 24 + int(8), type: 'msi', addressLo: 0xfee00000, data: 0x40 }])] },
  { kind: 'vm', name: 'registerIrqfd', plausible: () => [eventfdArg(), int(24), ...(chance(0.3) ? [eventfdArg()] : [])] },
  { kind: 'vm', name: 'unregisterIrqfd', plausible: () => [eventfdArg(), int(24)] },
  { kind: 'vm', name: 'registerIoeventfd', plausible: () => [ioeventfdOptions(), eventfdArg()] },
  { kind: 'vm', name: 'unregisterIoeventfd', plausible: () => [ioeventfdOptions(), eventfdArg()] },
  { kind: 'vm', name: 'setTssAddr', plausible: () => [chance(0.5) ? 0xfffbd000 : int(2 ** 20) * 4096] },
  { kind: 'vm', name: 'setIdentityMapAddr', plausible: () => [0xfffbc000] },
  { kind: 'vm', name: 'setClock', plausible: () => [mutated(samples[2]!())] },
  { kind: 'vm', name: 'getDirtyLog', plausible: () => [int(4), ...(chance(0.3) ? [new Uint8Array(pick([0, 8, 32, 64]))] : [])] },
  { kind: 'vm', name: 'clearDirtyLog', plausible: () => [int(4), int(2) * 64, pick([0, 1, 16, 64, 256]), ...(chance(0.3) ? [new Uint8Array(pick([0, 8, 32]))] : [])] },
  { kind: 'vm', name: 'enableDirtyRing', plausible: () => [pick([4096, 65536, MiB, 3 * 4096])] },

  ...['exit', 'kick', 'kickHandle', 'getRegs', 'getSregs', 'getFpu', 'getCpuid2', 'getLapic', 'getXsave', 'getXcrs', 'getVcpuEvents',
    'getMpState', 'getDebugRegs', 'getTscKhz', 'getNestedState', 'kvmclockCtrl', 'nmi', 'smi', 'close']
    .map((name) => ({ kind: 'vcpu' as const, name, plausible: none })),
  { kind: 'vcpu', name: 'setRegs', plausible: () => [mutated(samples[3]!())] },
  { kind: 'vcpu', name: 'setSregs', plausible: () => [mutated(samples[4]!())] },
  { kind: 'vcpu', name: 'setFpu', plausible: () => [mutated(samples[5]!())] },
  { kind: 'vcpu', name: 'setLapic', plausible: () => [mutated(samples[6]!())] },
  { kind: 'vcpu', name: 'setVcpuEvents', plausible: () => [mutated(samples[7]!())] },
  { kind: 'vcpu', name: 'setDebugRegs', plausible: () => [mutated(samples[8]!())] },
  { kind: 'vcpu', name: 'setXcrs', plausible: () => [mutated(samples[9]!())] },
  { kind: 'vcpu', name: 'setCpuid2', plausible: () => [mutated(samples[10]!())] },
  { kind: 'vcpu', name: 'setXsave', plausible: () => [chance(0.5) ? (samples[11]!() as Uint8Array) : new Uint8Array(pick([0, 512, 4096, 8192]))] },
  { kind: 'vcpu', name: 'setNestedState', plausible: () => [samples[12]!()] },
  { kind: 'vcpu', name: 'getMsrs', plausible: () => [[0x10, 0x174, 0x1b, int(2 ** 32)].filter(() => chance(0.5))] },
  { kind: 'vcpu', name: 'setMsrs', plausible: () => [mutated([{ index: 0x174, data: BigInt(int(65536)) }, { index: 0x10, data: 0n }])] },
  { kind: 'vcpu', name: 'setMpState', plausible: () => [int(6)] },
  { kind: 'vcpu', name: 'setTscKhz', plausible: () => [chance(0.5) ? 1000000 : int(2 ** 32)] },
  { kind: 'vcpu', name: 'translate', plausible: () => [int(2 ** 32)] },
  { kind: 'vcpu', name: 'setGuestDebug', plausible: () => [chance(0.3) ? null : mutatedMaybe({ singlestep: chance(0.5), softwareBreakpoints: chance(0.5), debugreg: [0n, 0n, 0n, 0n, 0n, 0n, 0xffff0ff0n, 0x400n] })] },
  { kind: 'vcpu', name: 'interrupt', plausible: () => [int(256)] },
  { kind: 'vcpu', name: 'enableCap', plausible: () => [cap(), Array.from({ length: int(5) }, () => int(4))] },
  { kind: 'vcpu', name: 'checkExtension', plausible: () => [cap()] },
  { kind: 'vcpu', name: 'harvestDirtyRing', plausible: () => [new Float64Array(pick([0, 2, 64]))] },
  {
    kind: 'vcpu', name: 'kick+run',
    call: (vcpu) => {
      (vcpu as Vcpu).kick();
      // kick() set kvm_run.immediate_exit: KVM_RUN returns before entering the guest.
      const reason = (vcpu as Vcpu).run();
      if (reason !== ExitReason.Intr) throw new FuzzViolation(`run() after kick() returned exit ${reason}, not Intr`);
      return reason;
    },
  },

  ...['handle', 'nativeId', 'close'].map((name) => ({ kind: 'memory' as const, name, plausible: none })),
  { kind: 'memory', name: 'bytes', plausible: () => [int(8) * 4096, int(4097)] },
  { kind: 'memory', name: 'write', plausible: () => [int(16) * 4096, new Uint8Array(int(4097))] },
  { kind: 'memory', name: 'fill', plausible: () => [int(16) * 4096, int(8193), int(300)] },

  { kind: 'eventfd', name: 'read', plausible: none },
  { kind: 'eventfd', name: 'close', plausible: none },
  { kind: 'eventfd', name: 'write', plausible: () => [chance(0.5) ? int(1000) : BigInt(int(1000))] },

  { kind: 'static', name: 'Kvm.open', plausible: none, call: (_, args) => Kvm.open(...(args as [string])) },
  { kind: 'static', name: 'Vm.fromFd', plausible: () => [pool.vm.length && chance(0.8) ? (pick(pool.vm) as Vm).fd : int(64)], call: (_, args) => Vm.fromFd(...(args as [number])) },
  {
    kind: 'static', name: 'GuestMemory.create',
    plausible: () => [pick([4096, 65536, MiB, 4097, 0]), mutatedMaybe({ backing: pick(['anonymous', 'memfd']), hugepages: chance(0.5), mergeable: chance(0.2) })],
    call: (_, args) => GuestMemory.create(...(args as [number])),
  },
  {
    kind: 'static', name: 'GuestMemory.attach',
    plausible: () => [pool.memory.length ? tryGet(() => (pick(pool.memory) as GuestMemory).handle) ?? { guestMemory: int(100) } : { guestMemory: int(100) }],
    call: (_, args) => GuestMemory.attach(...(args as [{ guestMemory: number }])),
  },
  { kind: 'static', name: 'EventFd.create', plausible: () => [mutatedMaybe({ initialValue: int(10), semaphore: chance(0.5) })], call: (_, args) => EventFd.create(...(args as [])) },
  { kind: 'static', name: 'kickVcpu', plausible: () => [kickHandleArg()], call: (_, args) => kickVcpu(...(args as [{ vcpuKick: number }])) },
  { kind: 'static', name: 'harvestDirtyRing', plausible: () => [kickHandleArg(), new Float64Array(8)], call: (_, args) => harvestDirtyRing(...(args as [{ vcpuKick: number }, Float64Array])) },

  // The raw addon, below the TypeScript checks. Never native.run(): it would enter the guest.
  { kind: 'native', name: 'ioctl', plausible: () => [nativeHandle(), pick(Object.values(ops)), rawArgument()], call: (_, args) => native.ioctl(...(args as [number, number])) },
  { kind: 'native', name: 'detachBuffer', plausible: () => [bufferArg()], call: (_, args) => native.detachBuffer(...(args as [ArrayBuffer])) },
  {
    kind: 'native', name: 'setUserMemoryRegion',
    plausible: () => [nativeHandle(), int(4), int(4), int(64) * 4096, memoryIdArg(), pick([0, 4096]), pick([0, 4096, MiB])],
    call: (_, args) => native.setUserMemoryRegion(...(args as [number, number, number, number, number, number, number])),
  },
  { kind: 'native', name: 'getDirtyLog', plausible: () => [nativeHandle(), int(4)], call: (_, args) => native.getDirtyLog(...(args as [number, number])) },
  { kind: 'native', name: 'clearDirtyLog', plausible: () => [nativeHandle(), int(4), int(2) * 64, pick([0, 64, 256])], call: (_, args) => native.clearDirtyLog(...(args as [number, number, number, number])) },
  {
    kind: 'native', name: 'memoryAttach', plausible: () => [memoryIdArg()],
    call: (_, args) => {
      const [buffer] = native.memoryAttach(...(args as [number]));
      // A raw view has no GuestMemory to close it: drop it now rather than at a garbage collection.
      native.detachBuffer(buffer);
    },
  },
  {
    kind: 'native', name: 'memoryWrite', plausible: () => [memoryIdArg(), pick([0, 4096, MiB - 1, MiB, 2 ** 53]), new Uint8Array(int(8193))],
    call: (_, args) => native.memoryWrite(...(args as [number, number, Uint8Array])),
  },
  {
    kind: 'native', name: 'memoryFill', plausible: () => [memoryIdArg(), pick([0, 4096, MiB - 1, MiB]), int(8193), int(300)],
    call: (_, args) => native.memoryFill(...(args as [number, number, number, number])),
  },
  { kind: 'native', name: 'kick', plausible: () => [nativeHandle()], call: (_, args) => native.kick(...(args as [number])) },
  { kind: 'native', name: 'harvestDirtyRing', plausible: () => [nativeHandle(), new Float64Array(8)], call: (_, args) => native.harvestDirtyRing(...(args as [number, Float64Array])) },
];

class FuzzViolation extends Error {}

function kickHandleArg(): unknown {
  const vcpu = pool.vcpu.length ? (pick(pool.vcpu) as Vcpu) : undefined;
  return (vcpu && tryGet(() => vcpu.kickHandle)) ?? { vcpuKick: int(1000) };
}

let systemHandle = 0;
/** A native handle id: a system, VM or vCPU handle, live or closed, or a number never issued. */
function nativeHandle(): unknown {
  const roll = int(4);
  if (roll === 0) return systemHandle;
  if (roll === 1 && pool.vm.length) return tryGet(() => native.vmFromFd((pick(pool.vm) as Vm).fd)) ?? int(1000);
  if (roll === 2) {
    const handle = kickHandleArg() as { vcpuKick: number };
    return handle.vcpuKick;
  }
  return chance(0.5) ? int(100000) : primitive();
}

function memoryIdArg(): unknown {
  const memory = pool.memory.length ? (pick(pool.memory) as GuestMemory) : undefined;
  return (memory && tryGet(() => memory.nativeId)) ?? int(1000);
}

function bufferArg(): unknown {
  const handle = anyHandle();
  if (handle instanceof GuestMemory) return handle.buffer;
  if (handle instanceof Vcpu) return handle.kvmRun.view.buffer;
  return hostile();
}

/** An ioctl argument: random bytes of a size some KVM struct has, or a value. */
function rawArgument(): unknown {
  if (chance(0.3)) return primitive();
  const bytes = new Uint8Array(pick([0, 4, 8, 16, 24, 32, 64, 72, 104, 112, 128, 144, 312, 392, 416, 520, 1024, 4096, 8192]));
  for (let i = 0; i < bytes.length; i++) if (chance(0.1)) bytes[i] = int(256);
  // Keep counted arrays' counts small and plausible.
  if (bytes.length >= 4 && chance(0.7)) new DataView(bytes.buffer).setUint32(0, int(8), true);
  return bytes;
}

function format(value: unknown): string {
  try {
    return inspect(value, { depth: 2, breakLength: Infinity, compact: true, maxArrayLength: 8, maxStringLength: 40 });
  } catch {
    // inspect() itself throws on a DataView over a detached buffer.
    return `<${Object.prototype.toString.call(value)}>`;
  }
}

interface FuzzResult {
  elapsedMs: number;
  tally: Record<string, number>;
  failures: string[];
  leaks: { handles: [number, number]; fds: [number, number]; guestMappings: [number, number] };
}

/** The fuzzing loop itself, run in a child process. Each call is logged to `traceFd` first. */
async function fuzz(traceFd: number): Promise<FuzzResult> {
  await turn();
  const fdsBefore = readdirSync('/proc/self/fd').length;
  const handlesBefore = native.handleCount();
  const mappingsBefore = GuestMemory.stats().mappings;

  const kvm = Kvm.open();
  systemHandle = native.openSystem('/dev/kvm');
  featureMsrs = kvm.getMsrFeatureIndexList();
  const vm = kvm.createVm();
  vm.createIrqChip();
  vm.createPit2();
  const vcpu = vm.createVcpu(0);
  const cpuid = kvm.getSupportedCpuid();
  vcpu.setCpuid2(cpuid);
  const nested = new Uint8Array(128);
  new DataView(nested.buffer).setUint32(4, 128, true);
  const fixed = [
    vm.getPit2(), vm.getIrqChip(pick([0, 1, 2])), vm.getClock(), vcpu.getRegs(), vcpu.getSregs(), vcpu.getFpu(), vcpu.getLapic(),
    vcpu.getVcpuEvents(), vcpu.getDebugRegs(), vcpu.getXcrs(), cpuid.slice(0, 1 + int(cpuid.length)), vcpu.getXsave(), nested,
  ];
  samples = fixed.map((value) => () => clone(value));
  for (const handle of [kvm, vm, vcpu]) adopt(handle);

  const tally: Record<string, number> = { ok: 0, KvmError: 0, TypeError: 0, RangeError: 0 };
  const failures = new Map<string, string>();
  const started = performance.now();
  for (let i = 0; i < CALLS; i++) {
    if (i % 100 === 0) await turn();
    replenish();
    if (chance(0.01)) adopt(pick<() => Handle>([() => (pick(openOf('kvm')) as Kvm).createVm(), () => GuestMemory.create(MiB), () => EventFd.create()])());

    const method = pick(methods);
    let target: Handle | null = null;
    if (method.kind !== 'static' && method.kind !== 'native') {
      const candidates = chance(0.9) ? openOf(method.kind) : pool[method.kind];
      target = pick(candidates.length ? candidates : openOf(method.kind));
    }
    const args = method.plausible && chance(0.6)
      ? method.plausible().map((arg) => (chance(0.1) ? hostile() : arg))
      : Array.from({ length: int(4) }, () => hostile());
    const label = `${method.kind}.${method.name}`;
    // The parent shows the last calls if this process crashes or hangs.
    writeSync(traceFd, trace ? `${i} ${label}(${args.map(format).join(', ')})\n` : `${i} ${label}\n`);
    try {
      let result: unknown;
      if (method.call) result = method.call(target, args);
      else {
        const member = (target as unknown as Record<string, unknown>)[method.name];
        result = typeof member === 'function' ? (member as (...a: unknown[]) => unknown).apply(target, args) : member;
      }
      if (kindOf(result)) adopt(result as Handle);
      tally.ok!++;
    } catch (error) {
      const kind = error instanceof KvmError ? 'KvmError' : error instanceof TypeError ? 'TypeError' : error instanceof RangeError ? 'RangeError' : null;
      if (kind) tally[kind]!++;
      else {
        const name = error instanceof Error ? error.constructor.name : typeof error;
        const key = `${label} ${name}`;
        if (!failures.has(key)) {
          failures.set(key, `call ${i}: ${label}(${args.map(format).join(', ')}) threw ${name}: ${error instanceof Error ? error.message : String(error)}`);
        }
      }
    }
  }
  const elapsedMs = Math.round(performance.now() - started);

  for (const kind of ['vcpu', 'vm', 'memory', 'eventfd', 'kvm'] as const) {
    for (const handle of everything) if (kindOf(handle) === kind) handle.close();
  }
  native.closeSystem(systemHandle);
  await turn();
  await turn();
  return {
    elapsedMs,
    tally,
    failures: [...failures.values()],
    leaks: {
      handles: [handlesBefore, native.handleCount()],
      fds: [fdsBefore, readdirSync('/proc/self/fd').length],
      guestMappings: [mappingsBefore, GuestMemory.stats().mappings],
    },
  };
}

const RESULT = 'FUZZ-RESULT ';

if (process.env.NODE_KVM_FUZZ_CHILD === '1') {
  const traceFd = openSync(process.env.NODE_KVM_FUZZ_TRACE_FILE!, 'w');
  const result = await fuzz(traceFd);
  closeSync(traceFd);
  writeSync(1, `${RESULT}${JSON.stringify(result)}\n`);
} else {
  // The loop runs in a child process so that a crash or a hang is reported, with the calls that
  // led to it, instead of taking this test file down.
  const { default: t } = await import('tap');
  t.test(`${CALLS} random calls with hostile arguments`, { skip: noKvm }, async (t) => {
    t.comment(`seed ${seed} (replay with FUZZ_SEED=${seed}; FUZZ_TRACE=1 also logs every call's arguments)`);
    const traceDir = mkdtempSync(path.join(tmpdir(), 'node-kvm-fuzz-'));
    t.teardown(() => rmSync(traceDir, { recursive: true, force: true }));
    const traceFile = path.join(traceDir, 'calls.log');
    const child = spawnSync(process.execPath, [...process.execArgv, fileURLToPath(import.meta.url)], {
      env: { ...process.env, NODE_KVM_FUZZ_CHILD: '1', NODE_KVM_FUZZ_TRACE_FILE: traceFile, FUZZ_SEED: String(seed) },
      encoding: 'utf8',
      timeout: 60_000,
      // A hung addon call never returns to JavaScript, so signal handlers that tap installs in the
      // child would never run: only SIGKILL ends it.
      killSignal: 'SIGKILL',
    });
    const survived = child.error === undefined && child.signal === null && child.status === 0;
    if (!survived) {
      const calls = existsSync(traceFile) ? readFileSync(traceFile, 'utf8').trimEnd().split('\n') : [];
      t.comment(`the last calls: ${calls.slice(-5).join(' | ')}`);
      t.comment(`stderr: ${(child.stderr ?? '').trim().split('\n').slice(-5).join(' | ')}`);
    }
    t.ok(survived, `the process survived: no crash, no hang (${child.error?.message ?? `signal ${child.signal}, status ${child.status}`}; seed ${seed})`);
    const line = (child.stdout ?? '').split('\n').find((l) => l.startsWith(RESULT));
    if (!line) return;
    const result = JSON.parse(line.slice(RESULT.length)) as FuzzResult;
    t.comment(`${CALLS} calls in ${result.elapsedMs} ms: ${JSON.stringify(result.tally)}`);
    for (const failure of result.failures) t.comment(failure);
    t.same(result.failures, [], `every error is a KvmError, TypeError or RangeError (seed ${seed})`);
    const { ok, KvmError: kvmErrors, TypeError: typeErrors, RangeError: rangeErrors } = result.tally;
    t.ok(ok! > 0 && kvmErrors! > 0 && typeErrors! > 0 && rangeErrors! > 0, 'the calls reached success and every error kind');
    t.equal(result.leaks.handles[1], result.leaks.handles[0], 'native handles are back where they started');
    t.equal(result.leaks.guestMappings[1], result.leaks.guestMappings[0], 'guest mappings are back where they started');
    t.equal(result.leaks.fds[1], result.leaks.fds[0], 'open fds are back where they started');
  });
}
