// Bundles what starts often into single CommonJS files beside the modules tsc built, each loaded
// through V8's code cache (lib/vmm/code-cache.ts) by a small loader:
// - each worker thread, dist/lib/vmm/*-worker.js -> *-worker.body.cjs, loaded by *-worker.cjs: a
//   new Worker then reads and compiles one file instead of resolving and linking an ES module
//   graph (36 -> 22 ms from new Worker() to an idle vCPU thread here; a bare Worker takes 17);
// - the command: its entry, dist/lib/cli/main.js -> node-kvm.cjs (the package's bin), which starts
//   a vCPU thread before it loads anything else, then loads the rest, commands.js ->
//   node-kvm-commands.cjs (its module graph took 30-35 ms to load before it could boot anything).
// The pool and the disks start a worker's loader when it exists, its module otherwise (under a
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
 * worker files beside the pool): in a bundle every module's `import.meta.url` becomes
 * `urlExpression`, a file in dist/lib/vmm, where the workers are. Every bundle sits in
 * dist/lib/<dir>, so it also knows the package root without searching for it (lib/kvm/native.ts).
 */
async function bundle(entry, outfile, urlExpression, plugins = []) {
  await build({
    entryPoints: [entry],
    outfile,
    bundle: true,
    platform: 'node',
    target: 'node20',
    format: 'cjs',
    define: { 'import.meta.url': '__moduleUrl', NODE_KVM_PACKAGE_ROOT: '__packageRoot' },
    banner: { js: `const __moduleUrl = ${urlExpression};\nconst __packageRoot = require('node:path').resolve(__dirname, '..', '..', '..');` },
    plugins,
    // import() of a bundle left out becomes require(): no ES module loader to start for it.
    supported: { 'dynamic-import': false },
    logLevel: 'warning',
  });
}

const codeCacheModule = path.join(vmmDir, 'code-cache.js');

/**
 * Source of a module that runs the bundle `file` (beside the output) through the code cache;
 * `use` is an expression, evaluated after the `imports`.
 */
function loaderSource(file, use, exportsMain = false, imports = []) {
  return [
    `import { join } from 'node:path';`,
    ...imports,
    `import { requireBundle } from ${JSON.stringify(codeCacheModule)};`,
    // Its own require() does for the bundle beside it: both resolve from this directory.
    `const loaded = requireBundle(join(__dirname, ${JSON.stringify(file)}), ${use}, require);`,
    exportsMain ? `export const main = loaded.main;` : '',
  ].join('\n');
}

/** In a bundle, module `from` becomes `source`. */
function replaceModule(from, source) {
  const filter = new RegExp(`^${from.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}$`);
  return {
    name: `replace ${from}`,
    setup(b) {
      b.onResolve({ filter }, () => ({ path: from, namespace: 'replaced' }));
      b.onLoad({ filter: /.*/, namespace: 'replaced' }, () => ({ contents: source, resolveDir: vmmDir, loader: 'js' }));
    },
  };
}

for (const worker of workers) {
  const name = worker.replace(/\.js$/, '');
  await bundle(path.join(vmmDir, worker), path.join(vmmDir, `${name}.body.cjs`), "require('node:url').pathToFileURL(__filename).href");
  await build({
    stdin: { contents: loaderSource(`${name}.body.cjs`, JSON.stringify(name)), resolveDir: vmmDir, loader: 'js' },
    outfile: path.join(vmmDir, `${name}.cjs`),
    bundle: true,
    platform: 'node',
    target: 'node20',
    format: 'cjs',
    logLevel: 'warning',
  });
}
const cliDir = path.join(root, 'dist', 'lib', 'cli');
const cliUrl = "require('node:url').pathToFileURL(require('node:path').join(__dirname, '..', 'vmm', 'node-kvm.cjs')).href";
await bundle(path.join(cliDir, 'commands.js'), path.join(cliDir, 'node-kvm-commands.cjs'), cliUrl);
// Each subcommand compiles different functions: its own cache (one for all unknown words).
const commandNames = `import { codeCacheUse } from ${JSON.stringify(path.join(cliDir, 'command-names.js'))};`;
await bundle(path.join(cliDir, 'main.js'), path.join(cliDir, 'node-kvm.cjs'), cliUrl, [
  replaceModule('./commands.js', loaderSource('node-kvm-commands.cjs', 'codeCacheUse(process.argv[2])', true, [commandNames])),
]);
// The module entry stays runnable as a command too: npx keeps a link to the bin a project had
// when npx first ran there (dist/lib/cli/main.js before the bundle), and npm made it executable.
chmodSync(path.join(root, 'dist', 'lib', 'cli', 'main.js'), 0o755);
