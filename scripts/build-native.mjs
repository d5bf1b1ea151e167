// Builds the addon with node-gyp against the running Node's own headers, so that nothing is
// downloaded (the headers ship with Node in <prefix>/include/node).
import { execFileSync } from 'node:child_process';
import { existsSync, statSync } from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const require = createRequire(import.meta.url);
const nodeGyp = require.resolve('node-gyp/bin/node-gyp.js');

const nodeDir = path.resolve(path.dirname(process.execPath), '..');
const args = [];
if (existsSync(path.join(nodeDir, 'include', 'node', 'node_api.h'))) {
  args.push(`--nodedir=${nodeDir}`);
} else {
  console.error(`node-kvm: Node headers not found under ${nodeDir}/include/node; node-gyp will look for them itself`);
}

const run = (command) =>
  execFileSync(process.execPath, [nodeGyp, command, ...args, '--jobs=max'], { cwd: root, stdio: 'inherit' });
try {
  const makefile = path.join(root, 'build', 'Makefile');
  const stale = !existsSync(makefile) || statSync(makefile).mtimeMs < statSync(path.join(root, 'binding.gyp')).mtimeMs;
  if (stale) run('configure');
  run('build');
} catch {
  console.error('node-kvm: building the native addon failed (see above); it needs g++, make and python3');
  process.exit(1);
}
