// The VMM: machines with one thread per vCPU, the I/O bus, and the vCPU thread pool.
export { Machine, MAX_MEMORY_BYTES, type MachineConfig, type MachineExit, type MachineExitReason } from './machine.js';
export { VcpuWorkerPool } from './pool.js';
export { IoBus, type PortDevice, type MmioDevice } from './bus.js';
