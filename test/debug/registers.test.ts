// Register encoding for gdb: the g packet's layout for x86-64 and i386, p/P, the tag word, and
// the target descriptions gdb reads.
import t from 'tap';
import { kvmFpu, kvmRegs, kvmSregs } from '../../lib/kvm/structs.js';
import { fpuFromXsave, fpuIntoXsave } from '../../lib/vmm/xsave-fpu.js';
import {
  abridgedTagWord, archFor, decodeRegister, decodeRegisters, encodeRegister, encodeRegisters, fullTagWord, registerCount, registerNames,
  targetDescription, type VcpuRegisters,
} from '../../lib/debug/registers.js';

function blank(): VcpuRegisters {
  return { regs: kvmRegs.decode(new Uint8Array(kvmRegs.size)), sregs: kvmSregs.decode(new Uint8Array(kvmSregs.size)), fpu: kvmFpu.decode(new Uint8Array(kvmFpu.size)) };
}

/** Little-endian hex of `value` in `bytes` bytes. */
const le = (value: bigint, bytes: number) => Buffer.from(Array.from({ length: bytes }, (_, i) => Number((value >> BigInt(8 * i)) & 0xffn))).toString('hex');

t.test('x86-64: the g packet is 600 bytes in gdb amd64 order', async (t) => {
  const state = blank();
  state.regs.rax = 0x1122334455667788n;
  state.regs.rbp = 0xbbn;
  state.regs.r15 = 0xf15n;
  state.regs.rip = 0xffffffff81000000n;
  state.regs.rflags = 0x246n;
  state.sregs.cs.selector = 0x10;
  state.sregs.gs.selector = 0x2b;
  state.fpu.fcw = 0x37f;
  state.fpu.mxcsr = 0x1f80;
  state.fpu.xmm[0] = 0xaa;
  state.sregs.fs.base = 0x7000n;
  state.sregs.cr0 = 0x80000011n;
  state.sregs.efer = 0x500n;
  const hex = encodeRegisters('i386:x86-64', state);
  t.equal(hex.length, 1200);
  t.equal(registerCount('i386:x86-64'), 65);
  const names = registerNames('i386:x86-64');
  t.same(names.slice(0, 24), ['rax', 'rbx', 'rcx', 'rdx', 'rsi', 'rdi', 'rbp', 'rsp', 'r8', 'r9', 'r10', 'r11', 'r12', 'r13', 'r14', 'r15', 'rip', 'eflags', 'cs', 'ss', 'ds', 'es', 'fs', 'gs']);
  t.same(names.slice(-8), ['fs_base', 'gs_base', 'cr0', 'cr2', 'cr3', 'cr4', 'cr8', 'efer']);
  t.equal(hex.slice(0, 16), le(0x1122334455667788n, 8), 'rax first');
  t.equal(hex.slice(6 * 16, 7 * 16), le(0xbbn, 8), 'rbp sixth');
  t.equal(hex.slice(16 * 16, 17 * 16), le(0xffffffff81000000n, 8), 'rip after r15');
  t.equal(hex.slice(17 * 16, 17 * 16 + 8), le(0x246n, 4), 'eflags, 32 bits');
  t.equal(encodeRegister('i386:x86-64', state, names.indexOf('cs')), le(0x10n, 4));
  t.equal(encodeRegister('i386:x86-64', state, names.indexOf('gs')), le(0x2bn, 4));
  t.equal(encodeRegister('i386:x86-64', state, names.indexOf('fctrl')), le(0x37fn, 4));
  t.equal(encodeRegister('i386:x86-64', state, names.indexOf('xmm0')), le(0xaan, 16));
  t.equal(encodeRegister('i386:x86-64', state, names.indexOf('mxcsr')), le(0x1f80n, 4));
  t.equal(encodeRegister('i386:x86-64', state, names.indexOf('fs_base')), le(0x7000n, 8));
  t.equal(encodeRegister('i386:x86-64', state, names.indexOf('cr0')), le(0x80000011n, 8));
  t.equal(encodeRegister('i386:x86-64', state, names.indexOf('efer')), le(0x500n, 8));
  t.equal(encodeRegister('i386:x86-64', state, 65), null, 'no register 65');
  // G with the same bytes changes nothing; with one changed, that register only.
  const copy = blank();
  t.ok(decodeRegisters('i386:x86-64', copy, hex));
  t.same(copy, state);
  t.ok(decodeRegisters('i386:x86-64', copy, le(0x42n, 8)), 'a shorter G sets the registers it covers');
  t.equal(copy.regs.rax, 0x42n);
  t.equal(copy.regs.rbx, 0n);
  t.notOk(decodeRegisters('i386:x86-64', copy, '123'), 'not whole registers');
  t.notOk(decodeRegisters('i386:x86-64', copy, 'zz'.repeat(8)), 'not hex');
});

