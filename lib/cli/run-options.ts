// `node-kvm run`'s options: the command line's table, the configuration file (--config), whose
// fields are the same options by the same names, and the checks of their values, which run
// before any vCPU thread starts. Loaded with the command itself: nothing heavy here.
import { readFileSync } from 'node:fs';
import { cpus } from 'node:os';
import { parseArgs, type ParseArgsConfig } from 'node:util';
import type { DiskConfig } from '../devices/virtio-blk.js';
import { MAX_MEMORY_BYTES, MAX_VCPUS } from '../vmm/config.js';
import type { DirtyLogMode } from '../vmm/dirty-tracker.js';
import type { NetConfig } from '../vmm/nets.js';
import { argTypeError, argValueError, systemError } from '../kvm/errors.js';

/** The command line's options (node:util parseArgs). A configuration file's fields are these names. */
export const RUN_ARGS = {
  help: { type: 'boolean', short: 'h' },
  config: { type: 'string' },
  mode: { type: 'string' },
  'load-addr': { type: 'string' },
  memory: { type: 'string' },
  vcpus: { type: 'string' },
  cmdline: { type: 'string' },
  kernel: { type: 'string' },
  initrd: { type: 'string' },
  append: { type: 'string' },
  disk: { type: 'string', multiple: true },
  net: { type: 'string', multiple: true },
  'api-socket': { type: 'string' },
  incoming: { type: 'string' },
  restore: { type: 'string' },
  verify: { type: 'boolean' },
  'no-verify': { type: 'boolean' },
  irqchip: { type: 'boolean' },
  'no-irqchip': { type: 'boolean' },
  'dirty-log': { type: 'string' },
  'cpu-affinity': { type: 'string', multiple: true },
  rng: { type: 'boolean' },
  vsock: { type: 'string' },
  token: { type: 'string' },
  gdb: { type: 'string' },
  'gdb-wait': { type: 'boolean' },
  serial: { type: 'string' },
  'trace-exits': { type: 'string' },
  'exit-stats': { type: 'boolean' },
} as const satisfies NonNullable<ParseArgsConfig['options']>;

/** Options that are about this invocation, not the machine: never fields of a configuration. */
const NOT_CONFIG = new Set(['help', 'config']);
/** `--no-X` options: the configuration's `"X": false`, and the same field as `--X`. */
const NEGATED: Record<string, 'irqchip' | 'verify'> = { 'no-irqchip': 'irqchip', 'no-verify': 'verify' };

/** `run`'s options as given (command line, configuration file or both), their values unparsed. */
export interface RunOptions {
  image?: string;
  incoming?: string;
  restore?: string;
  token?: string;
  /** --serial stdio|none|unix:PATH|file:PATH (default stdio). */
  serial?: string;
  apiSocket?: string;
  mode?: string;
  loadAddr?: string;
  memory?: string;
  vcpus?: string;
  cmdline?: string;
  /** The image, given as QEMU's -kernel. */
  kernel?: string;
  initrd?: string;
  /** The command line, given as QEMU's -append. */
  append?: string;
  /** --disk FILE[,ro][,id=ID], repeatable. */
  disk?: string[];
  /** --net tap=NAME[,mac=MAC][,netns=PATH], repeatable. */
  net?: string[];
  /** With --restore: check the RAM image against its checksum (default true). */
  verify?: boolean;
  /** In-kernel interrupt controllers (default true). */
  irqchip?: boolean;
  /** --dirty-log bitmap|ring. */
  dirtyLog?: string;
  /** --cpu-affinity [VCPU=]CPULIST, repeatable. */
  cpuAffinity?: string[];
  rng?: boolean;
  /** --vsock cid=N,uds=PATH. */
  vsock?: string;
  /** Serve a GDB stub at this address. */
  gdb?: string;
  /** With gdb: start paused, for the debugger to continue. */
  gdbWait?: boolean;
  /** Write every exit to this file (lib/vmm/exit-trace.ts). */
  traceExits?: string;
  /** Count exits from the start (machine.exitStats()). */
  exitStats?: boolean;
}

type RunArg = keyof typeof RUN_ARGS;
const camel = (name: string) => name.replace(/-([a-z])/g, (_, letter: string) => letter.toUpperCase());
const kebab = (key: string) => key.replace(/[A-Z]/g, (letter) => `-${letter.toLowerCase()}`);

/** The sources of a guest: one of them per run; the command line's replaces the configuration's. */
const SOURCES = ['image', 'kernel', 'incoming', 'restore'] as const;

/** Sets the options named `name` (an option or a configuration field) to `value` in `options`. */
function setOption(options: Record<string, unknown>, name: string, value: unknown): void {
  const negated = NEGATED[name];
  if (negated !== undefined) {
    if (value === true) options[negated] = false;
  } else {
    options[camel(name)] = value;
  }
}

