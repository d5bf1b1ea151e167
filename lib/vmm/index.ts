// The VMM: machines with one thread per vCPU, the I/O bus, and the vCPU thread pool.
export {
  Machine, MAX_MEMORY_BYTES, type MachineConfig, type MachineExit, type MachineExitReason, type MachineShape, type DiskConfig, type DiskShape,
} from './machine.js';
export { VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE, VIRTIO_FIRST_GSI, VIRTIO_MAX_DEVICES } from '../devices/virtio-mmio.js';
export { VcpuWorkerPool, startVcpuThread, type VcpuThread } from './pool.js';
export { IoBus, type PortDevice, type MmioDevice } from './bus.js';