t.test('i386: eax ecx edx ebx esp ebp esi edi eip, 32 bits each, the high halves kept on write', async (t) => {
  const state = blank();
  state.regs.rax = 0xdead00000000beefn;
  state.regs.rcx = 1n;
  state.regs.rbx = 3n;
  state.regs.rip = 0x100000n;
  const names = registerNames('i386');
  t.same(names.slice(0, 10), ['eax', 'ecx', 'edx', 'ebx', 'esp', 'ebp', 'esi', 'edi', 'eip', 'eflags']);
  t.equal(names.filter((name) => name.startsWith('xmm')).length, 8);
  const hex = encodeRegisters('i386', state);
  t.equal(hex.slice(0, 8), le(0xbeefn, 4));
  t.equal(hex.slice(8, 16), le(1n, 4), 'ecx second');
  t.equal(hex.slice(24, 32), le(3n, 4), 'ebx fourth');
  t.equal(hex.slice(64, 72), le(0x100000n, 4), 'eip ninth');
  t.ok(decodeRegister('i386', state, 0, le(0x1234n, 4)));
  t.equal(state.regs.rax, 0xdead000000001234n);
  t.notOk(decodeRegister('i386', state, 0, le(1n, 8)), 'a value of the wrong width');
  t.notOk(decodeRegister('i386', state, 500, le(1n, 4)), 'an unknown number');
});

t.test('the description follows EFER.LMA', async (t) => {
  const state = blank();
  t.equal(archFor(state.sregs), 'i386', 'real mode');
  state.sregs.cr0 = 1n;
  t.equal(archFor(state.sregs), 'i386', 'protected mode');
  state.sregs.efer = 0x500n;
  t.equal(archFor(state.sregs), 'i386:x86-64', 'long mode');
});

t.test('the x87 tag word: empty, valid, zero and special from FXSAVE\'s abridged one', async (t) => {
  const state = blank();
  const fpu = state.fpu;
  // TOP = 6: ST0 is physical register 6, ST1 physical 7, ST2 physical 0.
  fpu.fsw = 6 << 11;
  fpu.fpr.set([0, 0, 0, 0, 0, 0, 0, 0x80, 0xff, 0x3f], 0); // ST0 = 1.0 (valid)
  // ST1 = +0 (zero); ST2 = infinity (special)
  fpu.fpr.set([0, 0, 0, 0, 0, 0, 0, 0x80, 0xff, 0x7f], 32);
  fpu.ftwx = (1 << 6) | (1 << 7) | (1 << 0);
  const tags = fullTagWord(fpu);
  t.equal((tags >> 12) & 3, 0, 'physical 6 (ST0) valid');
  t.equal((tags >> 14) & 3, 1, 'physical 7 (ST1) zero');
  t.equal(tags & 3, 2, 'physical 0 (ST2) special');
  for (let p = 1; p <= 5; p++) t.equal((tags >> (p * 2)) & 3, 3, `physical ${p} empty`);
  t.equal(abridgedTagWord(tags), fpu.ftwx);
  t.equal(abridgedTagWord(0xffff), 0);
  const names = registerNames('i386:x86-64');
  t.equal(encodeRegister('i386:x86-64', state, names.indexOf('st0')), '0000000000000080ff3f');
});

t.test('target descriptions name the architecture and the features gdb checks', async (t) => {
  for (const arch of ['i386:x86-64', 'i386'] as const) {
    const xml = targetDescription(arch);
    t.match(xml, `<architecture>${arch}</architecture>`);
    for (const feature of ['org.gnu.gdb.i386.core', 'org.gnu.gdb.i386.sse', 'org.gnu.gdb.i386.sys']) t.match(xml, `<feature name="${feature}">`);
    // gdb 13 (GNU/Linux OS ABI) fails an assertion on an i386 description with segments, and
    // rejects an empty feature it knows.
    if (arch === 'i386') t.notMatch(xml, 'org.gnu.gdb.i386.segments');
    else t.match(xml, '<feature name="org.gnu.gdb.i386.segments"><reg name="fs_base"');
    t.equal([...xml.matchAll(/<reg /g)].length, registerCount(arch));
    t.notMatch(xml, /[#$*}]/, 'nothing to escape');
  }
  t.match(targetDescription('i386:x86-64'), '<reg name="rip" bitsize="64" type="code_ptr" regnum="16"/>');
  t.match(targetDescription('i386'), '<reg name="eip" bitsize="32" type="code_ptr" regnum="8"/>');
});

t.test('the x87/SSE state round-trips through the XSAVE legacy region, which is then marked present', async (t) => {
  const region = new Uint8Array(4096);
  const view = new DataView(region.buffer);
  view.setUint16(0, 0x37f, true);
  view.setUint32(24, 0x1f80, true);
  region[32] = 0x11; // ST0's low byte
  region[160 + 16] = 0x22; // xmm1's low byte
  const fpu = fpuFromXsave(region);
  t.equal(fpu.fcw, 0x37f);
  t.equal(fpu.mxcsr, 0x1f80);
  t.equal(fpu.fpr[0], 0x11);
  t.equal(fpu.xmm[16], 0x22);
  fpu.mxcsr = 0x1fc0;
  fpu.xmm[0] = 0x33;
  fpuIntoXsave(fpu, region);
  t.equal(view.getUint32(24, true), 0x1fc0);
  t.equal(region[160], 0x33);
  t.equal(view.getBigUint64(512, true), 3n, 'XSTATE_BV: x87 and SSE');
});