export interface ParsedRunArgs {
  options: RunOptions;
  help: boolean;
  /** IMAGEs given beyond the first (an error, reported once the rest is known). */
  extraImages: number;
}

/** Parses `run`'s arguments, reading --config first: the command line's options override its fields. */
export function parseRunArgs(args: string[]): ParsedRunArgs {
  const { values, positionals } = parseArgs({ args, allowPositionals: true, options: RUN_ARGS });
  const help = values.help === true;
  if (help) return { options: {}, help, extraImages: 0 };
  for (const [name, negated] of Object.entries(NEGATED)) {
    if (values[name as RunArg] === true && values[negated] === true) throw argValueError(`--${negated} and --${name}: give one`);
  }
  const given: Record<string, unknown> = {};
  if (positionals[0] !== undefined) given.image = positionals[0];
  for (const [name, value] of Object.entries(values)) if (!NOT_CONFIG.has(name)) setOption(given, name, value);
  checkRunValues(given as RunOptions, (key) => `--${kebab(key)}`);
  const options = values.config === undefined ? given : mergeRunOptions(readRunConfig(values.config), given as RunOptions);
  return { options, help, extraImages: Math.max(positionals.length - 1, 0) };
}

/** `base` with each option `override` gives in its place; a guest source there replaces base's. */
export function mergeRunOptions(base: RunOptions, override: RunOptions): RunOptions {
  const merged: Record<string, unknown> = { ...base };
  if (SOURCES.some((key) => override[key] !== undefined)) for (const key of SOURCES) delete merged[key];
  for (const [key, value] of Object.entries(override)) if (value !== undefined) merged[key] = value;
  return merged;
}

/**
 * Reads a configuration file: a JSON object whose fields are `run`'s options by their long names
 * ("memory": "64M", "vcpus": 2, "disk": ["a.img,ro"], "irqchip": false), plus "image". Strings
 * may be given as numbers, a repeatable option as one string or an array of them. Each field's
 * value is checked as the option's would be; errors name the file and the field.
 */
