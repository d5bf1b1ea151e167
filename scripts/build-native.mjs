// Builds the addon with node-gyp against the running Node's own headers, so that nothing is
// downloaded (the headers ship with Node in <prefix>/include/node).
//
//   node scripts/build-native.mjs                    build build/Release (npm run build:native)
//   node scripts/build-native.mjs --if-no-prebuilt   the package's install script: nothing to do
//                                                    when a prebuilt binary in prebuilds/ loads here
//   node scripts/build-native.mjs --prebuild         prebuildify: the N-API binary the package
//                                                    ships, prebuilds/linux-x64/node.napi.glibc.node
import { execFileSync } from 'node:child_process';
import { copyFileSync, existsSync, statSync } from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const require = createRequire(import.meta.url);

if (process.argv.includes('--if-no-prebuilt') && process.env.npm_config_build_from_source !== 'true' && prebuiltLoads()) {
  process.exit(0);
}

const nodeDir = path.resolve(path.dirname(process.execPath), '..');
const haveHeaders = existsSync(path.join(nodeDir, 'include', 'node', 'node_api.h'));
if (!haveHeaders) console.error(`node-kvm: Node headers not found under ${nodeDir}/include/node; node-gyp will look for them itself`);

if (process.argv.includes('--prebuild')) {
  prebuild();
} else {
  build();
}

/** Whether a binary in prebuilds/ fits this platform and loads (a build in build/ does not count). */
function prebuiltLoads() {
  // node-gyp-build reads it when it loads.
  process.env.PREBUILDS_ONLY = '1';
  try {
    require(require('node-gyp-build').resolve(root));
    return true;
  } catch (error) {
    if (existsSync(path.join(root, 'prebuilds'))) console.error(`node-kvm: no prebuilt addon loads here (${error.message.trim()}); building it`);
    return false;
  }
}

/** node-gyp: the project's own (a devDependency), else the one npm runs install scripts with. */
function nodeGypScript() {
  try {
    return require.resolve('node-gyp/bin/node-gyp.js');
  } catch {
    if (process.env.npm_config_node_gyp) return process.env.npm_config_node_gyp;
    console.error('node-kvm: node-gyp not found (install it, or run this through npm)');
    process.exit(1);
  }
}

function build() {
  const args = haveHeaders ? [`--nodedir=${nodeDir}`] : [];
  const run = (command) =>
    execFileSync(process.execPath, [nodeGypScript(), command, ...args, '--jobs=max'], { cwd: root, stdio: 'inherit' });
  try {
    const makefile = path.join(root, 'build', 'Makefile');
    const stale = !existsSync(makefile) || statSync(makefile).mtimeMs < statSync(path.join(root, 'binding.gyp')).mtimeMs;
    if (stale) run('configure');
    run('build');
  } catch {
    console.error('node-kvm: building the native addon failed (see above); it needs g++, make and python3');
    process.exit(1);
  }
}

function prebuild() {
  const prebuildify = require.resolve('prebuildify/bin.js');
  // prebuildify runs `node-gyp rebuild --target=<version>`: for this Node's version, with its
  // headers, node-gyp downloads nothing. N-API binaries load in any later Node.
  const env = { ...process.env, npm_config_jobs: 'max', ...(haveHeaders ? { npm_config_nodedir: nodeDir } : {}) };
  try {
    execFileSync(process.execPath, [prebuildify, '--napi', '--strip', '--tag-libc', `--target=${process.versions.node}`], { cwd: root, stdio: 'inherit', env });
  } catch {
    console.error('node-kvm: prebuildify failed (see above)');
    process.exit(1);
  }
  // prebuildify moved the addon out of build/Release: put back the unstripped link output there,
  // as node-gyp's own last step does, so that this checkout keeps loading its build.
  const release = path.join(root, 'build', 'Release');
  copyFileSync(path.join(release, 'obj.target', 'node_kvm.node'), path.join(release, 'node_kvm.node'));
}
