// The x87/SSE state as a debugger reads and writes it, taken from the XSAVE area's legacy region
// (the FXSAVE layout, Intel SDM vol. 1, 10.5.1) rather than KVM_GET_FPU: some hosts (kvm_pvm)
// report mxcsr as 0 there and do not apply what KVM_SET_FPU writes to the state the guest runs on.
import type { Fpu } from '../kvm/index.js';

const FCW = 0;
const FSW = 2;
const FTW = 4;
const FOP = 6;
const FIP = 8;
const FDP = 16;
const MXCSR = 24;
const ST0 = 32;
const XMM0 = 160;
/** The XSAVE header's XSTATE_BV: which components the area holds (bit 0 x87, bit 1 SSE). */
const XSTATE_BV = 512;
const X87_AND_SSE = 3n;

export function fpuFromXsave(region: Uint8Array): Fpu {
  const view = new DataView(region.buffer, region.byteOffset, region.byteLength);
  return {
    fpr: region.slice(ST0, ST0 + 128),
    fcw: view.getUint16(FCW, true),
    fsw: view.getUint16(FSW, true),
    ftwx: region[FTW]!,
    lastOpcode: view.getUint16(FOP, true),
    lastIp: view.getBigUint64(FIP, true),
    lastDp: view.getBigUint64(FDP, true),
    xmm: region.slice(XMM0, XMM0 + 256),
    mxcsr: view.getUint32(MXCSR, true),
  };
}

/**
 * Writes `fpu` into the legacy region of `region` (in place), leaving the rest of the area as it
 * is, and marks x87 and SSE present: a component XSTATE_BV leaves out is restored to its initial
 * state whatever the region says.
 */
export function fpuIntoXsave(fpu: Fpu, region: Uint8Array): void {
  const view = new DataView(region.buffer, region.byteOffset, region.byteLength);
  region.set(fpu.fpr.subarray(0, 128), ST0);
  view.setUint16(FCW, fpu.fcw, true);
  view.setUint16(FSW, fpu.fsw, true);
  region[FTW] = fpu.ftwx;
  view.setUint16(FOP, fpu.lastOpcode, true);
  view.setBigUint64(FIP, fpu.lastIp, true);
  view.setBigUint64(FDP, fpu.lastDp, true);
  region.set(fpu.xmm.subarray(0, 256), XMM0);
  view.setUint32(MXCSR, fpu.mxcsr, true);
  if (region.byteLength >= XSTATE_BV + 8) view.setBigUint64(XSTATE_BV, view.getBigUint64(XSTATE_BV, true) | X87_AND_SSE, true);
}
