// The package as a consumer holds it: a scratch TypeScript project whose node_modules/node-kvm
// is this package (resolved through its package.json "exports" and "types", so against the built
// dist/), compiles a file that imports every public name from 'node-kvm' and uses the README's
// examples with `tsc --noEmit`; and at run time each value export is on the package root.
// (It checks dist/ as built: after changing lib/, run `npm run build:ts` first, as `npm ci` does.)
import { execFile } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import t from 'tap';
import { repoRoot } from '../helpers/kvm.js';

const run = promisify(execFile);

/** Every value the package root exports, and what `typeof` says of it. */
const VALUES: Record<string, 'function' | 'object' | 'number' | 'string' | 'bigint'> = {
  // the VMM
  Machine: 'function', VcpuWorkerPool: 'function', startVcpuThread: 'function', MAX_MEMORY_BYTES: 'number', MAX_VCPUS: 'number',
  CONSOLE_BACKLOG_BYTES: 'number', IoBus: 'function', createBusShared: 'function', unknownAccesses: 'function',
  MAX_LOGGED_UNKNOWN_PORTS: 'number', MAX_LOGGED_UNKNOWN_MMIO: 'number', VIRTIO_MMIO_BASE: 'number', VIRTIO_MMIO_SIZE: 'number',
  VIRTIO_FIRST_GSI: 'number', VIRTIO_MAX_DEVICES: 'number', VsockHost: 'function',
  DirtyTracker: 'function', DirtyBitmap: 'function', MAX_BITMAP_PAGES: 'number', dirtyLogModesOffered: 'function', maxDirtyRingBytes: 'function',
  DEFAULT_DIRTY_RING_BYTES: 'number',
  // snapshots and migration
  snapshotMachine: 'function', restoreMachine: 'function', prepareRestore: 'function', migrateMachine: 'function', receiveMachine: 'function', MigrationError: 'function', PostcopyPausedError: 'function',
  MigrationErrorCode: 'object', STREAM_VERSION: 'number', formatMigrationAddress: 'function', parseMigrationAddress: 'function',
  MAX_SNAPSHOT_CHAIN: 'number', loadSnapshotMemory: 'function', openSnapshotChain: 'function', readSnapshotFile: 'function',
  verifyRamImage: 'function', writeSnapshotFile: 'function',
  // the KVM binding
  Kvm: 'function', KVM_API_VERSION: 'number', Vm: 'function', Vcpu: 'function', kickVcpu: 'function', harvestDirtyRing: 'function', adoptVcpu: 'function', closeReleasedVcpu: 'function',
  GuestMemory: 'function', Userfaultfd: 'function', EventFd: 'function', watchFd: 'function', setThreadName: 'function', setThreadAffinity: 'function', setThreadBatch: 'function', openTap: 'function', adoptTap: 'function', KvmError: 'function',
  NodeKvmError: 'function', ErrorCode: 'object', KvmRun: 'function', KvmRunOffset: 'object', decodeExit: 'function', encodeCpuid: 'function',
  encodeMsrs: 'function', structs: 'object', PAGE_SIZE: 'number', ExitReason: 'object', Cap: 'object', MemoryFlag: 'object',
  DirtyLogManual: 'object', DirtyGfnFlag: 'object', IrqChip: 'object', MpState: 'object', GuestDebugFlag: 'object', Msr: 'object',
  IoDirection: 'object', IoeventfdFlag: 'object', IrqfdFlag: 'object', IrqRoutingType: 'object', ClockFlag: 'object',
  SystemEventType: 'object', VcpuEventValid: 'object', InternalErrorSuberror: 'object', PIT_SPEAKER_DUMMY: 'number',
  COALESCED_MMIO_PAGE_OFFSET: 'number', DIRTY_LOG_PAGE_OFFSET: 'number',
  // booting
  planBoot: 'function', writeBootPlan: 'function', DEFAULT_LOAD_ADDR: 'number', Selector: 'object', applyBootState: 'function',
  guestCpuid: 'function', bootMsrs: 'function', PAT_DEFAULT: 'bigint', memoryMap: 'function', MemoryType: 'object', GDT_ADDR: 'number',
  GUEST_PARAMS_ADDR: 'number', BOOT_INFO_ADDR: 'number', PAGE_TABLES_ADDR: 'number', ZERO_PAGE_ADDR: 'number', LINUX_CMDLINE_ADDR: 'number',
  HVM_START_MAGIC: 'number', MAX_CMDLINE_BYTES: 'number', MULTIBOOT_HEADER_MAGIC: 'number', MULTIBOOT_BOOTLOADER_MAGIC: 'number',
  XEN_ELFNOTE_PHYS32_ENTRY: 'number', isBzImage: 'function', parseSetupHeader: 'function', planBzImage: 'function', HDRS_MAGIC: 'number',
  LinuxSelector: 'object', LoadFlag: 'object', XLoadFlag: 'object', LOADER_TYPE_UNDEFINED: 'number', buildInitramfs: 'function',
  CPIO_NEWC_MAGIC: 'string', CPIO_TRAILER: 'string', BootImageError: 'function',
  guestPath: 'function', guestImages: 'function',
  // debugging
  GdbServer: 'function', DebugTarget: 'function', BREAKPOINT_SLOTS: 'number', parseGdbAddress: 'function', formatGdbAddress: 'function',
  archFor: 'function', targetDescription: 'function', debugRegisters: 'function', stopReason: 'function', hostDebugSupport: 'function',
  probeHostDebugSupport: 'function',
  readRegisters: 'function', readGuestMemory: 'function', formatRegisters: 'function', hexDump: 'function', decodeRflags: 'function',
  MAX_INSPECT_BYTES: 'number', readExitTrace: 'function', parseExitTrace: 'function', formatTraceRecord: 'function', summarizeExitTrace: 'function',
};

