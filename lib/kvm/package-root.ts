// Where the installed package is: the addon, its prebuilt binaries and the shipped guests are
// found from here.
import { existsSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { ErrorCode, NodeKvmError } from './errors.js';

// Defined in the one-file bundles (scripts/bundle.mjs), which know where the root is.
declare const NODE_KVM_PACKAGE_ROOT: string | undefined;

let found: string | undefined;

/** The directory of node-kvm's package.json (the bundles know it; the modules search upwards). */
export function packageRoot(): string {
  // A search costs a vCPU thread a fifth of a millisecond on its way to the guest.
  if (typeof NODE_KVM_PACKAGE_ROOT === 'string') return NODE_KVM_PACKAGE_ROOT;
  if (found !== undefined) return found;
  let dir = path.dirname(fileURLToPath(import.meta.url));
  for (;;) {
    const manifest = path.join(dir, 'package.json');
    if (existsSync(manifest) && JSON.parse(readFileSync(manifest, 'utf8')).name === 'node-kvm') return (found = dir);
    const parent = path.dirname(dir);
    if (parent === dir) throw new NodeKvmError(ErrorCode.AddonNotFound, 'node-kvm: cannot find the package root');
    dir = parent;
  }
}
