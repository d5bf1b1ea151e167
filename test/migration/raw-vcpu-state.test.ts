// Stream version 3: VcpuState sections may hold a vCPU's raw state (KVM's structs). The reader
// takes one checked whole and copied out of the stream's buffer, refuses a damaged one before
// anything is applied, and still reads version 2 streams (JSON states only).
import t from 'tap';
import { encodeCpuid } from '../../lib/index.js';
import { crc32c } from '../../lib/migration/checksum.js';
import { SectionType, STREAM_VERSION, decodeHeader, encodeHeader, encodeSection, viewOf } from '../../lib/migration/format.js';
import { StateSectionReader, encodeStateSections } from '../../lib/migration/state-sections.js';
import { SectionParser } from '../../lib/migration/section-parser.js';
import { guestImage, noKvm, realModeMachine } from '../helpers/kvm.js';

t.test('a version 2 header is still read', async (t) => {
  const bytes = encodeHeader({ kind: 'snapshot', memoryBytes: 8192, vcpuCount: 1 });
  t.equal(STREAM_VERSION, 4);
  viewOf(bytes).setUint32(8, 2, true);
  viewOf(bytes).setUint32(64, crc32c(bytes.subarray(0, 64)), true);
  t.equal(decodeHeader(bytes).version, 2);
});

t.test('raw VcpuState sections: taken checked and copied, refused when damaged', { skip: noKvm }, async (t) => {
  const m = realModeMachine(guestImage('hello'), { setup: (vm) => vm.createIrqChip() });
  t.teardown(() => m.close());
  const cpuid = encodeCpuid(m.kvm.getSupportedCpuid());
  m.vcpu.setCpuid2(cpuid);
  const raw = m.vcpu.saveState(Uint32Array.of(0x174), cpuid, { lapic: true, vmmHalted: false });
  const sections = encodeStateSections({ machine: { memoryBytes: 8192, vcpus: 1 }, vm: { clock: {} }, vcpus: [raw], devices: {} });
  t.equal(sections.length, 4);

  const read = (chunks: Uint8Array[]) => {
    const reader = new StateSectionReader('the stream', 1);
    const parser = new SectionParser({ section: (section) => void reader.take(section) });
    // One reused buffer, as a socket's: what the reader keeps must be its own copy.
    const buffer = Buffer.alloc(64 * 1024);
    for (const chunk of chunks) {
      buffer.set(chunk);
      parser.push(buffer.subarray(0, chunk.length));
      buffer.fill(0xee);
    }
    return reader.finish();
  };
  const parts = read(sections);
  t.same(Buffer.from(parts.vcpus[0] as Uint8Array), Buffer.from(raw), 'the raw state, intact after its buffer was reused');

  const damaged = raw.slice();
  new DataView(damaged.buffer).setUint32(16, 99, true); // the section count
  const bad = encodeStateSections({ machine: { memoryBytes: 8192, vcpus: 1 }, vm: { clock: {} }, vcpus: [damaged], devices: {} });
  t.throws(() => read(bad), { name: 'MigrationError', code: 'EFORMAT', message: /the VcpuState section of vCPU 0 is malformed: truncated/ });
  // Not raw and not JSON either.
  const junk = [sections[0]!, sections[1]!, encodeSection(SectionType.VcpuState, new Uint8Array([0x4b, 0x56, 0x43])), sections[3]!];
  t.throws(() => read(junk), { name: 'MigrationError', code: 'EFORMAT' });
});
