// The ACPI PM block's register logic, without a VM: the timer's value, width and wrap, PM1 status
// write-1-to-clear and TMR_STS, the enable bits, PM1 control (SCI_EN, power-off on _S5, other
// sleep types refused), and the counter carried across saveState()/restoreState().
import t from 'tap';
import { AcpiPm, hostTicks, PM_TIMER_HZ, type AcpiPmState } from '../../lib/devices/acpi-pm.js';

const PM1_STS = 0;
const PM1_EN = 2;
const PM1_CNT = 4;
const PM_TMR = 8;

function device() {
  const events = { powerOffs: 0, logs: [] as string[] };
  const pm = new AcpiPm(AcpiPm.createShared(), { powerOff: () => events.powerOffs++, log: (message) => events.logs.push(message) });
  return { pm, events };
}

const state = (fields: Partial<AcpiPmState>): AcpiPmState => ({ status: 0, enable: 0, control: 1, counter: 0, ...fields });

/** Reads the timer until `done(value)` or about `budgetMs` passes; returns the values read. */
function readUntil(pm: AcpiPm, done: (value: number) => boolean, budgetMs = 200): number[] {
  const values: number[] = [];
  const deadline = performance.now() + budgetMs;
  do values.push(pm.read(PM_TMR, 4));
  while (!done(values.at(-1)!) && performance.now() < deadline);
  return values;
}

t.test('the host clock in ticks: exactly CLOCK_MONOTONIC times 3.579545 MHz, never backwards', async (t) => {
  const ticksAt = (ns: bigint) => Number((ns * BigInt(PM_TIMER_HZ)) / 1_000_000_000n);
  let outside = 0;
  let backwards = 0;
  let last = 0;
  for (let i = 0; i < 100_000; i++) {
    const before = process.hrtime.bigint();
    const ticks = hostTicks();
    const after = process.hrtime.bigint();
    if (ticks < ticksAt(before) || ticks > ticksAt(after)) outside++;
    if (ticks < last) backwards++;
    last = ticks;
  }
  t.equal(outside, 0, 'each value lies between the BigInt computation before and after it');
  t.equal(backwards, 0);
});

t.test('the timer: 24 bits in a dword, never backwards, wraps at 2^24', async (t) => {
  const { pm } = device();
  pm.restoreState(state({ counter: 0xffffff - 20_000 }));
  const values = readUntil(pm, (value) => value < 0x800000);
  t.ok(values.every((value) => value >= 0 && value <= 0xffffff), 'the upper 8 bits read 0');
  const wrapAt = values.findIndex((value) => value < 0x800000);
  t.ok(wrapAt > 0, `wrapped after ${wrapAt} reads`);
  t.ok(values[wrapAt - 1]! >= 0xffffff - 20_000 && values[wrapAt]! < 0x10000, `0x${values[wrapAt - 1]!.toString(16)} then 0x${values[wrapAt]!.toString(16)}`);
  for (let i = 1; i < values.length; i++) {
    if (((values[i]! - values[i - 1]!) & 0xffffff) >= 0x800000) t.fail(`backwards at read ${i}: ${values[i - 1]} then ${values[i]}`);
  }
});

t.test('narrower reads of the timer return its bytes; its top byte is 0', async (t) => {
  const { pm } = device();
  pm.restoreState(state({ counter: 0x120000 }));
  t.equal(pm.read(PM_TMR + 3, 1), 0);
  t.equal(pm.read(PM_TMR + 2, 2), 0x12, 'bits 16-31: the counter has not reached 0x130000 in a few microseconds');
  t.equal(pm.read(PM_TMR + 2, 1), 0x12);
  const word = pm.read(PM_TMR, 2);
  const dword = pm.read(PM_TMR, 4);
  t.ok(dword - (0x120000 | word) >= 0 && dword - (0x120000 | word) < 0x10000, `word 0x${word.toString(16)}, then dword 0x${dword.toString(16)}`);
  t.equal(pm.read(12, 1), 0xff, 'past the block: nothing');
});

