// What a test's child process (a node-kvm command, a migration peer) is started with: tap's
// TypeScript loader, and processinfo, which records the child's coverage. tap's mock preload
// serves t.mockImport in the test process only; left out, a child and each thread it starts
// (they inherit its execArgv) load about a second sooner.
export const childExecArgv = process.execArgv.filter((arg) => !arg.includes('@tapjs/mock'));
