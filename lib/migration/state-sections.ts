// A machine's state (everything but RAM) as stream sections, written by one encoder and read by
// one reader for live migrations and snapshot files alike, always in the order restore applies
// them: Config, VmState, VcpuState x vcpuCount (in vCPU index order), DeviceState.
//
// Each payload is state-codec JSON (state-codec.ts), but for a VcpuState section from stream
// version 3 on, which may hold a vCPU's raw state instead (lib/kvm/vcpu-state-blob.ts, told apart
// by its magic), and a VmState section from version 4 on, which may hold the VM's raw state
// (lib/kvm/vm-state-blob.ts, its magic 'KVMS' never starts JSON). Config holds a record:
//   { machine: <the machine's configuration: for a Machine, its shape>,
//     running?: <live migration: whether the guest ran (false: its owner had paused it)>,
//     parent?: { path: <diff snapshots: the parent file, relative to the diff's directory> } }
// A migration also announces the machine's shape in a Config section of its own (no state with
// it) before its pages, and the destination answers with one to accept.
//
// Reading checks the order and count of the sections and their structure before anything is
// applied; the values themselves are checked again by KVM and the struct encoders on restore.
import { VIRTIO_MAX_DEVICES } from '../devices/virtio-mmio.js';
import { PAGE_SIZE } from '../kvm/constants.js';
import { MAX_MEMORY_BYTES, MAX_VCPUS, type CpuState, type MachineShape, type MachineState } from '../vmm/config.js';
import type { DiskShape } from '../vmm/disks.js';
import type { NetShape } from '../vmm/nets.js';
import { isDeviceStates, isDeviceStatesAhead, isSomeDeviceStates, type DeviceStates, type DeviceStatesAhead } from '../vmm/devices.js';
import { MigrationErrorCode as Code, streamError } from './errors.js';
import { SectionType, encodeEnd, encodeSection, type Section } from './format.js';
import { checkVcpuStateBlob, isVcpuStateBlob, vcpuStateBlobHeader } from '../kvm/vcpu-state-blob.js';
import { checkVmStateBlob, isVmStateBlob, vmStateBlobHasIrqchip } from '../kvm/vm-state-blob.js';
import { SectionParser } from './section-parser.js';
import { decodeState, encodeState, encodeStateSection, sameState } from './state-codec.js';

/** The contents of a Config section. */
export interface StateConfig {
  /** The machine's configuration (state-codec encodable; for a Machine, its MachineShape). */
  machine: unknown;
  /** Live migration: whether the guest was running when its state was taken. */
  running?: boolean;
  /** Diff snapshots: the parent snapshot file, relative to the diff's directory. */
  parent?: { path: string };
}

/** A machine's state as the stream carries it. */
export interface StateParts extends StateConfig {
  vm: unknown;
  /** One per vCPU, in vCPU index order. */
  vcpus: readonly unknown[];
  devices: unknown;
}

/** A Config section holding `config`. */
export function encodeConfigSection(config: StateConfig): Uint8Array {
  return encodeSection(SectionType.Config, configPayload(config));
}

/** The payload of a Config section holding `config`. */
function configPayload(config: StateConfig): Uint8Array {
  const record: Record<string, unknown> = { machine: config.machine };
  if (config.running !== undefined) record.running = config.running;
  if (config.parent !== undefined) record.parent = { path: config.parent.path };
  return encodeState(record);
}

/** The state sections, in their one order: Config, VmState, VcpuState x n, DeviceState. */
export function encodeStateSections(parts: StateParts): Uint8Array[] {
  return [...encodeCpuSections(parts), encodeStateSection(SectionType.DeviceState, parts.devices)];
}

/** The sections before the devices': Config (`config` if encoded ahead), VmState, VcpuState x n. */
function encodeCpuSections(parts: Omit<StateParts, 'devices'>, config?: Uint8Array): Uint8Array[] {
  return [
    config ?? encodeConfigSection(parts),
    // Raw (RawVmState) as it is too (stream version 4).
    parts.vm instanceof Uint8Array ? encodeSection(SectionType.VmState, parts.vm) : encodeStateSection(SectionType.VmState, parts.vm),
    // A raw state (RawVcpuState) goes as it is: KVM's structs, no JSON (stream version 3).
    ...parts.vcpus.map((vcpu) => (vcpu instanceof Uint8Array ? encodeSection(SectionType.VcpuState, vcpu) : encodeStateSection(SectionType.VcpuState, vcpu))),
  ];
}

