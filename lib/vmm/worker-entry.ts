// Which file a Worker runs for one of the VMM's worker modules.
import { existsSync } from 'node:fs';
import path from 'node:path';

/**
 * The worker module `name` that sits beside `importerFile`: its one-file bundle (`name.cjs`,
 * scripts/bundle.mjs) when built JavaScript has one, which starts faster than the module
 * graph; otherwise the module itself, with the importer's extension (.ts under a TypeScript loader).
 */
export function workerEntry(importerFile: string, name: string): string {
  const dir = path.dirname(importerFile);
  const extension = path.extname(importerFile);
  const bundle = path.join(dir, `${name}.cjs`);
  if (extension !== '.ts' && existsSync(bundle)) return bundle;
  return path.join(dir, `${name}${extension}`);
}