export function readRunConfig(file: string): RunOptions {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (error) {
    throw systemError(`--config ${file}: ${(error as Error).message}`, error);
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (error) {
    throw argValueError(`--config ${file}: not JSON: ${(error as Error).message}`);
  }
  return runOptionsFromConfig(json, file);
}

/** The configuration object `json` (from `file`, for messages) as run's options, checked. */
export function runOptionsFromConfig(json: unknown, file: string): RunOptions {
  if (typeof json !== 'object' || json === null || Array.isArray(json)) throw argTypeError(`${file}: a configuration is a JSON object of run's options`);
  const fields = ['image', ...Object.keys(RUN_ARGS).filter((name) => !NOT_CONFIG.has(name))];
  const options: Record<string, unknown> = {};
  for (const [field, value] of Object.entries(json)) {
    const label = `${file}: field '${field}'`;
    if (!fields.includes(field)) throw argValueError(`${file}: unknown field '${field}' (fields: ${fields.join(', ')})`);
    const spec: { type: 'string' | 'boolean'; multiple?: boolean } = field === 'image' ? { type: 'string' } : RUN_ARGS[field as RunArg];
    if (spec.type === 'boolean') {
      if (typeof value !== 'boolean') throw argTypeError(`${label} must be true or false, got ${JSON.stringify(value)}`);
      if (NEGATED[field] !== undefined) options[NEGATED[field]!] = !value;
      else options[camel(field)] = value;
      continue;
    }
    const text = (item: unknown): string => {
      if (typeof item === 'string') return item;
      if (typeof item === 'number' && Number.isFinite(item)) return String(item);
      throw argTypeError(`${label} must be ${spec.multiple ? 'a string or an array of strings' : 'a string or a number'}, got ${JSON.stringify(item)}`);
    };
    options[camel(field)] = spec.multiple ? (Array.isArray(value) ? value : [value]).map(text) : text(value);
  }
  for (const [negated, field] of Object.entries(NEGATED)) {
    if (Object.hasOwn(json, negated) && Object.hasOwn(json, field)) throw argValueError(`${file}: fields '${field}' and '${negated}': give one`);
  }
  checkRunValues(options as RunOptions, (key) => `${file}: field '${kebab(key)}'`);
  return options as RunOptions;
}

/**
 * The options as a configuration object (what --config reads): each option by its long name, the
 * image as "image", the paired flags as "irqchip" and "verify".
 */
export function runOptionsToConfig(options: RunOptions): Record<string, unknown> {
  const config: Record<string, unknown> = {};
  for (const [key, value] of Object.entries(options)) if (value !== undefined) config[kebab(key)] = value;
  return config;
}

/**
 * Checks each option's value on its own (sizes, counts, lists), as cheaply as it is done: `run`
 * does it before it starts a vCPU thread. `label` names an option in messages.
 */
export function checkRunValues(options: RunOptions, label: (key: keyof RunOptions) => string): void {
  if (options.mode !== undefined && !['real', 'protected', 'long'].includes(options.mode)) {
    throw argValueError(`${label('mode')} must be real, protected or long, got '${options.mode}'`);
  }
  if (options.loadAddr !== undefined) parseAddress(options.loadAddr, label('loadAddr'));
  if (options.memory !== undefined) parseMemory(options.memory, label('memory'));
  if (options.vcpus !== undefined) parseVcpus(options.vcpus, label('vcpus'));
  for (const disk of options.disk ?? []) parseDiskOption(disk, label('disk'));
  for (const card of options.net ?? []) parseNetOption(card, label('net'));
  if (options.vsock !== undefined) parseVsockOption(options.vsock, label('vsock'));
  if (options.dirtyLog !== undefined) parseDirtyLog(options.dirtyLog, label('dirtyLog'));
  if (options.cpuAffinity !== undefined) parseCpuAffinity(options.cpuAffinity, MAX_VCPUS, label('cpuAffinity'));
}

const SIZE_UNITS = { '': 1, K: 1024, M: 1024 ** 2, G: 1024 ** 3, T: 1024 ** 4 } as const;
const MIB = 1024 * 1024;

/** 3221225472 -> '3 GiB', 1536 MiB -> '1.5 GiB', 4097 -> '4097 bytes'. */
export function formatSize(bytes: number): string {
  for (const [unit, size] of [['TiB', 1024 ** 4], ['GiB', 1024 ** 3], ['MiB', MIB], ['KiB', 1024]] as const) {
    if (bytes >= size && (bytes * 1000) % size === 0) return `${bytes / size} ${unit}`;
  }
  return `${bytes} bytes`;
}

/**
 * A size: a decimal number, a fraction (1.5G) or 0x hex, optionally followed by K, M, G or T
 * (binary units; KiB, MB and the like read the same). No unit: bytes. `option` names it in
 * messages; `multipleOf` and `max` bound it.
 */
export function parseSize(text: string, option = '--memory', limits: { multipleOf?: number; max?: number } = {}): number {
  const match = /^(0x[0-9a-f]+|\d+(?:\.\d+)?|\.\d+)\s*([KMGT]?)(?:i?B)?$/i.exec(text.trim());
  if (!match) throw argValueError(`${option}: '${text}' is not a size like 64M, 1.5G or 0x4000000`);
  const bytes = (match[1]!.toLowerCase().startsWith('0x') ? parseInt(match[1]!, 16) : Number(match[1])) * SIZE_UNITS[match[2]!.toUpperCase() as keyof typeof SIZE_UNITS];
  if (!Number.isSafeInteger(bytes)) throw argValueError(`${option}: '${text}' is not a whole number of bytes`);
  const { multipleOf = 1, max } = limits;
  if (max !== undefined && bytes > max) throw argValueError(`${option}: '${text}' is too large: at most ${formatSize(max)}`);
  if (bytes === 0 || bytes % multipleOf !== 0) throw argValueError(`${option}: '${text}' is not a positive multiple of ${formatSize(multipleOf)}`);
  return bytes;
}

/** --memory: guest RAM, a multiple of 1 MiB up to MAX_MEMORY_BYTES. */
export function parseMemory(text: string, option = '--memory'): number {
  return parseSize(text, option, { multipleOf: MIB, max: MAX_MEMORY_BYTES });
}

/** --vcpus: 1 to MAX_VCPUS. */
export function parseVcpus(text: string, option = '--vcpus'): number {
  const vcpus = /^\d+$/.test(text.trim()) ? Number(text) : NaN;
  if (!Number.isSafeInteger(vcpus) || vcpus < 1 || vcpus > MAX_VCPUS) throw argValueError(`${option} must be an integer from 1 to ${MAX_VCPUS}, got '${text}'`);
  return vcpus;
}

/** A guest-physical address: decimal or 0x hex. */
export function parseAddress(text: string, option: string): number {
  const value = /^0x[0-9a-f]+$/i.test(text) ? parseInt(text, 16) : /^\d+$/.test(text) ? Number(text) : NaN;
  if (!Number.isSafeInteger(value)) throw argValueError(`${option}: '${text}' is not an address (decimal or 0x hex)`);
  return value;
}

/** Parses one --disk value: FILE[,ro][,id=ID]. */
export function parseDiskOption(value: string, option = '--disk'): DiskConfig {
  const [file, ...flags] = value.split(',');
  if (!file) throw argValueError(`${option} needs a file: --disk FILE[,ro][,id=ID], got '${value}'`);
  const disk: DiskConfig = { path: file };
  for (const flag of flags) {
    if (flag === 'ro' || flag === 'readonly') disk.readOnly = true;
    else if (flag.startsWith('id=')) disk.id = flag.slice(3);
    else throw argValueError(`${option} ${value}: unknown flag '${flag}' (ro, id=ID)`);
  }
  return disk;
}

/** --dirty-log bitmap|ring. */
export function parseDirtyLog(text: string, option = '--dirty-log'): DirtyLogMode {
  if (text !== 'bitmap' && text !== 'ring') throw argValueError(`${option} must be bitmap or ring, got '${text}'`);
  return text;
}

/** A CPU list as taskset -c and cpuset take it: "2", "0,2-3". */
function parseCpuList(text: string, option: string, hostCpus: number): number[] {
  const list = new Set<number>();
  for (const part of text.split(',')) {
    const range = /^(\d+)(?:-(\d+))?$/.exec(part.trim());
    const first = range ? Number(range[1]) : NaN;
    const last = range?.[2] === undefined ? first : Number(range[2]);
    if (!range || last < first) throw argValueError(`${option}: '${text}' is not a CPU list like 2 or 0,2-3`);
    if (last >= hostCpus) throw argValueError(`${option}: CPU ${last} is not one of this host's ${hostCpus} CPUs (0-${hostCpus - 1})`);
    for (let cpu = first; cpu <= last; cpu++) list.add(cpu);
  }
  return [...list];
}

/**
 * --cpu-affinity values: "CPULIST" (every vCPU may run on those host CPUs) or "VCPU=CPULIST"
 * (that vCPU), later values overriding earlier ones. Returns the host CPUs of each of `vcpus`
 * vCPUs (index = vCPU id; undefined: anywhere).
 */
export function parseCpuAffinity(values: readonly string[], vcpus: number, option = '--cpu-affinity'): (number[] | undefined)[] {
  const hostCpus = cpus().length;
  const affinity: (number[] | undefined)[] = new Array<number[] | undefined>(vcpus).fill(undefined);
  for (const value of values) {
    const pinned = /^(\d+)=(.*)$/.exec(value);
    if (!pinned) {
      affinity.fill(parseCpuList(value, option, hostCpus));
      continue;
    }
    const vcpu = Number(pinned[1]);
    if (vcpu >= vcpus) throw argValueError(`${option} ${value}: the machine has ${vcpus} vCPU${vcpus === 1 ? '' : 's'} (0-${vcpus - 1})`);
    affinity[vcpu] = parseCpuList(pinned[2]!, option, hostCpus);
  }
  return affinity;
}

/** Parses --vsock cid=N,uds=PATH (cid may be left out for a restored or received guest). */
export function parseVsockOption(value: string, option = '--vsock'): { cid?: number; uds: string } {
  const parsed: { cid?: number; uds?: string } = {};
  for (const part of value.split(',')) {
    const [key, text] = [part.slice(0, part.indexOf('=')), part.slice(part.indexOf('=') + 1)];
    if (key === 'cid' && /^\d+$/.test(text)) parsed.cid = Number(text);
    else if (key === 'uds' && text !== '') parsed.uds = text;
    else throw argValueError(`${option} ${value}: '${part}' is not cid=N or uds=PATH`);
  }
  if (parsed.uds === undefined) throw argValueError(`${option} ${value}: uds=PATH is missing`);
  return { ...(parsed.cid === undefined ? {} : { cid: parsed.cid }), uds: parsed.uds };
}

/** Parses one --net value: tap=NAME[,mac=MAC][,netns=PATH]. */
export function parseNetOption(value: string, option = '--net'): NetConfig {
  const card: NetConfig = {};
  for (const part of value.split(',')) {
    const [key, text] = [part.slice(0, part.indexOf('=')), part.slice(part.indexOf('=') + 1)];
    if (part.indexOf('=') < 1 || text === '') throw argValueError(`${option} ${value}: '${part}' is not KEY=VALUE (tap=NAME, mac=MAC, netns=PATH)`);
    if (key === 'tap') card.tap = text;
    else if (key === 'mac') card.mac = text;
    else if (key === 'netns') card.netns = text;
    else throw argValueError(`${option} ${value}: unknown key '${key}' (tap, mac, netns)`);
  }
  if (card.tap === undefined) throw argValueError(`${option} needs a TAP: --net tap=NAME[,mac=MAC][,netns=PATH], got '${value}'`);
  return card;
}