/** A Machine's state as sections. */
export function encodeMachineState(state: MachineState): Uint8Array[] {
  return encodeStateSections({ machine: state.shape, running: state.running, vm: state.vm, vcpus: state.vcpus, devices: state.devices });
}

/**
 * A live migration's last state in two buffers, each one write: the VM's and the vCPUs' state
 * (Config, VmState, VcpuState x n), which the destination checks and applies while the source
 * saves and encodes the second, the devices' state and the End.
 */
export function encodeCpuState(state: CpuState, configs?: FinalConfigSections): Buffer {
  return Buffer.concat(encodeCpuSections({ machine: state.shape, running: state.running, vm: state.vm, vcpus: state.vcpus }, configs?.get(state)));
}

/**
 * The Config sections a live migration's last state may start with (its guest running or paused),
 * encoded before the pause: inside the downtime, a process that has waited idle took 0.08-0.11 ms
 * here to encode even that small record, most of the CPU part's encoding.
 */
export class FinalConfigSections {
  readonly #shape: MachineShape;
  readonly #running: Uint8Array;
  readonly #paused: Uint8Array;

  constructor(shape: MachineShape) {
    this.#shape = shape;
    this.#running = encodeConfigSection({ machine: shape, running: true });
    this.#paused = encodeConfigSection({ machine: shape, running: false });
  }

