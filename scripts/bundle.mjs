// Bundles what starts often into single CommonJS files beside the modules tsc built:
// - each worker thread's entry, dist/lib/vmm/*-worker.js -> *-worker.cjs: a new Worker then reads
//   and compiles one file instead of resolving and linking an ES module graph (36 -> 22 ms from
//   new Worker() to an idle vCPU thread here; a bare Worker takes 17);
// - the command, dist/lib/cli/main.js -> node-kvm.cjs (the package's bin), whose module graph
//   took 30-35 ms to load before it could boot anything.
// The pool and the disks start a worker's bundle when it exists, its module otherwise (under a
// TypeScript loader, for example).
import { chmodSync, readdirSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { build } from 'esbuild';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const vmmDir = path.join(root, 'dist', 'lib', 'vmm');
const workers = readdirSync(vmmDir).filter((name) => name.endsWith('-worker.js'));
if (workers.length === 0) throw new Error(`no worker modules in ${vmmDir}: run tsc first`);

/**
 * One CommonJS file from an ES module entry. The modules locate things from their own URL (the
 * package root for the addon, the worker files beside the pool): in a bundle every module's
 * `import.meta.url` becomes `urlExpression`, a file in dist/lib/vmm, where the workers are.
 */
async function bundle(entry, outfile, urlExpression) {
  await build({
    entryPoints: [entry],
    outfile,
    bundle: true,
    platform: 'node',
    target: 'node20',
    format: 'cjs',
    define: { 'import.meta.url': '__moduleUrl' },
    banner: { js: `const __moduleUrl = ${urlExpression};` },
    logLevel: 'warning',
  });
}

for (const worker of workers) {
  await bundle(path.join(vmmDir, worker), path.join(vmmDir, worker.replace(/\.js$/, '.cjs')), "require('node:url').pathToFileURL(__filename).href");
}
await bundle(
  path.join(root, 'dist', 'lib', 'cli', 'main.js'),
  path.join(root, 'dist', 'lib', 'cli', 'node-kvm.cjs'),
  "require('node:url').pathToFileURL(require('node:path').join(__dirname, '..', 'vmm', 'node-kvm.cjs')).href",
);
// The module entry stays runnable as a command too: npx keeps a link to the bin a project had
// when npx first ran there (dist/lib/cli/main.js before the bundle), and npm made it executable.
chmodSync(path.join(root, 'dist', 'lib', 'cli', 'main.js'), 0o755);
