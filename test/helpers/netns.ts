// Network namespaces that a test creates and removes, so TAP devices, addresses and ping never
// touch the host's own namespace. The VMM stays in the host namespace and opens its TAP inside
// one through openTap's `netns` option.
import { execFileSync, spawn } from 'node:child_process';
import { existsSync } from 'node:fs';

/** Why network tests must skip here, or false where they can run (root, ip, /dev/net/tun). */
export const noNetns: string | false = process.getuid?.() !== 0
  ? 'network namespace tests need root'
  : !existsSync('/dev/net/tun')
    ? '/dev/net/tun is absent'
    : !['/usr/sbin/ip', '/sbin/ip', '/usr/bin/ip', '/bin/ip'].some((file) => existsSync(file))
      ? 'iproute2 (ip) is not installed'
      : false;
if (noNetns) console.log(`# ${noNetns}: network tests skipped`);

/** Where iputils' ping is, or null. */
export const pingPath: string | null = ['/usr/bin/ping', '/bin/ping', '/usr/sbin/ping'].find((file) => existsSync(file)) ?? null;

let created = 0;

export class NetNamespace {
  readonly name: string;
  /** The file that names it, for openTap's `netns` option. */
  readonly path: string;
  #removed = false;

  private constructor(name: string) {
    this.name = name;
    this.path = `/run/netns/${name}`;
  }

  /** A new namespace with its loopback up, plus whatever `commands` (ip -batch lines, run inside it) set up. */
  static create(commands: string[] = []): NetNamespace {
    const ns = new NetNamespace(`nkvm-${process.pid}-${created++}`);
    execFileSync('ip', ['netns', 'add', ns.name], { stdio: 'pipe' });
    try {
      ns.ip(['link set lo up', ...commands]);
    } catch (error) {
      ns.remove();
      throw error;
    }
    return ns;
  }

  /** Runs `ip` commands inside the namespace, in one process. */
  ip(commands: string[]): void {
    execFileSync('ip', ['-n', this.name, '-batch', '-'], { input: commands.join('\n') + '\n', stdio: ['pipe', 'pipe', 'pipe'] });
  }

  /** Runs a program inside the namespace; resolves with its exit code and output. */
  exec(argv: string[], options: { input?: string; timeoutMs?: number } = {}): Promise<{ code: number | null; stdout: string; stderr: string }> {
    return new Promise((resolve, reject) => {
      const child = spawn('ip', ['netns', 'exec', this.name, ...argv], { stdio: [options.input === undefined ? 'ignore' : 'pipe', 'pipe', 'pipe'] });
      let stdout = '';
      let stderr = '';
      child.stdout.setEncoding('utf8').on('data', (chunk: string) => { stdout += chunk; });
      child.stderr.setEncoding('utf8').on('data', (chunk: string) => { stderr += chunk; });
      const timer = setTimeout(() => child.kill('SIGKILL'), options.timeoutMs ?? 20_000);
      child.on('error', (error) => {
        clearTimeout(timer);
        reject(error);
      });
      child.on('close', (code) => {
        clearTimeout(timer);
        resolve({ code, stdout, stderr });
      });
      // A child that exits before reading its input closes the pipe: not the caller's error.
      child.stdin?.on('error', () => {});
      child.stdin?.end(options.input);
    });
  }

  /** Deletes the namespace and every interface in it (TAPs included). */
  remove(): void {
    if (this.#removed) return;
    this.#removed = true;
    execFileSync('ip', ['netns', 'delete', this.name], { stdio: 'pipe' });
  }
}