  /** The section for `state`, undefined if it holds another shape (or no running flag). */
  get(state: { shape: MachineShape; running?: boolean }): Uint8Array | undefined {
    if (state.running === undefined || !sameState(state.shape, this.#shape)) return undefined;
    return state.running ? this.#running : this.#paused;
  }
}

/** The second part of a live migration's last state (see encodeCpuState()); only the devices that changed after a DeviceStateAhead section. */
export function encodeDeviceStateSection(devices: MachineState['devices'] | Partial<DeviceStates>): Uint8Array {
  return encodeStateSection(SectionType.DeviceState, devices);
}

/** encodeDeviceStateSection() and the End after it, in one buffer. */
export function encodeDeviceStateAndEnd(devices: MachineState['devices'] | Partial<DeviceStates>): Buffer {
  return Buffer.concat([encodeDeviceStateSection(devices), encodeEnd()]);
}

/** A live migration's last state, its End included, in one buffer (one write; the destination reads it whole in one wake-up). */
export function encodeFinalState(state: MachineState, configs?: FinalConfigSections): Buffer {
  return Buffer.concat([encodeCpuState(state, configs), encodeDeviceStateAndEnd(state.devices)]);
}

/**
 * The devices' state a live migration sends ahead of its pause (SectionType.DeviceStateAhead),
 * kept to tell, at the end, which devices' state has changed since.
 */
export class DeviceStatesSentAhead {
  /** The DeviceStateAhead section. */
  readonly section: Uint8Array;
  readonly #sent: Record<string, unknown> = {};

  /** `part`: saved while the guest ran; a device whose state does not check out (read as it changed) is left out, to go at the end. */
  constructor(part: DeviceStatesAhead) {
    for (const [key, state] of Object.entries(part)) {
      if (state !== undefined && isDeviceStatesAhead({ [key]: state })) this.#sent[key] = state;
    }
    this.section = encodeStateSection(SectionType.DeviceStateAhead, this.#sent);
  }

  /** What the DeviceState section at the end holds: the devices whose state differs from the one sent ahead (or was not sent). */
  changed(devices: DeviceStates): Partial<DeviceStates> {
    const changed: Record<string, unknown> = {};
    for (const [key, state] of Object.entries(devices)) {
      if (state !== undefined && !(Object.hasOwn(this.#sent, key) && sameState(state, this.#sent[key]))) changed[key] = state;
    }
    return changed as Partial<DeviceStates>;
  }
}

/** The devices' states of a DeviceStateAhead section, their structure checked. */
export function decodeDeviceStatesAhead(section: Section, where: string): DeviceStatesAhead {
  const value = decodeState(section.payload, 'the DeviceStateAhead section');
  if (!isDeviceStatesAhead(value)) throw streamError(Code.Format, `${where}: the device state sent ahead is malformed`);
  return value;
}

/**
 * The devices' whole state from the states sent ahead and the DeviceState section that followed
 * them (the devices that changed), checked; `appliedAhead` names the devices whose state is the
 * one sent ahead (already put on the machine).
 */
export function mergeDeviceStates(ahead: DeviceStatesAhead, changed: unknown, where: string): { devices: DeviceStates; appliedAhead: ReadonlySet<string> } {
  if (!isObject(changed)) throw streamError(Code.Format, `${where}: no device state`);
  // Only the devices that changed are checked here: those sent ahead were as they came.
  if (!isSomeDeviceStates(changed)) throw streamError(Code.Format, `${where}: the device state is malformed`);
  const devices = { ...ahead, ...changed };
  if (!isObject(devices.serial) || !isObject(devices.postCode)) throw streamError(Code.Format, `${where}: no device state`);
  return { devices: devices as DeviceStates, appliedAhead: new Set(Object.keys(ahead).filter((key) => !Object.hasOwn(changed, key))) };
}

const isObject = (value: unknown): value is Record<string, unknown> => typeof value === 'object' && value !== null && !Array.isArray(value);

/** The record of a Config section, its structure checked. */
export function decodeConfigSection(section: Section, where: string): StateConfig {
  const value = decodeState(section.payload, 'the Config section');
  if (!isObject(value) || !Object.hasOwn(value, 'machine')) throw streamError(Code.Format, `${where}: the Config section does not hold a machine configuration`);
  const config: StateConfig = { machine: value.machine };
  if (value.running !== undefined) {
    if (typeof value.running !== 'boolean') throw streamError(Code.Format, `${where}: bad running flag`);
    config.running = value.running;
  }
  if (value.parent !== undefined) {
    const parent = value.parent;
    if (!isObject(parent) || typeof parent.path !== 'string' || parent.path === '') throw streamError(Code.Format, `${where}: the Config section names its parent badly`);
    config.parent = { path: parent.path };
  }
  return config;
}

const enum Next {
  Config,
  VmState,
  VcpuState,
  Done,
}

/**
 * Reads the state sections of a stream or file, in their one order, for `vcpuCount` vCPUs (the
 * header's). Anything out of order is refused (EFORMAT) as it arrives.
 */
export class StateSectionReader {
  readonly #where: string;
  readonly #vcpuCount: number;
  #next = Next.Config;
  #config: StateConfig | undefined;
  #vm: unknown;
  readonly #vcpus: unknown[] = [];
  #devices: unknown;
  readonly #expectedConfigs: { payload: Buffer; config: StateConfig }[] = [];

  /** `where` starts every error message ('a snapshot file', 'the migration stream'). */
  constructor(where: string, vcpuCount: number) {
    this.#where = where;
    this.#vcpuCount = vcpuCount;
  }

  /**
   * Takes a Config section that holds `config` as it is, without decoding it: a migration's
   * destination knows the machine the source announced, and the last state's Config holds the
   * same with its running flag (decoding it took 0.05-0.1 ms inside the downtime, idle).
   */
  expectConfig(config: StateConfig): void {
    const payload = configPayload(config);
    this.#expectedConfigs.push({ payload: Buffer.from(payload.buffer, payload.byteOffset, payload.byteLength), config });
  }

  /** The Config section's record, once it has been read. */
  get config(): StateConfig | undefined {
    return this.#config;
  }

  /** Whether every state section has been read. */
  get complete(): boolean {
    return this.#next === Next.Done;
  }

  /** Whether every section before the devices' has been read (see cpuParts()). */
  get cpuComplete(): boolean {
    return this.#next === Next.Done || (this.#next === Next.VcpuState && this.#vcpus.length === this.#vcpuCount);
  }

  /** The state read but the devices', once cpuComplete. */
  cpuParts(): Omit<StateParts, 'devices'> {
    if (!this.cpuComplete) throw streamError(Code.Format, `${this.#where} ends ${this.#position()}, before its vCPU states are complete`);
    return { ...this.#config!, vm: this.#vm, vcpus: this.#vcpus };
  }

  /** Takes a state section, checked and decoded; false for any other type (not taken). */
  take(section: Section): boolean {
    const what = `the ${section.name} section`;
    switch (section.type) {
      case SectionType.Config:
        if (this.#next !== Next.Config) throw this.#misplaced(section, 'a second Config section');
        this.#config = this.#expectedConfig(section.payload) ?? decodeConfigSection(section, this.#where);
        this.#next = Next.VmState;
        return true;
      case SectionType.VmState:
        if (this.#next !== Next.VmState) throw this.#misplaced(section);
        this.#vm = isVmStateBlob(section.payload) ? this.#rawVm(section.payload, what) : decodeState(section.payload, what);
        this.#next = Next.VcpuState;
        return true;
      case SectionType.VcpuState:
        if (this.#next !== Next.VcpuState || this.#vcpus.length === this.#vcpuCount) throw this.#misplaced(section);
        this.#vcpus.push(isVcpuStateBlob(section.payload) ? this.#rawVcpu(section.payload, `${what} of vCPU ${this.#vcpus.length}`) : decodeState(section.payload, `${what} of vCPU ${this.#vcpus.length}`));
        return true;
      case SectionType.DeviceState:
        if (this.#next !== Next.VcpuState || this.#vcpus.length !== this.#vcpuCount) throw this.#misplaced(section);
        this.#devices = decodeState(section.payload, what);
        this.#next = Next.Done;
        return true;
      default:
        return false;
    }
  }

  /** The config expected (expectConfig()) whose encoding `payload` is, if any (a loop: no closure to compile inside the downtime). */
  #expectedConfig(payload: Uint8Array): StateConfig | undefined {
    for (const expected of this.#expectedConfigs) if (expected.payload.equals(payload)) return expected.config;
    return undefined;
  }

  /** A raw VM state (KVM's structs), checked whole, copied out of the stream's buffer. */
  #rawVm(payload: Uint8Array, what: string): Uint8Array {
    const problem = checkVmStateBlob(payload);
    if (problem !== null) throw streamError(Code.Format, `${this.#where}: ${what} is malformed: ${problem}`);
    return new Uint8Array(payload);
  }

  /** A raw vCPU state (KVM's structs), checked whole, copied out of the stream's buffer. */
  #rawVcpu(payload: Uint8Array, what: string): Uint8Array {
    const problem = checkVcpuStateBlob(payload);
    if (problem !== null) throw streamError(Code.Format, `${this.#where}: ${what} is malformed: ${problem}`);
    // A copy (not Buffer's slice, a view): the stream's read buffer is reused for the next bytes.
    return new Uint8Array(payload);
  }

  /** Throws unless the state is complete: for a section of another type that comes too early. */
  expectComplete(section: Section): void {
    if (!this.complete) throw this.#misplaced(section);
  }

  /** The state read, or a clear error naming what is missing. */
  finish(): StateParts {
    if (this.#next !== Next.Done) throw streamError(Code.Format, `${this.#where} ends ${this.#position()}, before its state is complete`);
    return { ...this.#config!, vm: this.#vm, vcpus: this.#vcpus, devices: this.#devices };
  }

  /** Where the reader is in the state. */
  #position(): string {
    switch (this.#next) {
      case Next.Config: return 'before its Config section';
      case Next.VmState: return 'after its Config section';
      case Next.VcpuState: return this.#vcpus.length === 0 ? 'after its VmState section' : `after VmState and ${this.#vcpus.length} of ${this.#vcpuCount} VcpuState sections`;
      default: return 'after its DeviceState section';
    }
  }

  #misplaced(section: Section, detail?: string): Error {
    const order = `the state comes as Config, VmState, ${this.#vcpuCount} VcpuState, DeviceState`;
    return streamError(Code.Format, `${this.#where}: misplaced ${section.name} section ${detail ? `(${detail})` : `${this.#position()} (${order})`}`);
  }
}

/** Checks a machine's configuration as a stream carries it: its shape. */
export function checkShape(value: unknown, where: string): MachineShape {
  if (!isObject(value)) throw streamError(Code.Format, `${where}: the machine configuration is not an object`);
  const { memoryBytes, vcpus, irqchip } = value;
  if (typeof memoryBytes !== 'number' || !Number.isSafeInteger(memoryBytes) || memoryBytes <= 0 || memoryBytes % PAGE_SIZE !== 0) {
    throw streamError(Code.Format, `${where}: bad guest RAM size ${String(memoryBytes)}`);
  }
  if (memoryBytes > MAX_MEMORY_BYTES) throw streamError(Code.TooBig, `${where}: a machine with ${memoryBytes} bytes of RAM; this host builds machines of at most ${MAX_MEMORY_BYTES}`);
  if (typeof vcpus !== 'number' || !Number.isInteger(vcpus) || vcpus < 1) throw streamError(Code.Format, `${where}: bad vCPU count ${String(vcpus)}`);
  if (vcpus > MAX_VCPUS) throw streamError(Code.TooBig, `${where}: a machine with ${vcpus} vCPUs; this host builds machines of at most ${MAX_VCPUS}`);
  if (irqchip !== undefined && typeof irqchip !== 'boolean') throw streamError(Code.Format, `${where}: bad irqchip flag`);
  const shape: MachineShape = { memoryBytes, vcpus, irqchip: irqchip ?? false };
  if (value.disks !== undefined) shape.disks = checkDiskShapes(value.disks, where);
  if (value.rng !== undefined && typeof value.rng !== 'boolean') throw streamError(Code.Format, `${where}: bad rng flag`);
  if (value.rng) shape.rng = true;
  if (value.net !== undefined) shape.net = checkNetShapes(value.net, where);
  if (value.vsock !== undefined) {
    const cid = isObject(value.vsock) ? value.vsock.cid : undefined;
    if (typeof cid !== 'number' || !Number.isInteger(cid) || cid < 3 || cid > 0xfffffffe) throw streamError(Code.Format, `${where}: bad vsock device`);
    shape.vsock = { cid };
  }
  return shape;
}

function checkNetShapes(value: unknown, where: string): NetShape[] {
  if (!Array.isArray(value) || value.length > VIRTIO_MAX_DEVICES) throw streamError(Code.Format, `${where}: bad network card list`);
  return value.map((card: unknown, index) => {
    if (!isObject(card) || typeof card.mac !== 'string' || !/^[0-9a-f]{2}(:[0-9a-f]{2}){5}$/.test(card.mac)) throw streamError(Code.Format, `${where}: bad description of network card ${index}`);
    return { mac: card.mac };
  });
}

function checkDiskShapes(value: unknown, where: string): DiskShape[] {
  if (!Array.isArray(value) || value.length > VIRTIO_MAX_DEVICES) throw streamError(Code.Format, `${where}: bad disk list`);
  return value.map((disk: unknown, index) => {
    if (!isObject(disk)) throw streamError(Code.Format, `${where}: disk ${index} is not an object`);
    const { path, readOnly, sectors, id } = disk;
    if (typeof path !== 'string' || path === '' || typeof readOnly !== 'boolean' || typeof id !== 'string' ||
      typeof sectors !== 'number' || !Number.isSafeInteger(sectors) || sectors < 1) {
      throw streamError(Code.Format, `${where}: bad description of disk ${index}`);
    }
    return { path, readOnly, sectors, id };
  });
}

/** A Machine's state from the parts read, its structure checked against what the header announced. */
export function machineStateOf(parts: StateParts, expected: { memoryBytes: number; vcpus: number }, where: string): MachineState {
  return { ...cpuStateOf(parts, expected, where), devices: checkDeviceStates(parts.devices, where) };
}

/** The devices' state from the parts read, its structure checked. */
export function checkDeviceStates(devices: unknown, where: string): MachineState['devices'] {
  if (!isObject(devices) || !isObject(devices.serial) || !isObject(devices.postCode)) throw streamError(Code.Format, `${where}: no device state`);
  if (!isDeviceStates(devices)) throw streamError(Code.Format, `${where}: the device state is malformed`);
  return devices;
}

/** machineStateOf() but the devices' state. */
export function cpuStateOf(parts: Omit<StateParts, 'devices'>, expected: { memoryBytes: number; vcpus: number }, where: string): CpuState {
  const shape = checkShape(parts.machine, where);
  const { vm, vcpus } = parts;
  if (shape.memoryBytes !== expected.memoryBytes || shape.vcpus !== expected.vcpus) {
    throw streamError(Code.Mismatch, `${where}: the state is for ${shape.memoryBytes} bytes and ${shape.vcpus} vCPUs, the header says ${expected.memoryBytes} and ${expected.vcpus}`);
  }
  // Raw: checked whole as it was read; whether it has the irqchip must match the shape's.
  if (vm instanceof Uint8Array) {
    if (vmStateBlobHasIrqchip(vm) !== shape.irqchip) throw streamError(Code.Format, `${where}: the VM state ${shape.irqchip ? 'lacks' : 'has'} the in-kernel irqchip the machine ${shape.irqchip ? 'has' : 'lacks'}`);
  } else if (!isObject(vm) || !isObject(vm.clock)) {
    throw streamError(Code.Format, `${where}: no VM state`);
  }
  if (vcpus.length !== shape.vcpus) throw streamError(Code.Format, `${where}: ${vcpus.length} vCPU states for ${shape.vcpus} vCPUs`);
  vcpus.forEach((vcpu, index) => {
    // Raw: checked whole as it was read (StateSectionReader).
    if (vcpu instanceof Uint8Array) {
      if (vcpuStateBlobHeader(vcpu).vcpuId !== index) throw streamError(Code.Format, `${where}: the state of vCPU ${index} is that of another vCPU`);
      return;
    }
    if (!isObject(vcpu) || vcpu.id !== index || !isObject(vcpu.regs) || !isObject(vcpu.sregs) || !(vcpu.xsave instanceof Uint8Array) || !Array.isArray(vcpu.cpuid) || !Array.isArray(vcpu.msrs)) {
      throw streamError(Code.Format, `${where}: the state of vCPU ${index} is malformed`);
    }
  });
  const state = { shape, vm, vcpus: [...vcpus] } as unknown as CpuState;
  if (parts.running !== undefined) state.running = parts.running;
  return state;
}

/**
 * The state through the stream's encoding and its one parser and reader, and back: warms every
 * codec on the way. `sections`: encodeMachineState(state) done before, where only the reading
 * needs warming (a destination, which never encodes a machine's state).
 */
export function warmUpStateCodec(state: MachineState, sections: readonly Uint8Array[] = encodeMachineState(state)): MachineState {
  const reader = new StateSectionReader('warm-up', state.vcpus.length);
  const expected = { memoryBytes: state.shape.memoryBytes, vcpus: state.shape.vcpus };
  // As a live migration's destination reads its last state: the CPU part checked on its own first.
  let cpuChecked = false;
  const parser = new SectionParser({
    section: (section) => {
      reader.take(section);
      if (!cpuChecked && reader.cpuComplete && !reader.complete) {
        cpuChecked = true;
        cpuStateOf(reader.cpuParts(), expected, 'warm-up');
      }
    },
  });
  for (const section of sections) parser.push(section);
  return machineStateOf(reader.finish(), expected, 'warm-up');
}

/**
 * Runs the encoding of a migration's last state a few times over a state saved while the guest
 * runs, so that V8 has compiled it by the time the guest is paused (only as many times as this
 * process has not run it yet); resolves with that state (null if there was none), for a last
 * rehearsal just before the pause. Never rejects.
 */
export async function warmUpStateEncoding(saved: Promise<MachineState | null>): Promise<MachineState | null> {
  try {
    const state = await saved;
    if (state) rehearseStateEncoding(state, Math.max(0, ENCODING_WARM_UP_ROUNDS - encodingsRehearsed));
    return state;
  } catch {
    // Only a warm-up: the real save says what is wrong.
    return null;
  }
}

/**
 * Encodes `state` (thrown away) `rounds` times: run again just before the pause, as code that V8
 * has compiled still runs several times slower in a process that has waited idle a while (the
 * final state's encoding measured here: 0.13 ms after 15 ms idle, 0.10 ms with two rounds
 * first, 0.025 ms in a loop).
 */
export function rehearseStateEncoding(state: MachineState, rounds = 2): void {
  const { virtio: _virtio, ...ahead } = state.devices;
  const configs = new FinalConfigSections(state.shape);
  for (let i = 0; i < rounds; i++) {
    encodeFinalState({ ...state, running: true }, configs);
    // What a stop with the devices' state sent ahead runs instead.
    encodeDeviceStateAndEnd(new DeviceStatesSentAhead(ahead).changed(state.devices));
  }
  encodingsRehearsed += rounds;
}

/**
 * How often a process runs the encoding before its first pause: enough for V8's baseline
 * compiler. Compiled code stays for the process's life, so a later migration runs only the last
 * rehearsal: these rounds cost 0.6-1.3 ms of the main thread, inside the handshake.
 */
const ENCODING_WARM_UP_ROUNDS = 8;
/** Rounds of the encoding rehearsed in this process so far. */
let encodingsRehearsed = 0;
