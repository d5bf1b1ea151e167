// The house keeps its shape: the imports of lib/ (static, type-only, dynamic and re-exports)
// point one way, cli -> migration / debug -> vmm -> devices / boot -> kvm, with no circle between any two
// files, and only lib/kvm reaches the addon. docs/architecture.md says why.
import { readFileSync, readdirSync } from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { repoRoot } from '../helpers/kvm.js';

const lib = path.join(repoRoot, 'lib');
/** Each layer may import from its own folder and from layers of a lower rank only. */
const RANK: Record<string, number> = { kvm: 1, boot: 2, devices: 2, vmm: 3, migration: 4, debug: 4, cli: 5 };
const ADDON = 'kvm/native.ts';

function sourceFiles(dir: string): string[] {
  return readdirSync(dir, { withFileTypes: true }).flatMap((entry) => {
    const file = path.join(dir, entry.name);
    if (entry.isDirectory()) return sourceFiles(file);
    return entry.name.endsWith('.ts') && !entry.name.endsWith('.d.ts') ? [file] : [];
  });
}

/** The lib/ files that `source`, the text of the file `file`, imports, as paths relative to lib/. */
function importsOf(file: string, source = readFileSync(file, 'utf8')): string[] {
  source = source
    // Comments may quote code; strings in them are not imports.
    .replace(/\/\*[\s\S]*?\*\//g, '')
    .replace(/^\s*\/\/.*$/gm, '');
  const targets = new Set<string>();
  const patterns = [
    /\b(?:import|export)\s+(?:type\s+)?[^'";]*?\bfrom\s+['"](\.{1,2}\/[^'"]+)['"]/g,
    /\bimport\s+['"](\.{1,2}\/[^'"]+)['"]/g,
    /\bimport\(\s*['"](\.{1,2}\/[^'"]+)['"]\s*\)/g,
  ];
  for (const pattern of patterns) {
    for (const match of source.matchAll(pattern)) {
      const target = path.resolve(path.dirname(file), match[1]!).replace(/\.js$/, '.ts');
      if (target.startsWith(lib + path.sep)) targets.add(path.relative(lib, target));
    }
  }
  return [...targets];
}

const files = sourceFiles(lib).map((file) => path.relative(lib, file)).sort();
const graph = new Map(files.map((file) => [file, importsOf(path.join(lib, file))]));
const layer = (file: string) => (file.includes(path.sep) ? file.split(path.sep)[0]! : null);

t.test('every import points down the layers, and only lib/kvm imports the addon', async (t) => {
  const broken: string[] = [];
  for (const [file, targets] of graph) {
    const from = layer(file);
    for (const target of targets) {
      const to = layer(target);
      if (target === ADDON && from !== 'kvm') broken.push(`${file} imports the addon (only lib/kvm may)`);
      if (from === null || to === null || from === to) continue; // the package's entry, or within a folder
      if (!(from in RANK) || !(to in RANK)) broken.push(`${file} -> ${target}: a folder the layering does not know`);
      else if (RANK[to]! >= RANK[from]!) broken.push(`${file} -> ${target}: ${from} may not import ${to}`);
    }
  }
  t.same(broken, [], 'no import breaks the layering');
  t.ok(graph.size > 50, `${graph.size} files read`);
});

t.test('no circle of imports anywhere in lib/', async (t) => {
  // Tarjan's strongly connected components: every component of more than one file is a circle.
  let index = 0;
  const indices = new Map<string, number>();
  const lowlink = new Map<string, number>();
  const stack: string[] = [];
  const onStack = new Set<string>();
  const circles: string[][] = [];
  const visit = (file: string) => {
    indices.set(file, index);
    lowlink.set(file, index);
    index++;
    stack.push(file);
    onStack.add(file);
    for (const target of graph.get(file) ?? []) {
      if (!indices.has(target)) {
        visit(target);
        lowlink.set(file, Math.min(lowlink.get(file)!, lowlink.get(target)!));
      } else if (onStack.has(target)) {
        lowlink.set(file, Math.min(lowlink.get(file)!, indices.get(target)!));
      }
    }
    if (lowlink.get(file) === indices.get(file)) {
      const component: string[] = [];
      let member: string;
      do {
        member = stack.pop()!;
        onStack.delete(member);
        component.push(member);
      } while (member !== file);
      if (component.length > 1 || (graph.get(file) ?? []).includes(file)) circles.push(component.sort());
    }
  };
  for (const file of graph.keys()) if (!indices.has(file)) visit(file);
  t.same(circles, [], 'no file reaches itself through its imports');
});

t.test('the import reader sees every kind of import', async (t) => {
  const probe = path.join(lib, 'probe', 'probe.ts');
  const source = [
    "import { a } from '../kvm/vm.js';",
    "import type { B } from '../vmm/machine.js';",
    "export { c } from '../boot/plan.js';",
    "export * from '../devices/serial.js';",
    "import '../migration/machine-methods.js';",
    "const d = await import('../cli/run.js');",
    "import {\n  e,\n  f,\n} from '../kvm/memory.js';",
    "// import { g } from '../kvm/kvm.js';",
    "/* import { i } from '../kvm/eventfd.js'; */",
    "import { h } from 'node:fs';",
  ].join('\n');
  t.same(importsOf(probe, source).sort(), [
    'boot/plan.ts', 'cli/run.ts', 'devices/serial.ts', 'kvm/memory.ts', 'kvm/vm.ts', 'migration/machine-methods.ts', 'vmm/machine.ts',
  ]);
});