/** Every type the package root exports (generic ones with arguments). */
const TYPES = [
  // the VMM: machines, their configs, states and events
  'MachineConfig', 'MachineRuntimeConfig', 'MachineRunState', 'MachineShape', 'MachineState', 'MachineEvents', 'MachineExit',
  'MachineExitReason', 'MachineConsole', 'VcpuState', 'VmState', 'DeviceStates', 'SerialState', 'PostCodeState', 'VirtioMmioState',
  'VirtioQueueState', 'AcpiPmState', 'ElcrState', 'PciConfigState', 'CmosRtcState', 'FwCfgState', 'FwCfgItem', 'DiskConfig', 'DiskShape', 'VsockConfig', 'VcpuThread', 'VcpuThreadMessage',
  // the I/O bus and the device interfaces
  'BusShared', 'UnknownAccesses', 'PortDevice', 'MmioDevice', 'DirtyPageMarker',
  // dirty tracking
  'DirtyTrackerOptions', 'TrackedSlot', 'DirtyLogMode', 'ExtensionSource', 'PageRange',
  // snapshots and migration
  'MigrateOptions', 'MigrationStats', 'MigrationProgress', 'MigrationPhase', 'SnapshotOptions', 'SnapshotInfo', 'RestoreConfig', 'PrepareConfig', 'PreparedMachine', 'PreparedMachineState',
  'IncomingConfig', 'NonConvergence', 'AutoConvergeOptions', 'PostcopyMode', 'PostcopyStats', 'RawVcpuState', 'RawVmState', 'MigrationErrorOptions', 'MigrationAddress', 'LoadSnapshotMemoryOptions', 'SnapshotContents',
  'SnapshotKind', 'SnapshotParent', 'WriteSnapshotOptions', 'WriteSnapshotResult', 'DecodedPages', 'RamImage', 'StreamHeader',
  'StreamKind',
  // the KVM binding
  'MemoryRegion', 'GsiRoute', 'IoeventfdOptions', 'VcpuKickHandle', 'ReleasedVcpu', 'GuestDebugOptions', 'Translation', 'GuestMemoryHandle',
  'GuestMemoryOptions', 'GuestMemoryBacking', 'MapFileOptions', 'EventFdOptions', 'Fd', 'FdWatch', 'VcpuExit', 'Handle', 'CapNumber', 'ExitReasonNumber',
  'Regs', 'Sregs', 'Segment', 'Dtable', 'Fpu', 'MsrEntry', 'CpuidEntry', 'LapicState', 'Xcr', 'VcpuEvents', 'DebugRegs', 'PitState2',
  'PitChannelState', 'IrqchipState', 'Msi', 'ClockData', 'CoalescedMmio', 'FieldType<number>', 'Fields', 'StructValue<Fields>',
  'StructType<Fields>',
  // booting
  'BootPlan', 'BootWrite', 'BootFormat', 'PlanOptions', 'BootState', 'CpuMode', 'MemoryMapEntry', 'SetupHeader', 'BzImageLayout',
  'BzImageOptions', 'FirmwareTables', 'Region', 'InitramfsEntry', 'MultibootModule', 'MultibootModuleConfig',
  // debugging
  'GdbServerOptions', 'BreakpointKind', 'StopReason', 'ResumePlan', 'GdbAddress', 'TargetArch', 'VcpuRegisters',
  'WatchpointKind', 'DebugSlot', 'InsertResult', 'HostDebugSupport', 'HostDebugProbeOptions',
  'InspectedRegisters', 'ReadMemoryOptions', 'ExitTrace', 'TraceRecord', 'TraceExitKind', 'TraceSummaryRow',
  'ExitStats', 'VcpuExitStats', 'ExitCount', 'DebugStop',
];

