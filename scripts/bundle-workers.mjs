// Bundles each worker thread's entry (dist/lib/vmm/*-worker.js, built by tsc) with the modules it
// imports into one CommonJS file beside it (vcpu-worker.cjs). A new Worker then reads and compiles
// one file instead of resolving and linking an ES module graph: 36 -> 22 ms from new Worker() to
// an idle vCPU thread here (a bare Worker takes 17). The pool and the disks start the bundle when
// it exists, the module otherwise (under a TypeScript loader, for example).
import { readdirSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { build } from 'esbuild';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const dir = path.join(root, 'dist', 'lib', 'vmm');
const entries = readdirSync(dir).filter((name) => name.endsWith('-worker.js'));
if (entries.length === 0) throw new Error(`no worker modules in ${dir}: run tsc first`);
for (const entry of entries) {
  await build({
    entryPoints: [path.join(dir, entry)],
    outfile: path.join(dir, entry.replace(/\.js$/, '.cjs')),
    bundle: true,
    platform: 'node',
    target: 'node20',
    format: 'cjs',
    // The modules find the package (and its addon) from their own URL.
    define: { 'import.meta.url': '__bundleUrl' },
    banner: { js: "const __bundleUrl = require('node:url').pathToFileURL(__filename).href;" },
    logLevel: 'warning',
  });
}
