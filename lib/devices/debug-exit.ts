// QEMU's isa-debug-exit convention: a guest writing value v to port 0xf4 ends the VM; the CLI
// exits with status (v << 1) | 1, so test guests written for QEMU work unchanged.
import type { PortDevice } from './bus-device.js';

export const DEBUG_EXIT_PORT = 0xf4;

export class DebugExit implements PortDevice {
  readonly name = 'debug-exit';
  readonly #onExit: (code: number) => void;

  constructor(onExit: (code: number) => void) {
    this.#onExit = onExit;
  }

  read(_offset: number, _size: number): number {
    return 0xffffffff;
  }

  write(_offset: number, size: number, value: number): void {
    this.#onExit(size === 4 ? value >>> 0 : value & (size === 2 ? 0xffff : 0xff));
  }
}

/** The process exit status for a debug-exit value, as QEMU reports it. */
export function debugExitStatus(code: number): number {
  return ((code << 1) | 1) & 0xff;
}
