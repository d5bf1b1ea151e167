// Which file a Worker runs for one of the VMM's worker modules.
import { existsSync } from 'node:fs';
// Named imports: the command's entry runs this before its first thread starts, and a bundle
// copies every export of a default import.
import { dirname, extname, join } from 'node:path';

/**
 * The worker module `name` that sits beside `importerFile`: its one-file bundle (`name.cjs`,
 * scripts/bundle.mjs) when built JavaScript has one, which starts faster than the module
 * graph; otherwise the module itself, with the importer's extension (.ts under a TypeScript loader).
 */
export function workerEntry(importerFile: string, name: string): string {
  const dir = dirname(importerFile);
  const extension = extname(importerFile);
  const bundle = join(dir, `${name}.cjs`);
  if (extension !== '.ts' && existsSync(bundle)) return bundle;
  return join(dir, `${name}${extension}`);
}
