// virtio-vsock packets (virtio 1.2 5.10.6): the 44-byte little-endian header every packet on the
// RX and TX queues starts with, and the protocol's numbers.

export const VIRTIO_ID_VSOCK = 19;
/** The host's address: a guest reaches the VMM's side at CID 2 (VMADDR_CID_HOST). */
export const VSOCK_HOST_CID = 2;
export const VSOCK_HEADER_BYTES = 44;
export const VSOCK_TYPE_STREAM = 1;
export const VsockOp = { Request: 1, Response: 2, Rst: 3, Shutdown: 4, Rw: 5, CreditUpdate: 6, CreditRequest: 7 } as const;
/** SHUTDOWN flags: the sender will receive (RCV) or send (SEND) no more. */
export const VsockShutdown = { Rcv: 1, Send: 2 } as const;
/** The only event (virtio 1.2 5.10.6.7): the guest must drop its connections. */
export const VSOCK_EVENT_TRANSPORT_RESET = 0;
export const VSOCK_EVENT_BYTES = 4;

const U32 = 0x1_0000_0000;

/** One packet header, decoded (CIDs as numbers: a CID above 2^53 is nobody's here). */
export class VsockHeader {
  srcCid = 0;
  dstCid = 0;
  srcPort = 0;
  dstPort = 0;
  len = 0;
  type = VSOCK_TYPE_STREAM;
  op = 0;
  flags = 0;
  bufAlloc = 0;
  fwdCnt = 0;

  decode(bytes: Uint8Array): this {
    const view = new DataView(bytes.buffer, bytes.byteOffset, VSOCK_HEADER_BYTES);
    this.srcCid = view.getUint32(0, true) + view.getUint32(4, true) * U32;
    this.dstCid = view.getUint32(8, true) + view.getUint32(12, true) * U32;
    this.srcPort = view.getUint32(16, true);
    this.dstPort = view.getUint32(20, true);
    this.len = view.getUint32(24, true);
    this.type = view.getUint16(28, true);
    this.op = view.getUint16(30, true);
    this.flags = view.getUint32(32, true);
    this.bufAlloc = view.getUint32(36, true);
    this.fwdCnt = view.getUint32(40, true);
    return this;
  }

  encode(bytes: Uint8Array): Uint8Array {
    const view = new DataView(bytes.buffer, bytes.byteOffset, VSOCK_HEADER_BYTES);
    view.setUint32(0, this.srcCid % U32, true);
    view.setUint32(4, Math.floor(this.srcCid / U32), true);
    view.setUint32(8, this.dstCid % U32, true);
    view.setUint32(12, Math.floor(this.dstCid / U32), true);
    view.setUint32(16, this.srcPort >>> 0, true);
    view.setUint32(20, this.dstPort >>> 0, true);
    view.setUint32(24, this.len >>> 0, true);
    view.setUint16(28, this.type, true);
    view.setUint16(30, this.op, true);
    view.setUint32(32, this.flags >>> 0, true);
    view.setUint32(36, this.bufAlloc >>> 0, true);
    view.setUint32(40, this.fwdCnt >>> 0, true);
    return bytes;
  }
}

/** A packet for the guest: a header (src/dst filled by the muxer) and, for RW, its payload. */
export interface VsockOutgoing {
  header: VsockHeader;
  payload: Uint8Array | null;
}
