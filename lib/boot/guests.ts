// The guest images the package ships (guests/build/, assembled from guests/ by guests/build.mjs):
// found by file name, so that a consumer boots them without knowing where npm put the package.
import { readdirSync } from 'node:fs';
import path from 'node:path';
import { argTypeError, argValueError, systemError } from '../kvm/errors.js';
import { packageRoot } from '../kvm/package-root.js';

/** A bootable image: a flat binary or an ELF kernel (not the intermediate *.bin.elf of a flat one). */
const isImage = (name: string) => (name.endsWith('.bin') || name.endsWith('.elf')) && !name.endsWith('.bin.elf');

function guestsDir(): string {
  return path.join(packageRoot(), 'guests', 'build');
}

/** The file names of the shipped guest images, sorted: 'bzimage.bin', 'disk.elf', 'hello.bin', ... */
export function guestImages(): string[] {
  let names: string[];
  try {
    names = readdirSync(guestsDir());
  } catch (cause) {
    throw systemError(`node-kvm: the guests are not built (${guestsDir()} cannot be read): run npm run build:guests`, cause);
  }
  return names.filter(isImage).sort();
}

/**
 * The absolute path of the shipped guest image `file` (its name in guests/build, as
 * guestImages() lists it): `guestPath('hello.bin')`. An unknown name throws
 * ERR_INVALID_ARG_VALUE, naming the images there are.
 */
export function guestPath(file: string): string {
  if (typeof file !== 'string') throw argTypeError(`guestPath: file must be a string, not ${typeof file}`);
  const images = guestImages();
  if (images.includes(file)) return path.join(guestsDir(), file);
  const stem = images.find((image) => image.replace(/\.[a-z]+$/, '') === file);
  const hint = stem === undefined ? '' : ` (did you mean ${stem}?)`;
  throw argValueError(`guestPath: no shipped guest image is named ${JSON.stringify(file)}${hint}; there are ${images.join(', ')}`);
}
