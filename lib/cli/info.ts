// `node-kvm info`: the host's KVM API version, limits and capabilities as a table.
import { Cap, type Kvm } from '../kvm/index.js';

const CAPABILITIES: [label: string, cap: number][] = [
  ['in-kernel irqchip', Cap.Irqchip],
  ['split irqchip', Cap.SplitIrqchip],
  ['PIT (i8254)', Cap.Pit2],
  ['irqfd', Cap.Irqfd],
  ['irqfd resample', Cap.IrqfdResample],
  ['ioeventfd', Cap.Ioeventfd],
  ['GSI routing entries', Cap.IrqRouting],
  ['MSI injection', Cap.SignalMsi],
  ['read-only memory', Cap.ReadonlyMem],
  ['dirty log manual protect', Cap.ManualDirtyLogProtect2],
  ['dirty ring (bytes)', Cap.DirtyLogRing],
  ['dirty ring acq/rel (bytes)', Cap.DirtyLogRingAcqRel],
  ['immediate exit', Cap.ImmediateExit],
  ['XSAVE', Cap.Xsave],
  ['XSAVE2 (bytes)', Cap.Xsave2],
  ['XCRs', Cap.Xcrs],
  ['vCPU events', Cap.VcpuEvents],
  ['debug registers', Cap.Debugregs],
  ['guest debug', Cap.SetGuestDebug],
  ['TSC frequency control', Cap.TscControl],
  ['get TSC kHz', Cap.GetTscKhz],
  ['kvmclock control', Cap.KvmclockCtrl],
  ['adjust clock', Cap.AdjustClock],
  ['feature MSRs', Cap.GetMsrFeatures],
  ['user-space MSRs', Cap.X86UserSpaceMsr],
  ['nested state (bytes)', Cap.NestedState],
  ['sync regs', Cap.SyncRegs],
  ['coalesced MMIO', Cap.CoalescedMmio],
  ['coalesced PIO', Cap.CoalescedPio],
];

export function printInfo(kvm: Kvm, device: string, json: boolean): void {
  const rows: [string, string][] = [
    ['device', device],
    ['API version', String(kvm.apiVersion)],
    ['max vCPUs', String(kvm.maxVcpus)],
    ['recommended vCPUs', String(kvm.checkExtension(Cap.NrVcpus))],
    ['memory slots', String(kvm.nrMemslots)],
    ['vCPU mmap size', String(kvm.vcpuMmapSize)],
    ['supported CPUID leaves', String(kvm.getSupportedCpuid().length)],
    ['saved MSRs', String(kvm.getMsrIndexList().length)],
  ];
  for (const [label, cap] of CAPABILITIES) {
    const value = kvm.checkExtension(cap);
    rows.push([label, value === 0 ? 'no' : value === 1 ? 'yes' : String(value)]);
  }
  if (json) {
    console.log(JSON.stringify(Object.fromEntries(rows), null, 2));
    return;
  }
  const width = Math.max(...rows.map(([label]) => label.length));
  for (const [label, value] of rows) console.log(`${label.padEnd(width)}  ${value}`);
}
