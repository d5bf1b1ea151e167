// The package as a new user gets it: `npm pack` here, then, in a scratch project in a temporary
// folder with no compiler on PATH (only node, npm, npx and sh), `npm install <tarball>`, which must not
// build anything; `npx node-kvm run` of a shipped guest must print its line, and a TypeScript file
// with the README's examples must type-check under `strict` against the installed package (and
// its boot example run). Prints the tarball's size and the install's time; exits non-zero on the
// first failure. Needs the repository built (`npm ci`); runs from .ci/run.
//
//   node scripts/check-package.mjs [--keep]    --keep leaves the scratch folder in place
import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const hasKvm = existsSync('/dev/kvm');
const say = (line) => console.log(`check-package: ${line}`);
const fail = (line) => {
  console.error(`check-package: FAILED: ${line}`);
  process.exit(1);
};
const kib = (bytes) => `${(bytes / 1024).toFixed(0)} KiB`;

/** The README's example of guestPath(), verbatim: the consumer compiles and runs it. */
function readmeBootExample() {
  const readme = readFileSync(path.join(root, 'README.md'), 'utf8');
  const block = [...readme.matchAll(/```ts\n([\s\S]*?)```/g)].map((m) => m[1]).find((code) => code.includes("guestPath('hello.bin')"));
  if (!block) fail("README.md has no ts example with guestPath('hello.bin')");
  return block;
}

/** The README's other library examples, each in a function so that its free names are declared. */
const readmeExamples = `import { readFileSync } from 'node:fs';
import {
  ExitReason, GuestMemory, IoDirection, Kvm, Machine, VcpuWorkerPool, guestImages, guestPath,
  type MachineExit, type MigrationStats, type SnapshotInfo,
} from 'node-kvm';

export async function vmm(): Promise<void> {
  const pool = await VcpuWorkerPool.create(2);
  const machine = await Machine.create({
    image: guestPath('smp.elf'), vcpus: 2, memoryBytes: 64 << 20, pool,
    signal: AbortSignal.timeout(5000),
  });
  machine.console.pipe(process.stdout);
  machine.console.write('root\\n');
  machine.on('exit', (exit: MachineExit) => console.log(exit.reason, exit.code));
  machine.start();
  await machine.pause();
  machine.resume();
  await machine.stop();
}

export async function disks(): Promise<Machine> {
  return Machine.create({
    image: guestPath('disk.elf'), memoryBytes: 64 << 20,
    disks: [{ path: 'data.img' }, { path: 'base.img', readOnly: true, id: 'base' }],
  });
}

export async function snapshots(machine: Machine, pool: VcpuWorkerPool, token: string): Promise<void> {
  const info: SnapshotInfo = await machine.snapshot('/var/lib/vm/base.snap');
  await machine.snapshot('/var/lib/vm/later.snap', { diff: true });
  const restored = await Machine.restore('/var/lib/vm/later.snap', { pool });
  restored.start();
  const destination = await Machine.incoming('tcp:0.0.0.0:4444', { token });
  machine.on('progress', (stats) => console.log(stats.phase, stats.remainingPages));
  const stats: MigrationStats = await machine.migrate('tcp:10.0.0.2:4444', { token });
  console.log(info, destination.state, stats.totalTimeMs);
}

export function raw(): void {
  const COM1 = 0x3f8;
  const LOAD_ADDR = 0x7c00;
  const image = readFileSync(guestPath('hello.bin'));
  using kvm = Kvm.open();
  using vm = kvm.createVm();
  using memory = GuestMemory.create(1 << 20);
  vm.setUserMemoryRegion({ slot: 0, guestPhysAddr: 0, memory });
  memory.write(LOAD_ADDR, image);
  using vcpu = vm.createVcpu(0);
  const sregs = vcpu.getSregs();
  sregs.cs.base = 0n;
  sregs.cs.selector = 0;
  vcpu.setSregs(sregs);
  vcpu.setRegs({ ...vcpu.getRegs(), rip: BigInt(LOAD_ADDR), rflags: 0x2n });
  const run = vcpu.kvmRun;
  for (;;) {
    const reason = vcpu.run();
    if (reason === ExitReason.Io && run.ioPort === COM1 && run.ioDirection === IoDirection.Out) {
      const offset = run.ioDataOffset;
      process.stdout.write(run.bytes.subarray(offset, offset + run.ioSize * run.ioCount));
    } else if (reason === ExitReason.Hlt) {
      break;
    } else {
      throw new Error(\`unexpected exit: \${vcpu.exit().reason}\`);
    }
  }
}

export const images: string[] = guestImages();
`;

/** Runs a command with `env`, its output captured; fails the check if it exits non-zero. */
function run(command, args, options) {
  const result = spawnSync(command, args, { encoding: 'utf8', maxBuffer: 64 << 20, ...options });
  if (result.error) fail(`${command} ${args.join(' ')}: ${result.error.message}`);
  if (result.status !== 0) fail(`${command} ${args.join(' ')} exited ${result.status}:\n${result.stdout}${result.stderr}`);
  return result;
}

function duSize(dir) {
  let bytes = 0;
  for (const entry of readdirSync(dir, { withFileTypes: true, recursive: true })) {
    if (entry.isFile()) bytes += statSync(path.join(entry.parentPath ?? entry.path, entry.name)).size;
  }
  return bytes;
}

