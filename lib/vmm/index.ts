// The VMM: machines with one thread per vCPU, their serial console, the I/O bus and the device
// interfaces, the vCPU thread pool, and dirty-page tracking.
export {
  Machine, MAX_MEMORY_BYTES, MAX_VCPUS,
  type MachineConfig, type MachineRuntimeConfig, type MachineRunState, type MachineShape, type MachineState, type MachineEvents,
  type MachineExit, type MachineExitReason, type MachineConsole, type VcpuState, type VmState, type RawVcpuState, type RawVmState, type DeviceStates, type DiskConfig, type DiskShape,
  type NetConfig, type NetShape,
  type MultibootModuleConfig, type ExitStats, type VcpuExitStats, type ExitCount, type DebugStop,
} from './machine.js';
export { CONSOLE_BACKLOG_BYTES } from './console.js';
export { VsockHost } from './vsock-host.js';
export type { VsockConfig } from '../devices/virtio-vsock.js';
export { VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE, VIRTIO_FIRST_GSI, VIRTIO_MAX_DEVICES } from '../devices/virtio-mmio.js';
export { VcpuWorkerPool, startVcpuThread, type VcpuThread, type VcpuThreadMessage, type VcpuWorkerPoolOptions } from './pool.js';
export {
  IoBus, createBusShared, unknownAccesses, MAX_LOGGED_UNKNOWN_PORTS, MAX_LOGGED_UNKNOWN_MMIO,
  type BusShared, type UnknownAccesses, type PortDevice, type MmioDevice,
} from './bus.js';
export type { DirtyPageMarker } from '../devices/bus-device.js';
export type { SerialState } from '../devices/serial.js';
export type { PostCodeState } from '../devices/post-code.js';
export type { AcpiPmState } from '../devices/acpi-pm.js';
export type { ElcrState } from '../devices/elcr.js';
export type { PciConfigState } from '../devices/pci-config.js';
export type { CmosRtcState } from '../devices/cmos-rtc.js';
export type { FwCfgState, FwCfgItem } from '../devices/fw-cfg.js';
export type { VirtioMmioState, VirtioQueueState } from '../devices/virtio-mmio.js';
export { DirtyBitmap, MAX_BITMAP_PAGES } from './dirty-bitmap.js';
export {
  DirtyTracker, dirtyLogModesOffered, maxDirtyRingBytes, DEFAULT_DIRTY_RING_BYTES,
  type DirtyTrackerOptions, type TrackedSlot, type DirtyLogMode, type ExtensionSource,
} from './dirty-tracker.js';
export type { PageRange } from './page-ranges.js';
