// `node-kvm run` processes for the command's migration tests: a source running the dirtier-user
// guest with an API socket, a destination waiting in `run --incoming` on a unix socket, and the
// check that the guest's count goes on unbroken from one to the other.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { Test } from 'tap';
import { startApiServer, type ApiMachine } from '../../lib/cli/api-server.js';
import { startNodeKvm, type CommandResult, type NodeKvmProcess } from './cli.js';
import { repoRoot } from './kvm.js';
import { lastPass } from './migration.js';

/** A temporary folder for sockets and files, removed when `t` ends. */
export function socketDir(t: Test): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nkvm-cli-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** Serves `machine` (a fake one, say) on an API socket in a new socketDir(); closed when `t` ends. */
export async function serveApi(t: Test, machine: ApiMachine): Promise<{ dir: string; apiSocket: string }> {
  const dir = socketDir(t);
  const apiSocket = path.join(dir, 'api.sock');
  const server = await startApiServer(apiSocket, machine);
  t.teardown(() => server.close());
  return { dir, apiSocket };
}

export interface RunPair {
  dir: string;
  /** The source's API socket. */
  apiSocket: string;
  destinationSocket: string;
  source: NodeKvmProcess;
  destination: NodeKvmProcess;
  /** Has `child` killed when the test ends, as the source and destination are. */
  track(child: NodeKvmProcess): NodeKvmProcess;
}

/**
 * Starts the source (`run` with `memory`, e.g. '32M') and the destination (`run --incoming`, which
 * may start meanwhile); resolves once the source's guest has made its first pass.
 */
export async function startRunPair(t: Test, memory: string): Promise<RunPair> {
  const dir = socketDir(t);
  const apiSocket = path.join(dir, 'source.sock');
  const destinationSocket = path.join(dir, 'dest.sock');
  const children: NodeKvmProcess[] = [];
  t.teardown(() => {
    for (const child of children) child.kill('SIGKILL');
  });
  const track = (child: NodeKvmProcess) => {
    children.push(child);
    return child;
  };
  const source = track(startNodeKvm(['run', path.join(repoRoot, 'guests', 'build', 'dirtier-user.elf'), '--memory', memory, '--api-socket', apiSocket]));
  const destination = track(startNodeKvm(['run', '--incoming', `unix:${destinationSocket}`]));
  await source.waitFor(/^pass 1 ok$/m);
  return { dir, apiSocket, destinationSocket, source, destination, track };
}

/** Resolves once the destination listens for the migration. */
export async function destinationListening(pair: RunPair): Promise<void> {
  await pair.destination.waitFor(/^node-kvm: listening for a migration on unix:.*dest\.sock$/m, 'stderr');
}

/**
 * Once the source has ended (`sourceEnd`): the destination's guest counts on from the source's last
 * pass, with its memory intact. Then stops the destination (SIGTERM) and resolves with its end.
 */
export async function countGoesOn(t: Test, sourceEnd: CommandResult, destination: NodeKvmProcess): Promise<CommandResult> {
  // The source may have stopped in the middle of the next line: the destination finishes it, so
  // the first line whole at the destination can be the one after.
  const lastPassAtSource = lastPass(sourceEnd.stdout);
  await destination.waitFor(new RegExp(`^pass ${lastPassAtSource + 2} ok$`, 'm'));
  t.match(sourceEnd.stdout + destination.stdout(), new RegExp(`pass ${lastPassAtSource} ok\npass ${lastPassAtSource + 1} ok\npass ${lastPassAtSource + 2} ok\n`),
    'the count goes on unbroken across the move');
  t.notMatch(destination.stdout(), /BAD/, 'the guest found its memory intact');
  destination.kill('SIGTERM');
  return destination.result;
}
