// Every error node-kvm throws or rejects with has a string `code`: nothing in lib/ makes a bare
// Error, TypeError, RangeError (or another built-in error class) outside lib/kvm/errors.ts, whose
// helpers (argTypeError, outOfRangeError, argValueError, NodeKvmError, systemError, withCode) give
// one its code. The README's "Errors." paragraph lists the codes.
import { readFileSync, readdirSync } from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { repoRoot } from '../helpers/kvm.js';

const lib = path.join(repoRoot, 'lib');
/** Where the built-in classes may be constructed: the helpers that give them their codes. */
const HELPERS = path.join('kvm', 'errors.ts');

const BUILT_IN = '(?:Error|TypeError|RangeError|SyntaxError|ReferenceError|EvalError|URIError|AggregateError)';
/** `new TypeError(`, and a built-in class called without `new` (`throw Error(`, `reject(RangeError(`). */
const BARE = new RegExp(`(?<![\\w$.])(?:new\\s+${BUILT_IN}|${BUILT_IN})\\s*\\(`, 'g');

interface Finding {
  line: number;
  text: string;
}

/** Blanks out comments (keeping line numbers): they may quote code. */
function withoutComments(source: string): string {
  const blank = (text: string) => text.replace(/[^\n]/g, ' ');
  return source
    .replace(/\/\*[\s\S]*?\*\//g, blank)
    .replace(/(^|[^:'"`\\])\/\/[^\n]*/gm, (comment, before: string) => before + blank(comment.slice(before.length)));
}

/** The bare built-in errors `source` makes, by line; `withCode(new X(...), code)` gives one its code. */
function bareErrors(source: string): Finding[] {
  const code = withoutComments(source);
  const lines = source.split('\n');
  const findings: Finding[] = [];
  for (const match of code.matchAll(BARE)) {
    if (/withCode\(\s*$/.test(code.slice(0, match.index))) continue;
    const line = code.slice(0, match.index).split('\n').length;
    findings.push({ line, text: lines[line - 1]!.trim() });
  }
  return findings;
}

function sourceFiles(dir: string): string[] {
  return readdirSync(dir, { withFileTypes: true }).flatMap((entry) => {
    const file = path.join(dir, entry.name);
    if (entry.isDirectory()) return sourceFiles(file);
    return entry.name.endsWith('.ts') && !entry.name.endsWith('.d.ts') ? [file] : [];
  });
}

const files = sourceFiles(lib).map((file) => path.relative(lib, file)).filter((file) => file !== HELPERS).sort();
/** `file:line: text` for each bare error in `files`. */
const report = (of: string[]) => of.flatMap((file) => bareErrors(readFileSync(path.join(lib, file), 'utf8')).map(({ line, text }) => `lib/${file}:${line}: ${text}`));

t.test('no bare Error, TypeError or RangeError anywhere in lib/ outside lib/kvm/errors.ts', async (t) => {
  t.same(report(files), [], `every error made in ${files.length} files has a code`);
  t.ok(files.length > 40, `${files.length} files read`);
});

t.test('the scan finds every form of a bare error, and nothing else', async (t) => {
  const source = [
    "throw new Error('a');", // 1
    'throw new TypeError(`b`);', // 2
    "if (x) throw new RangeError('c');", // 3
    "return Promise.reject(new Error('d'));", // 4
    "throw Error('e');", // 5
    "reject(new SyntaxError('f'));", // 6
    "settle(new AggregateError([], 'g'));", // 7
    'throw new Error(', // 8
    "  'h');",
    "throw argTypeError('fine');", // 10
    "throw new NodeKvmError(ErrorCode.MachineState, 'fine');",
    "throw new KvmError('EBADF', -9, '', 'fine');",
    "throw outOfRangeError('fine'), argValueError('fine');",
    "return withCode(new Error('fine'), ErrorCode.Aborted);",
    'return withCode(',
    "  new RangeError('fine'), 'ERR_X');",
    "if (error instanceof Error) Error.captureStackTrace(error);",
    '// throw new Error(\'in a comment\');',
    "/* throw new TypeError('in a block comment'); */",
    "const url = 'http://example'; // throw new Error('after code');",
    '/**',
    " * throw new RangeError('in a doc comment')",
    ' */',
    "const message = (error as Error).message;",
  ].join('\n');
  t.same(bareErrors(source).map(({ line }) => line), [1, 2, 3, 4, 5, 6, 7, 8]);
  t.same(bareErrors(source)[7], { line: 8, text: 'throw new Error(' }, 'a finding names its line and quotes it');
});