const bare = (type: string) => type.replace(/<.*/, '');

/** A consumer's file: every name imported, every type named, and the README's examples typed. */
const consumer = `import {
  ${Object.keys(VALUES).join(',\n  ')},
} from 'node-kvm';
import type {
  ${TYPES.map(bare).filter((name) => !(name in VALUES)).join(',\n  ')},
} from 'node-kvm';

export const values = [${Object.keys(VALUES).join(', ')}];
export type Types = [
  ${TYPES.join(',\n  ')},
];

// The README's uses of the VMM.
export async function vmm(token: string): Promise<void> {
  const pool = await VcpuWorkerPool.create(2);
  const controller = new AbortController();
  const machine: Machine = await Machine.create({
    image: guestPath('smp.elf'), vcpus: 2, memoryBytes: 64 << 20,
    serial: { output: process.stdout, input: process.stdin }, pool, signal: controller.signal,
  });
  machine.on('exit', (exit: MachineExit) => console.log(exit.reason, exit.code));
  machine.on('paused', () => console.log('paused')).once('resumed', () => console.log('resumed'));
  machine.start();
  await machine.pause();
  machine.resume();
  const state: MachineRunState = machine.state;
  const saved: MachineState | null = state === 'paused' ? await machine.saveState() : null;
  const shape: MachineShape = machine.shape;
  const exit: MachineExit = await machine.stop();
  console.log(saved?.vcpus.length, shape.vcpus, exit.reason, await machine.wait());

  const quiet = await Machine.create({ image: new Uint8Array(512), disks: [{ path: 'disk.img', readOnly: true }] });
  const console_: MachineConsole = quiet.console;
  console_.pipe(process.stdout);
  process.stdin.pipe(console_);
  console.log(console_.droppedBytes, quiet.sendSerialInput(new Uint8Array([0x71])));

  const info: SnapshotInfo = await quiet.snapshot('/var/lib/vm/base.snap');
  await quiet.snapshot('/var/lib/vm/later.snap', { diff: true });
  const restored: Machine = await Machine.restore('/var/lib/vm/later.snap', { pool });
  const standby: PreparedMachine = await Machine.prepare('/var/lib/vm/base.snap', { pool, serial: { output: process.stdout } });
  const resumed: Machine = await Machine.restore('/var/lib/vm/base.snap', { prepared: standby });
  console.log(standby.state, standby.shape.memoryBytes, resumed.state);
  const destination: Machine = await Machine.incoming('tcp:0.0.0.0:4444', { token });
  const stats: MigrationStats = await restored.migrate('tcp:10.0.0.2:4444', { token, downtimeBudgetMs: 50, onProgress: (progress: MigrationProgress) => console.log(progress.phase) });
  console.log(info, destination.state, stats.totalTimeMs);

  const tracker = new DirtyTracker({ vm: Kvm.open().createVm(), slots: [], mode: 'bitmap', vmmDirty: DirtyBitmap.create(16) });
  const ranges: PageRange[] = tracker.harvest();
  const bus = new IoBus(createBusShared(), console.log);
  const device: PortDevice = { name: 'dev', read: () => 0, write: () => {} };
  bus.registerPorts(0x100, 1, device);
  console.log(ranges, unknownAccesses(createBusShared()).ports);

  const debugged = await Machine.create({ image: guestPath('gdb.elf') });
  const stub: GdbServer = await GdbServer.listen(debugged, 'tcp:127.0.0.1:1234');
  debugged.start({ paused: true });
  console.log(stub.address, stub.attached);
  await stub.close();
}
`;