const scratch = mkdtempSync(path.join(tmpdir(), 'node-kvm-package-'));
try {
  // 1. The tarball (npm pack runs prepare and prepack: the TypeScript, the guests, the prebuilt addon).
  const packDir = path.join(scratch, 'pack');
  mkdirSync(packDir);
  const packed = run('npm', ['pack', '--json', '--pack-destination', packDir], { cwd: root, stdio: ['ignore', 'pipe', 'inherit'] });
  const report = JSON.parse(packed.stdout.slice(packed.stdout.lastIndexOf('\n[') + 1))[0];
  const tarball = path.join(packDir, report.filename);
  const files = report.files.map((f) => f.path);
  say(`${report.filename}: ${kib(report.size)} packed, ${kib(report.unpackedSize)} unpacked, ${report.entryCount} files`);
  for (const needed of ['prebuilds/linux-x64/node-kvm.glibc.node', 'guests/build/hello.bin', 'guests/build/disk.elf', 'guests/hello.S', 'LICENSE', 'dist/lib/index.d.ts']) {
    if (!files.includes(needed)) fail(`the tarball has no ${needed}`);
  }
  const unwanted = files.filter((f) => f.endsWith('.map') || f.endsWith('.o') || f.endsWith('.bin.elf') || f.startsWith('build/'));
  if (unwanted.length > 0) fail(`the tarball has files it should not: ${unwanted.join(', ')}`);

  // 2. A PATH with node, npm, npx and sh (npm runs scripts with it) only: no g++, cc, make or
  // python3 to build with.
  const bin = path.join(scratch, 'bin');
  mkdirSync(bin);
  for (const tool of ['node', 'npm', 'npx', 'sh']) {
    const found = execFileSync('sh', ['-c', `command -v ${tool}`], { encoding: 'utf8' }).trim();
    symlinkSync(tool === 'node' ? process.execPath : found, path.join(bin, tool));
  }
  const env = { ...process.env, PATH: bin, NODE_KVM_CACHE_DIR: path.join(scratch, 'cache') };
  for (const key of Object.keys(env)) if (key.startsWith('npm_')) delete env[key]; // not this script's npm's settings
  for (const tool of ['g++', 'gcc', 'cc', 'c++', 'make', 'python3']) {
    if (spawnSync('/bin/sh', ['-c', `command -v ${tool}`], { env }).status === 0) fail(`${tool} is on the scratch PATH`);
  }

  // 3. The install: from the npm cache where it has the packages (the registry otherwise).
  const project = path.join(scratch, 'consumer');
  mkdirSync(project);
  writeFileSync(path.join(project, 'package.json'), JSON.stringify({ name: 'consumer', version: '1.0.0', private: true, type: 'module' }));
  const started = process.hrtime.bigint();
  const installed = run('npm', ['install', '--prefer-offline', '--no-audit', '--no-fund', tarball], { cwd: project, env });
  const seconds = Number(process.hrtime.bigint() - started) / 1e9;
  const modules = path.join(project, 'node_modules');
  const packages = readdirSync(modules).filter((name) => !name.startsWith('.')).length;
  say(`npm install of the tarball: ${seconds.toFixed(1)} s, ${packages} packages, node_modules ${kib(duSize(modules))} (${installed.stdout.trim().split('\n').at(-1)})`);
  const installedRoot = path.join(modules, 'node-kvm');
  if (existsSync(path.join(installedRoot, 'build'))) fail('the install built the addon instead of using the prebuilt one');

  // 4. A shipped guest, booted by the package's command as a consumer runs it.
  const hello = 'node_modules/node-kvm/guests/build/hello.bin';
  if (hasKvm) {
    const booted = run('npx', ['node-kvm', 'run', hello], { cwd: project, env });
    if (booted.stdout !== 'Hello from node-kvm!\n') fail(`npx node-kvm run ${hello} printed ${JSON.stringify(booted.stdout)}`);
    say(`npx node-kvm run ${hello}: ${booted.stdout.trim()}`);
  } else {
    run('npx', ['node-kvm', '--help'], { cwd: project, env });
    say('/dev/kvm absent: npx node-kvm --help ran, no guest booted');
  }

  // 5. The README's examples against the installed package's types, under strict.
  mkdirSync(path.join(modules, '@types'), { recursive: true });
  symlinkSync(path.join(root, 'node_modules', '@types', 'node'), path.join(modules, '@types', 'node'), 'dir');
  writeFileSync(path.join(project, 'boot.ts'), readmeBootExample());
  writeFileSync(path.join(project, 'readme.ts'), readmeExamples);
  writeFileSync(path.join(project, 'tsconfig.json'), JSON.stringify({
    compilerOptions: {
      target: 'ES2022', lib: ['ES2022', 'ESNext.Disposable'], module: 'NodeNext', moduleResolution: 'NodeNext',
      strict: true, types: ['node'], outDir: 'out',
    },
    files: ['boot.ts', 'readme.ts'],
  }));
  run(process.execPath, [path.join(root, 'node_modules', 'typescript', 'bin', 'tsc'), '-p', project], { cwd: project, env });
  say('the README\'s examples type-check under strict against the installed package');
  if (hasKvm) {
    const booted = run(process.execPath, ['out/boot.js'], { cwd: project, env });
    if (booted.stdout !== 'Hello from node-kvm!\n') fail(`the README's guestPath() example printed ${JSON.stringify(booted.stdout)}`);
    say('the README\'s guestPath() example booted hello.bin from the installed package');
  }
  say('ok');
} finally {
  if (process.argv.includes('--keep')) say(`scratch folder kept: ${scratch}`);
  else rmSync(scratch, { recursive: true, force: true });
}
