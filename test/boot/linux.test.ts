// Real Linux: Debian's cloud kernel (a bzImage) with an initramfs built by buildInitramfs() around
// Debian's busybox-static, booted through the 64-bit boot protocol with console=ttyS0. Its /init
// prints a marker on the console; the test stops the machine once the marker is there.
//
// The packages are fetched with `apt-get download` and unpacked with `dpkg -x` into a temporary
// directory (nothing is installed). Where KVM does not run guest kernel code natively (kvm_pvm
// emulates it, and stops unmodified Linux with an emulation failure), the test skips and says so.
import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import t from 'tap';
import { buildInitramfs } from '../../lib/boot/index.js';
import { noKvm } from '../helpers/kvm.js';
import { boot } from '../helpers/machine.js';

const MiB = 1 << 20;
const MARKER = 'node-kvm: Linux reached /init';

/**
 * Why unmodified Linux cannot boot on this host's KVM, or false where it can: KVM must run guest
 * kernel code on VMX or SVM (the kvm_intel or kvm_amd module), not emulate it (kvm_pvm).
 */
function nativeKvmMissing(): string | false {
  if (noKvm) return noKvm;
  const loaded = (module: string) => existsSync(`/sys/module/${module}`);
  if (loaded('kvm_pvm')) return 'KVM here is kvm_pvm (software): it stops unmodified Linux with an emulation failure';
  const flags = /^flags\s*:(.*)$/m.exec(readFileSync('/proc/cpuinfo', 'utf8'))?.[1]?.trim().split(/\s+/) ?? [];
  if (!flags.includes('vmx') && !flags.includes('svm')) return 'the CPU offers neither VMX nor SVM (/proc/cpuinfo): KVM cannot run Linux natively here';
  if (!loaded('kvm_intel') && !loaded('kvm_amd')) return 'neither kvm_intel nor kvm_amd is loaded: KVM cannot run Linux natively here';
  return false;
}

function noAptReason(): string | false {
  const probe = spawnSync('apt-get', ['--version'], { stdio: 'ignore' });
  return probe.error ? 'apt-get is not available: Debian\'s kernel and busybox-static cannot be fetched' : false;
}

const skip = nativeKvmMissing() || noAptReason();
if (skip) console.log(`# real Linux boot skipped: ${skip}`);
// Two package downloads and a kernel boot take longer than the suite's per-file timeout.
else t.setTimeout(900_000);

function run(command: string, args: string[], cwd: string): string {
  try {
    return execFileSync(command, args, { cwd, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
  } catch (error) {
    const e = error as { stderr?: string; message: string };
    throw new Error(`${command} ${args.join(' ')} failed: ${(e.stderr ?? e.message).trim()}`);
  }
}

/**
 * Downloads Debian's cloud kernel (the package linux-image-cloud-amd64 depends on) and
 * busybox-static into `dir`, unpacks them under dir/root, and returns the two files.
 */
function fetchLinux(dir: string): { kernel: string; busybox: string } {
  run('apt-get', ['download', 'linux-image-cloud-amd64', 'busybox-static'], dir);
  const metaPackage = readdirSync(dir).find((f) => f.startsWith('linux-image-cloud-amd64_') && f.endsWith('.deb'));
  if (!metaPackage) throw new Error('apt-get download linux-image-cloud-amd64 left no .deb');
  const depends = run('dpkg-deb', ['-f', metaPackage, 'Depends'], dir);
  const kernelPackage = /\blinux-image-[^\s,()]+-cloud-amd64\b/.exec(depends.replace(/\blinux-image-cloud-amd64\b/g, ''))?.[0];
  if (!kernelPackage) throw new Error(`linux-image-cloud-amd64 depends on no kernel image package: ${depends.trim()}`);
  run('apt-get', ['download', kernelPackage], dir);
  const root = path.join(dir, 'root');
  mkdirSync(root);
  for (const deb of readdirSync(dir).filter((f) => f.endsWith('.deb') && f !== metaPackage)) run('dpkg', ['-x', deb, root], dir);
  const kernel = readdirSync(path.join(root, 'boot')).find((f) => f.startsWith('vmlinuz-'));
  if (!kernel) throw new Error(`${kernelPackage} holds no /boot/vmlinuz-*`);
  const busybox = ['bin/busybox', 'usr/bin/busybox'].map((f) => path.join(root, f)).find((f) => existsSync(f));
  if (!busybox) throw new Error('busybox-static holds no busybox');
  return { kernel: path.join(root, 'boot', kernel), busybox };
}

/** busybox as /bin/sh, a console device, and an /init that prints the marker and powers off. */
function initramfs(busybox: Uint8Array): Uint8Array {
  return buildInitramfs([
    { type: 'directory', path: 'dev' },
    { type: 'device', path: 'dev/console', device: 'char', major: 5, minor: 1 },
    { type: 'directory', path: 'proc' },
    { type: 'directory', path: 'bin' },
    { type: 'file', path: 'bin/busybox', data: busybox, mode: 0o755 },
    { type: 'symlink', path: 'bin/sh', target: 'busybox' },
    {
      type: 'file', path: 'init', mode: 0o755,
      // Without ACPI the power-off only halts the CPU: the test ends the machine itself.
      data: `#!/bin/sh\n/bin/busybox mount -t proc proc /proc\necho "${MARKER}: $(/bin/busybox uname -r)"\nexec /bin/busybox poweroff -f\n`,
    },
  ]);
}

t.test('a Debian cloud kernel boots to its initramfs /init', { skip, timeout: 600_000 }, async (t) => {
  const dir = mkdtempSync(path.join(tmpdir(), 'node-kvm-linux-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const { kernel, busybox } = fetchLinux(dir);
  const booted = await boot({
    image: kernel,
    initrd: initramfs(readFileSync(busybox)),
    cmdline: 'console=ttyS0 earlyprintk=serial,ttyS0,115200 panic=-1 rdinit=/init',
    memoryBytes: 512 * MiB,
    irqchip: true,
  });
  t.teardown(() => booted.machine.stop());
  booted.machine.start();
  const output = await new Promise<string>((resolve, reject) => {
    const deadline = Date.now() + 300_000;
    const poll = setInterval(() => {
      const sofar = booted.output();
      if (sofar.includes(MARKER)) resolve(sofar);
      else if (Date.now() > deadline) reject(new Error(`no marker after 300 s; console: ${JSON.stringify(sofar)}`));
      else return;
      clearInterval(poll);
    }, 100);
    // A machine that ends first (an emulation failure, a triple fault) fails the test at once.
    void booted.machine.wait().then((exit) => {
      clearInterval(poll);
      reject(new Error(`the machine ended (${exit.reason}${exit.detail ? `: ${exit.detail}` : ''}) before /init ran; console: ${JSON.stringify(booted.output())}`));
    });
  });
  t.match(output, /Linux version \d+\.\d+/, 'the kernel printed its banner on ttyS0');
  t.match(output, new RegExp(`${MARKER}: \\d+\\.\\d+`), '/init ran and printed the marker');
  t.equal(booted.machine.state, 'running', 'the machine did not stop on its own (no emulation failure or triple fault)');
});
