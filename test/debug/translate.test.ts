// Page walks for gdb's virtual addresses over hand-built tables: no paging, 32-bit (4 KiB and
// 4 MiB pages), PAE, 4-level (2 MiB and 1 GiB pages) and 5-level, faults for absent entries,
// non-canonical addresses and tables outside RAM.
import t from 'tap';
import { bytesInPage, pagingMode, translate, type PagingState } from '../../lib/debug/translate.js';

const RAM_BYTES = 1 << 20;

/** 1 MiB of "guest RAM" with entry writers, and the reader translate() takes. */
function ram() {
  const view = new DataView(new ArrayBuffer(RAM_BYTES));
  return {
    set32: (address: number, value: number) => view.setUint32(address, value, true),
    set64: (address: number, value: bigint) => view.setBigUint64(address, value, true),
    read: (address: bigint, bytes: 4 | 8) => {
      if (address + BigInt(bytes) > BigInt(RAM_BYTES)) return null;
      return bytes === 8 ? view.getBigUint64(Number(address), true) : BigInt(view.getUint32(Number(address), true));
    },
  };
}

const CR0_PG = 0x80000001n;
const P_RW = 0x3n;
const PS = 0x80n;

t.test('no paging: linear is physical, 32 bits wide', async (t) => {
  const state: PagingState = { cr0: 1n, cr3: 0n, cr4: 0n, efer: 0n };
  t.equal(pagingMode(state), 'none');
  t.equal(translate(0x7c00n, state, ram().read), 0x7c00n);
  t.equal(translate(0x1_0000_7c00n, state, ram().read), 0x7c00n);
});

t.test('32-bit paging: 4 KiB pages, 4 MiB pages with PSE (and PSE-36 bits)', async (t) => {
  const m = ram();
  const state: PagingState = { cr0: CR0_PG, cr3: 0x1000n, cr4: 0x10n, efer: 0n };
  t.equal(pagingMode(state), '32-bit');
  // 0xc0001234 -> PDE 0x300 -> table 0x2000, PTE 1 -> frame 0x5000.
  m.set32(0x1000 + 0x300 * 4, 0x2000 | 3);
  m.set32(0x2000 + 1 * 4, 0x5000 | 3);
  t.equal(translate(0xc0001234n, state, m.read), 0x5234n);
  // A 4 MiB page at PDE 1 whose frame is 0x1_0040_0000 (bit 32 from PDE bit 13).
  m.set32(0x1000 + 1 * 4, 0x00400000 | (1 << 13) | 0x83);
  t.equal(translate(0x00512345n, state, m.read), 0x1_0051_2345n);
  // Without CR4.PSE, PS is ignored: the entry is a table (at 0x400000, outside RAM).
  t.equal(translate(0x00512345n, { ...state, cr4: 0n }, m.read), null, 'a table outside RAM faults');
  t.equal(translate(0x00000000n, state, m.read), null, 'an absent PDE faults');
  t.equal(translate(0xc0002000n, state, m.read), null, 'an absent PTE faults');
});

t.test('PAE: four PDPTEs, 2 MiB and 4 KiB pages', async (t) => {
  const m = ram();
  const state: PagingState = { cr0: CR0_PG, cr3: 0x1020n, cr4: 0x20n, efer: 0n };
  t.equal(pagingMode(state), 'pae');
  m.set64(0x1020 + 3 * 8, 0x3000n | 1n); // PDPTE 3 (0xc0000000-)
  m.set64(0x3000 + 1 * 8, 0x00600000n | P_RW | PS); // 2 MiB page at 0x600000 for 0xc0200000
  m.set64(0x3000 + 2 * 8, 0x4000n | P_RW); // a table for 0xc0400000
  m.set64(0x4000 + 5 * 8, 0x8000_0000_0009_9000n | P_RW); // NX set: not part of the address
  t.equal(translate(0xc0212345n, state, m.read), 0x612345n);
  t.equal(translate(0xc0405678n, state, m.read), 0x99678n);
  t.equal(translate(0x00001000n, state, m.read), null, 'PDPTE 0 absent');
});

t.test('4-level: 1 GiB, 2 MiB and 4 KiB pages, canonical addresses only', async (t) => {
  const m = ram();
  const state: PagingState = { cr0: CR0_PG, cr3: 0x1000n, cr4: 0x20n, efer: 0x500n };
  t.equal(pagingMode(state), '4-level');
  // Higher half: 0xffff_8000_0000_0000 is PML4 index 256.
  m.set64(0x1000 + 256 * 8, 0x2000n | P_RW);
  m.set64(0x2000 + 0 * 8, 0x4000_0000n | P_RW | PS); // 1 GiB page at 1 GiB
  m.set64(0x2000 + 1 * 8, 0x3000n | P_RW);
  m.set64(0x3000 + 0 * 8, 0x0060_0000n | P_RW | PS); // 2 MiB page at 6 MiB
  m.set64(0x3000 + 1 * 8, 0x5000n | P_RW);
  m.set64(0x5000 + 2 * 8, 0x7000n | P_RW);
  t.equal(translate(0xffff_8000_1234_5678n, state, m.read), 0x5234_5678n);
  t.equal(translate(0xffff_8000_4012_3456n, state, m.read), 0x72_3456n);
  t.equal(translate(0xffff_8000_4020_2abcn, state, m.read), 0x7abcn);
  t.equal(translate(0x0000_8000_0000_0000n, state, m.read), null, 'not canonical');
  t.equal(translate(0xffff_0000_0000_0000n, state, m.read), null, 'not canonical either');
  t.equal(translate(0x1000n, state, m.read), null, 'PML4 0 absent');
});

t.test('5-level (CR4.LA57): one more level, 57-bit canonical addresses', async (t) => {
  const m = ram();
  const state: PagingState = { cr0: CR0_PG, cr3: 0x1000n, cr4: 0x20n | 0x1000n, efer: 0x500n };
  t.equal(pagingMode(state), '5-level');
  // 0xff00_0000_0000_0000: PML5 index 256; 0x0000_8000_0000_0000 is canonical here (PML5 1).
  m.set64(0x1000 + 256 * 8, 0x2000n | P_RW);
  m.set64(0x2000, 0x3000n | P_RW);
  m.set64(0x3000, 0x4000_0000n | P_RW | PS);
  t.equal(translate(0xff00_0000_0000_0042n, state, m.read), 0x4000_0042n);
  t.equal(translate(0x0000_8000_0000_0000n, state, m.read), null, 'canonical, but PML5 1 is absent');
  t.equal(translate(0xfe00_0000_0000_0000n, state, m.read), null, 'not canonical in 57 bits');
});

t.test('a range splits at page boundaries', async (t) => {
  t.equal(bytesInPage(0x1ff0n, 64), 16);
  t.equal(bytesInPage(0x2000n, 64), 64);
  t.equal(bytesInPage(0x2000n, 0x3000), 0x1000);
});
