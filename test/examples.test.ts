// Every file of examples/ runs as it is, from its build (dist/examples: `npm run build:ts`), and
// prints what it says it does.
import { execFile } from 'node:child_process';
import { existsSync, readdirSync } from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import t from 'tap';
import { noKvm, repoRoot } from './helpers/kvm.js';

const examples = path.join(repoRoot, 'examples');
const built = path.join(repoRoot, 'dist', 'examples');

/** What each example must print on stdout (a string: all of it). */
const EXPECTED: Record<string, string | RegExp[]> = {
  'hello.ts': 'Hello from node-kvm!\n',
  'raw-guest.ts': 'the guest wrote "Hi", then exited: hlt\n',
  'dirty-log.ts': 'dirty pages: 16, 48 (of 64)\nthen: 0 dirty\n',
  'vmm.ts': '[paused]\npaused, output so far "echo> hi"\n[resumed]\noutput "echo> hi!q"; exit: debug-exit 5\n',
  'snapshot.ts': [/^snapshot: \d+ pages written, guest paused under a second\n/, /\nrestored guest printed "q"\nexit: debug-exit 5\n$/],
  'migrate.ts': [
    /^source: the guest printed "echo> hi" here; migrated \d+ pages, downtime \d+ ms\nsource: exit: migrated\n/,
    /\ndestination: the guest printed "q" here, then exit: debug-exit 5\n$/,
  ],
  'live-update.ts': [
    /^old process: the guest printed "echo> hi" here; handed over with 0 pages copied, downtime \d+ ms\nold process: exit: migrated\n/,
    /\nnew process: the guest printed "q" here, then exit: debug-exit 5\n$/,
  ],
  'disk.ts': [/^disk0: 128 sectors, rw, id "data"\ndisk0: sector 0 says "hello from data.img"\n/, /\ndisk1: write refused \(read-only\)\n/, /\nexit: debug-exit 0x10\n$/],
};

t.test('each example has its expected output here', async (t) => {
  t.same(readdirSync(examples).filter((name) => name.endsWith('.ts')).sort(), Object.keys(EXPECTED).sort());
});

for (const [name, expected] of Object.entries(EXPECTED)) {
  t.test(`examples/${name}`, { skip: noKvm }, async (t) => {
    const script = path.join(built, name.replace(/\.ts$/, '.js'));
    if (!existsSync(script)) throw new Error(`${script} is not built: run npm run build:ts`);
    // Plain node, as a user runs it: the example imports 'node-kvm', the package's own build.
    const { stdout } = await promisify(execFile)(process.execPath, [script], { cwd: repoRoot, timeout: 30_000 });
    if (typeof expected === 'string') t.equal(stdout, expected);
    else for (const pattern of expected) t.match(stdout, pattern);
  });
}