t.test('PM1 control: SCI_EN always reads 1, SLP_EN with _S5 powers off, other sleep types are refused once with a log line', async (t) => {
  const { pm, events } = device();
  t.equal(pm.read(PM1_CNT, 2), 1, 'SCI_EN');
  pm.write(PM1_CNT, 2, 0);
  t.equal(pm.read(PM1_CNT, 2), 1, 'SCI_EN cannot be cleared: ACPI mode is always on');
  pm.write(PM1_CNT, 2, 0x2000 | (5 << 10));
  pm.write(PM1_CNT, 2, 0x2000 | (1 << 10));
  t.equal(events.powerOffs, 0, 'S1 and S3 types do not power off');
  t.same(events.logs, ['acpi-pm: sleep type 5 is not supported; the guest keeps running'], 'one line, however many tries');
  t.equal(pm.read(PM1_CNT, 2), 1 | (1 << 10), 'SLP_TYP reads back, SLP_EN is write-only');
  pm.write(PM1_CNT, 2, 1 << 10);
  t.equal(events.powerOffs, 0, 'SLP_TYP without SLP_EN does nothing');
  pm.write(PM1_CNT, 2, 0x2000);
  t.equal(events.powerOffs, 1, 'outw(0x604, 0x2000) powers off');
  pm.write(PM1_CNT + 1, 1, 0x20);
  t.equal(events.powerOffs, 2, 'so does a byte write of SLP_EN to the high byte');
  pm.write(PM1_STS, 4, 0x2000_0000);
  t.equal(events.powerOffs, 2, 'a dword write at PM1_STS reaches PM1_EN, not PM1_CNT');
});

t.test('PM1 status: write 1 to clear; TMR_STS sets when bit 23 of the counter changes', async (t) => {
  const { pm } = device();
  pm.restoreState(state({ status: 0x8101, counter: 0 }));
  t.equal(pm.read(PM1_STS, 2), 0x8101, 'WAK, PWRBTN and TMR as restored');
  pm.write(PM1_STS, 2, 0x0100);
  t.equal(pm.read(PM1_STS, 2), 0x8001, 'PWRBTN cleared, the others stay');
  pm.write(PM1_STS, 2, 0x8001);
  t.equal(pm.read(PM1_STS, 2), 0, 'TMR_STS and WAK_STS cleared');
  pm.restoreState(state({ status: 0xffff, counter: 0 }));
  t.equal(pm.read(PM1_STS, 2), 0x8731, 'only the defined bits: WAK, RTC, SLPBTN, PWRBTN, GBL, BM, TMR');
  pm.write(PM1_STS, 2, 0xffff);
  pm.restoreState(state({ counter: 0x7fffff - 20_000 }));
  t.equal(pm.read(PM1_STS, 2) & 1, 0, 'no carry yet');
  readUntil(pm, (value) => value >= 0x800000);
  t.equal(pm.read(PM1_STS, 2) & 1, 1, 'TMR_STS once bit 23 changed');
  pm.write(PM1_STS, 1, 1);
  t.equal(pm.read(PM1_STS, 2) & 1, 0, 'and clears');
  t.equal(pm.saveState().status & 1, 0);
});

t.test('PM1 enable: the defined bits are kept; a dword read of PM1_EVT_BLK has status low, enable high', async (t) => {
  const { pm } = device();
  pm.write(PM1_EN, 2, 0xffff);
  t.equal(pm.read(PM1_EN, 2), 0x0721);
  pm.write(PM1_EN, 1, 0x01);
  t.equal(pm.read(PM1_EN, 2), 0x0701, 'a byte write changes one byte');
  t.equal(pm.read(PM1_STS, 4), 0x0701 << 16);
});

t.test('saveState/restoreState: the counter goes on from the saved value, however long the pause', async (t) => {
  const { pm } = device();
  pm.write(PM1_EN, 2, 0x0001);
  pm.write(PM1_CNT, 2, 3 << 10);
  const saved = pm.saveState();
  t.match(saved, { enable: 1, control: 1 | (3 << 10) });
  // Time passes (a snapshot on disk, a migration): the restored counter does not jump.
  const until = performance.now() + 20;
  while (performance.now() < until);
  const { pm: restored } = device();
  restored.restoreState(saved);
  const first = restored.read(PM_TMR, 4);
  t.ok(((first - saved.counter) & 0xffffff) < PM_TIMER_HZ / 1000, `saved 0x${saved.counter.toString(16)}, read 0x${first.toString(16)} right after the restore: less than 1 ms on`);
  t.same({ enable: restored.read(PM1_EN, 2), control: restored.read(PM1_CNT, 2) }, { enable: 1, control: 1 | (3 << 10) });
});