t.test('a TypeScript consumer compiles against every public name of the package root', async (t) => {
  const built = path.join(repoRoot, 'dist', 'lib', 'index.d.ts');
  if (!existsSync(built)) {
    t.fail(`${built} does not exist: build the package first (npm run build:ts)`);
    return;
  }
  const project = mkdtempSync(path.join(tmpdir(), 'node-kvm-consumer-'));
  t.teardown(() => rmSync(project, { recursive: true, force: true }));
  mkdirSync(path.join(project, 'node_modules', '@types'), { recursive: true });
  symlinkSync(repoRoot, path.join(project, 'node_modules', 'node-kvm'), 'dir');
  symlinkSync(path.join(repoRoot, 'node_modules', '@types', 'node'), path.join(project, 'node_modules', '@types', 'node'), 'dir');
  writeFileSync(path.join(project, 'package.json'), JSON.stringify({ name: 'consumer', private: true, type: 'module' }));
  writeFileSync(path.join(project, 'tsconfig.json'), JSON.stringify({
    compilerOptions: { target: 'ES2022', module: 'NodeNext', moduleResolution: 'NodeNext', strict: true, noEmit: true, types: ['node'], skipLibCheck: true },
    files: ['consumer.ts'],
  }));
  writeFileSync(path.join(project, 'consumer.ts'), consumer);

  const tsc = path.join(repoRoot, 'node_modules', 'typescript', 'bin', 'tsc');
  const compiled = await run(process.execPath, [tsc, '-p', project, '--traceResolution'], { cwd: project, maxBuffer: 64 << 20 }).then(
    ({ stdout }) => ({ status: 0, stdout }),
    (error: { code: number; stdout: string }) => ({ status: error.code, stdout: error.stdout }),
  );
  const errors = compiled.stdout.split('\n').filter((line) => /error TS\d+/.test(line));
  t.same(errors, [], 'tsc --noEmit finds no error in the consumer');
  t.equal(compiled.status, 0);
  t.match(compiled.stdout, /Module name 'node-kvm' was successfully resolved to '[^']*\/dist\/lib\/index\.d\.ts' with Package ID 'node-kvm\/dist\/lib\/index\.d\.ts/,
    "'node-kvm' resolves through the package's exports to its built declarations");

  // At run time, from the consumer's directory: the same resolution, as Node does it.
  const script = `import * as pkg from 'node-kvm';
console.log(JSON.stringify({ url: import.meta.resolve('node-kvm'), kinds: Object.fromEntries(Object.entries(pkg).map(([name, value]) => [name, typeof value])),
  attached: [typeof pkg.Machine.restore, typeof pkg.Machine.prepare, typeof pkg.Machine.incoming, typeof pkg.Machine.prototype.snapshot, typeof pkg.Machine.prototype.migrate] }));`;
  const { stdout } = await run(process.execPath, ['--input-type=module', '-e', script], { cwd: project });
  const found = JSON.parse(stdout) as { url: string; kinds: Record<string, string>; attached: string[] };
  t.match(found.url, /\/dist\/lib\/index\.js$/);
  t.same(Object.fromEntries(Object.keys(VALUES).map((name) => [name, found.kinds[name]])), VALUES, 'each value export is on the package root, of its kind');
  t.same(Object.keys(found.kinds).filter((name) => !(name in VALUES)), [], 'and nothing else is (a new export belongs in this test)');
  t.same(found.attached, ['function', 'function', 'function', 'function', 'function'], 'the package root loads the snapshot and migration methods of Machine');
});
