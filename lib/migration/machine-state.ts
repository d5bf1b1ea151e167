// A machine's state (everything but RAM) as stream sections: Config (the machine's shape),
// VmState, one VcpuState per vCPU, DeviceState. Decoding checks the structure before anything is
// applied; the values themselves are checked again by KVM and the struct encoders on restore.
import type { DiskShape, MachineShape, MachineState } from '../vmm/machine.js';
import { VIRTIO_MAX_DEVICES } from '../devices/virtio-mmio.js';
import { decodeStateSection, encodeStateSection } from './state-codec.js';
import { SectionType, StreamError, sectionName, type Section } from './stream.js';

const MAX_MEMORY_BYTES = 2 ** 40;

export function encodeShape(shape: { memoryBytes: number; vcpus: number; irqchip?: boolean }): Uint8Array {
  return encodeStateSection(SectionType.Config, { ...shape });
}

export function encodeMachineState(state: MachineState): Uint8Array[] {
  return [
    encodeStateSection(SectionType.Config, state.running === undefined ? state.shape : { ...state.shape, running: state.running }),
    encodeStateSection(SectionType.VmState, state.vm),
    ...state.vcpus.map((vcpu) => encodeStateSection(SectionType.VcpuState, vcpu)),
    encodeStateSection(SectionType.DeviceState, state.devices),
  ];
}

const isObject = (value: unknown): value is Record<string, unknown> => typeof value === 'object' && value !== null && !Array.isArray(value);

/** Checks a decoded Config section: the machine's shape. */
export function checkShape(value: unknown, where: string): MachineShape {
  if (!isObject(value)) throw new StreamError('EFORMAT', `${where}: the machine configuration is not an object`);
  const { memoryBytes, vcpus, irqchip } = value;
  if (typeof memoryBytes !== 'number' || !Number.isSafeInteger(memoryBytes) || memoryBytes <= 0 || memoryBytes % 4096 !== 0 || memoryBytes > MAX_MEMORY_BYTES) {
    throw new StreamError('EFORMAT', `${where}: bad guest RAM size ${String(memoryBytes)}`);
  }
  if (typeof vcpus !== 'number' || !Number.isInteger(vcpus) || vcpus < 1 || vcpus > 1024) {
    throw new StreamError('EFORMAT', `${where}: bad vCPU count ${String(vcpus)}`);
  }
  if (irqchip !== undefined && typeof irqchip !== 'boolean') throw new StreamError('EFORMAT', `${where}: bad irqchip flag`);
  const shape: MachineShape = { memoryBytes, vcpus, irqchip: irqchip ?? false };
  if (value.disks !== undefined) shape.disks = checkDiskShapes(value.disks, where);
  return shape;
}

function checkDiskShapes(value: unknown, where: string): DiskShape[] {
  if (!Array.isArray(value) || value.length > VIRTIO_MAX_DEVICES) throw new StreamError('EFORMAT', `${where}: bad disk list`);
  return value.map((disk: unknown, index) => {
    if (!isObject(disk)) throw new StreamError('EFORMAT', `${where}: disk ${index} is not an object`);
    const { path, readOnly, sectors, id } = disk;
    if (typeof path !== 'string' || path === '' || typeof readOnly !== 'boolean' || typeof id !== 'string' ||
      typeof sectors !== 'number' || !Number.isSafeInteger(sectors) || sectors < 1) {
      throw new StreamError('EFORMAT', `${where}: bad description of disk ${index}`);
    }
    return { path, readOnly, sectors, id };
  });
}

/** Collects the state sections of a stream, in the order encodeMachineState() writes them. */
export class MachineStateCollector {
  #shape: MachineShape | undefined;
  #vm: unknown;
  readonly #vcpus: unknown[] = [];
  #devices: unknown;
  #running: boolean | undefined;
  readonly #where: string;

  constructor(where: string) {
    this.#where = where;
  }

  /** True if the section was a state section (and was taken). */
  take(section: Section): boolean {
    switch (section.type) {
      case SectionType.Config: {
        const config = decodeStateSection(section);
        this.#shape = checkShape(config, this.#where);
        const running = isObject(config) ? config.running : undefined;
        if (running !== undefined && typeof running !== 'boolean') throw new StreamError('EFORMAT', `${this.#where}: bad running flag`);
        this.#running = running;
        return true;
      }
      case SectionType.VmState:
        this.#vm = decodeStateSection(section);
        return true;
      case SectionType.VcpuState:
        this.#vcpus.push(decodeStateSection(section));
        return true;
      case SectionType.DeviceState:
        this.#devices = decodeStateSection(section);
        return true;
      default:
        return false;
    }
  }

  /** The complete state, or a clear error naming what is missing or malformed. */
  finish(expected: { memoryBytes: number; vcpus: number }): MachineState {
    if (!this.#shape) throw new StreamError('EFORMAT', `${this.#where}: no machine configuration`);
    const state = assembleMachineState({ shape: this.#shape, vm: this.#vm, vcpus: this.#vcpus, devices: this.#devices }, expected, this.#where);
    if (this.#running !== undefined) state.running = this.#running;
    return state;
  }
}

/** Checks the structure of decoded state parts against what the header announced. */
export function assembleMachineState(
  parts: { shape: MachineShape; vm: unknown; vcpus: unknown[]; devices: unknown },
  expected: { memoryBytes: number; vcpus: number },
  where: string,
): MachineState {
  const { shape, vm, vcpus, devices } = parts;
  if (shape.memoryBytes !== expected.memoryBytes || shape.vcpus !== expected.vcpus) {
    throw new StreamError('EMISMATCH', `${where}: the state is for ${shape.memoryBytes} bytes and ${shape.vcpus} vCPUs, the header says ${expected.memoryBytes} and ${expected.vcpus}`);
  }
  if (!isObject(vm) || !isObject(vm.clock)) throw new StreamError('EFORMAT', `${where}: no VM state`);
  if (!Array.isArray(vcpus) || vcpus.length !== shape.vcpus) throw new StreamError('EFORMAT', `${where}: ${Array.isArray(vcpus) ? vcpus.length : 0} vCPU states for ${shape.vcpus} vCPUs`);
  vcpus.forEach((vcpu, index) => {
    if (!isObject(vcpu) || vcpu.id !== index || !isObject(vcpu.regs) || !isObject(vcpu.sregs) || !(vcpu.xsave instanceof Uint8Array) || !Array.isArray(vcpu.cpuid) || !Array.isArray(vcpu.msrs)) {
      throw new StreamError('EFORMAT', `${where}: the state of vCPU ${index} is malformed`);
    }
  });
  if (!isObject(devices) || !isObject(devices.serial) || !isObject(devices.postCode)) throw new StreamError('EFORMAT', `${where}: no device state`);
  return { shape, vm, vcpus, devices } as unknown as MachineState;
}

/** The state through the stream's encoding and back: exercises every codec on the way. */
export function warmUpStateCodec(state: MachineState): MachineState {
  const collector = new MachineStateCollector('warm-up');
  for (const section of encodeMachineState(state)) {
    const view = new DataView(section.buffer, section.byteOffset, section.byteLength);
    const type = view.getUint16(0, true);
    const length = view.getUint32(4, true);
    collector.take({ type, name: sectionName(type), flags: 0, payload: section.subarray(8, 8 + length) } as Section);
  }
  return collector.finish({ memoryBytes: state.shape.memoryBytes, vcpus: state.shape.vcpus });
}
