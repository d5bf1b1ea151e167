// Made-up guest RAM and stream bytes for the tests of the page stream's parsing.
import { randomBytes } from 'node:crypto';
import { PAGE_SIZE } from '../../lib/kvm/constants.js';

/** `memoryBytes` of guest RAM with random pages at `dataPages` and zeros elsewhere. */
export function ramWith(memoryBytes: number, dataPages: number[]): Uint8Array {
  const ram = new Uint8Array(memoryBytes);
  for (const page of dataPages) ram.set(randomBytes(PAGE_SIZE), page * PAGE_SIZE);
  return ram;
}

/** The chunks as one stream (a copy). */
export const concat = (chunks: Uint8Array[]): Uint8Array => new Uint8Array(Buffer.concat(chunks));
