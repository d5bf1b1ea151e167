// Which addon file the library loads: NODE_KVM_ADDON when set, else a checkout's build before the
// prebuilt binary the package ships (node-gyp-build's order), and a clear error when none fits.
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import t, { type Test } from 'tap';
import { addonFile } from '../../lib/kvm/native.js';

function packageDir(t: Test, files: string[]): string {
  const dir = mkdtempSync(path.join(tmpdir(), 'node-kvm-addon-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  for (const file of files) {
    mkdirSync(path.dirname(path.join(dir, file)), { recursive: true });
    writeFileSync(path.join(dir, file), '');
  }
  return dir;
}

const saved = process.env.NODE_KVM_ADDON;
t.beforeEach(() => {
  delete process.env.NODE_KVM_ADDON;
});
t.teardown(() => {
  if (saved === undefined) delete process.env.NODE_KVM_ADDON;
  else process.env.NODE_KVM_ADDON = saved;
});

const prebuilt = 'prebuilds/linux-x64/node-kvm.glibc.node';

t.test('the prebuilt binary for linux-x64 with glibc, when there is no build', async (t) => {
  const dir = packageDir(t, [prebuilt, 'prebuilds/linux-x64/node-kvm.musl.node', 'prebuilds/linux-arm64/node-kvm.glibc.node']);
  t.equal(addonFile(dir), path.join(dir, prebuilt));
});

t.test("a checkout's build/Release before the prebuilt binary", async (t) => {
  const dir = packageDir(t, [prebuilt, 'build/Release/node_kvm.node']);
  t.equal(addonFile(dir), path.join(dir, 'build', 'Release', 'node_kvm.node'));
});

t.test('NODE_KVM_ADDON before both, and refused when it names nothing', async (t) => {
  const dir = packageDir(t, [prebuilt, 'build/Release/node_kvm.node', 'build-cmake/Release/node_kvm.node']);
  process.env.NODE_KVM_ADDON = path.join(dir, 'build-cmake', 'Release', 'node_kvm.node');
  t.equal(addonFile(dir), path.join(dir, 'build-cmake', 'Release', 'node_kvm.node'));
  process.env.NODE_KVM_ADDON = path.join(dir, 'missing.node');
  t.throws(() => addonFile(dir), { name: 'NodeKvmError', code: 'ERR_ADDON_NOT_FOUND', message: `node-kvm: NODE_KVM_ADDON names ${path.join(dir, 'missing.node')}, which does not exist` });
});

t.test('no build and no prebuilt binary that fits: ERR_ADDON_NOT_FOUND, saying where it looked', async (t) => {
  const dir = packageDir(t, ['prebuilds/linux-arm64/node-kvm.glibc.node', 'prebuilds/linux-x64/node-kvm.musl.node']);
  t.throws(() => addonFile(dir), {
    name: 'NodeKvmError', code: 'ERR_ADDON_NOT_FOUND',
    message: `node-kvm: no native addon fits this host: neither a build in ${path.join(dir, 'build')} nor a prebuilt binary in ${path.join(dir, 'prebuilds')}; build one with npm run build:native (needs g++, make and python3)`,
    cause: { message: /^No native build was found for platform=linux arch=x64/ },
  });
});
