// Debugging guests: a GDB remote stub over a Machine, and the debug target under it.
export { GdbServer, type GdbServerOptions } from './gdb-server.js';
export {
  DebugTarget, BREAKPOINT_SLOTS, debugRegisters, stopReason, type BreakpointKind, type WatchpointKind, type DebugSlot, type InsertResult, type StopReason, type ResumePlan,
} from './target.js';
export { hostDebugSupport, probeHostDebugSupport, type HostDebugSupport, type HostDebugProbeOptions } from './host-debug-support.js';
export { parseGdbAddress, formatGdbAddress, type GdbAddress } from './address.js';
export { archFor, targetDescription, type TargetArch, type VcpuRegisters } from './registers.js';
export { readRegisters, readGuestMemory, formatRegisters, hexDump, decodeRflags, MAX_INSPECT_BYTES, type InspectedRegisters, type ReadMemoryOptions } from './inspect.js';
export { readExitTrace, parseExitTrace, formatTraceRecord, summarizeExitTrace, type ExitTrace, type TraceRecord, type TraceExitKind, type TraceSummaryRow } from './exit-trace-reader.js';
