// Machine state (per-vCPU, VM, devices, config) as UTF-8 JSON with tagged values, so that a
// state object comes back exactly as it was saved:
//   bigint                     -> {"$bigint": "0x1f"} or {"$bigint": "-0x1f"}
//   Uint8Array                 -> {"$bytes": "<base64>"}
//   NaN, ±Infinity, -0         -> {"$number": "NaN" | "Infinity" | "-Infinity" | "-0"}
//   an object key "$x"         -> "$$x" (so that no data key is taken for a tag)
// Decoding throws nothing but MigrationError('EFORMAT') and refuses the keys that could reach an
// object's prototype.
import { argTypeError, argValueError } from '../kvm/errors.js';
import { MigrationError, MigrationErrorCode as Code } from './errors.js';
import { SectionType, encodeSection, type Section, type SectionTypeNumber } from './format.js';

/** A value encodeState() accepts. Object properties that are undefined are left out. */
export type StateValue =
  | null
  | boolean
  | number
  | string
  | bigint
  | Uint8Array
  | readonly StateValue[]
  | { readonly [key: string]: StateValue | undefined };

/** Deeper nesting is refused both ways (no machine state nests this deep). */
export const MAX_STATE_DEPTH = 64;

const FORBIDDEN_KEYS = new Set(['__proto__', 'constructor', 'prototype']);
const SPECIAL_NUMBERS = new Map<string, number>([['NaN', NaN], ['Infinity', Infinity], ['-Infinity', -Infinity], ['-0', -0]]);
const BIGINT_PATTERN = /^-?0x[0-9a-f]+$/;
const BASE64_PATTERN = /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/;

const isPlainObject = (value: object): boolean => {
  const prototype = Object.getPrototypeOf(value);
  return prototype === Object.prototype || prototype === null;
};

/**
 * A value JSON carries as it is (no tag, nothing to check). Tested before a path is built for it:
 * most of a state is such scalars, and building each one's path (only ever read in an error)
 * took most of the time.
 */
const isPlainJson = (value: unknown): boolean =>
  value === null || typeof value === 'string' || typeof value === 'boolean' || (typeof value === 'number' && Number.isFinite(value) && !Object.is(value, -0));

function toJson(value: unknown, path: string, depth: number, seen: Set<object>): unknown {
  switch (typeof value) {
    case 'boolean':
    case 'string':
      return value;
    case 'number':
      if (Number.isFinite(value) && !Object.is(value, -0)) return value;
      return { $number: Object.is(value, -0) ? '-0' : String(value) };
    case 'bigint':
      return { $bigint: value < 0n ? `-0x${(-value).toString(16)}` : `0x${value.toString(16)}` };
    case 'object':
      break;
    default:
      throw argTypeError(`cannot encode ${path}: ${typeof value} is not a state value`);
  }
  if (value === null) return null;
  if (depth >= MAX_STATE_DEPTH) throw argTypeError(`cannot encode ${path}: nested more than ${MAX_STATE_DEPTH} levels`);
  if (seen.has(value)) throw argTypeError(`cannot encode ${path}: it refers back to itself`);
  if (value instanceof Uint8Array) {
    return { $bytes: Buffer.from(value.buffer, value.byteOffset, value.byteLength).toString('base64') };
  }
  // No try/finally to take it out of `seen` on a throw: the whole encoding fails then. (V8 also
  // compiles the walk several times faster without one.)
  seen.add(value);
  const json = Array.isArray(value) ? arrayToJson(value, path, depth, seen) : objectToJson(value, path, depth, seen);
  seen.delete(value);
  return json;
}

function arrayToJson(value: unknown[], path: string, depth: number, seen: Set<object>): unknown[] {
  return value.map((item, index) => {
    if (isPlainJson(item)) return item;
    if (item === undefined) throw argTypeError(`cannot encode ${path}[${index}]: undefined in an array`);
    return toJson(item, `${path}[${index}]`, depth + 1, seen);
  });
}

function objectToJson(value: object, path: string, depth: number, seen: Set<object>): Record<string, unknown> {
  if (!isPlainObject(value)) {
    throw argTypeError(`cannot encode ${path}: ${value.constructor?.name ?? 'this object'} is not a plain object, array, bigint or Uint8Array`);
  }
  const out: Record<string, unknown> = {};
  for (const key of Object.keys(value)) {
    if (FORBIDDEN_KEYS.has(key)) throw argTypeError(`cannot encode ${path}: key '${key}' is not allowed in state`);
    const item = (value as Record<string, unknown>)[key];
    if (item === undefined) continue;
    out[key.startsWith('$') ? `$${key}` : key] = isPlainJson(item) ? item : toJson(item, `${path}.${key}`, depth + 1, seen);
  }
  return out;
}

/** UTF-8 JSON of `value` (see the top of this file). Throws TypeError naming what it cannot encode. */
export function encodeState(value: unknown): Uint8Array {
  const json = JSON.stringify(toJson(value, 'state', 0, new Set()));
  const bytes = Buffer.from(json, 'utf8');
  return new Uint8Array(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

/**
 * Whether two state values come back from encodeState() and decoding as equal values (key order
 * aside), found without encoding either: a migration tells this way which devices' state changed
 * since it sent them ahead.
 */
export function sameState(a: unknown, b: unknown): boolean {
  if (Object.is(a, b)) return true;
  if (typeof a !== 'object' || typeof b !== 'object' || a === null || b === null) return false;
  if (a instanceof Uint8Array || b instanceof Uint8Array) {
    return a instanceof Uint8Array && b instanceof Uint8Array && Buffer.from(a.buffer, a.byteOffset, a.byteLength).equals(b);
  }
  // Loops, no callbacks: this runs inside a migration's downtime, where each callback would be
  // one more function to compile at its first call.
  if (Array.isArray(a) || Array.isArray(b)) {
    if (!Array.isArray(a) || !Array.isArray(b) || a.length !== b.length) return false;
    for (let i = 0; i < a.length; i++) if (!sameState(a[i], b[i])) return false;
    return true;
  }
  const left = a as Record<string, unknown>;
  const right = b as Record<string, unknown>;
  let keys = 0;
  for (const key in left) {
    if (!Object.hasOwn(left, key) || left[key] === undefined) continue;
    if (!sameState(left[key], right[key])) return false;
    keys++;
  }
  for (const key in right) if (Object.hasOwn(right, key) && right[key] !== undefined) keys--;
  return keys === 0;
}

const formatError = (what: string, reason: string): MigrationError => new MigrationError(Code.Format, `${what} is not valid state: ${reason}`);

function fromJson(value: unknown, path: string, depth: number, what: string): unknown {
  if (value === null || typeof value !== 'object') return value; // JSON.parse yields only JSON scalars
  if (depth >= MAX_STATE_DEPTH) throw formatError(what, `${path} is nested more than ${MAX_STATE_DEPTH} levels`);
  // Scalars come back as they are, without a path built for each (only an error reads it).
  if (Array.isArray(value)) return value.map((item, index) => (item === null || typeof item !== 'object' ? item : fromJson(item, `${path}[${index}]`, depth + 1, what)));
  const keys = Object.keys(value);
  const record = value as Record<string, unknown>;
  if (keys.length === 1 && keys[0].startsWith('$') && !keys[0].startsWith('$$')) return fromTag(keys[0], record[keys[0]], path, what);
  const out: Record<string, unknown> = {};
  for (const key of keys) {
    if (FORBIDDEN_KEYS.has(key)) throw formatError(what, `${path} has the key '${key}'`);
    let name = key;
    if (key.startsWith('$')) {
      if (!key.startsWith('$$')) throw formatError(what, `${path} mixes the tag '${key}' with other keys`);
      name = key.slice(1);
    }
    const item = record[key];
    out[name] = item === null || typeof item !== 'object' ? item : fromJson(item, `${path}.${name}`, depth + 1, what);
  }
  return out;
}

function fromTag(tag: string, body: unknown, path: string, what: string): unknown {
  if (typeof body !== 'string') throw formatError(what, `${path}: the ${tag} tag needs a string`);
  switch (tag) {
    case '$bigint':
      if (!BIGINT_PATTERN.test(body)) throw formatError(what, `${path}: '${body.slice(0, 40)}' is not a hexadecimal bigint`);
      return body.startsWith('-') ? -BigInt(body.slice(1)) : BigInt(body);
    case '$bytes': {
      if (!BASE64_PATTERN.test(body)) throw formatError(what, `${path}: the bytes are not valid base64`);
      const bytes = Buffer.from(body, 'base64');
      return new Uint8Array(bytes); // a copy of its own, not a view of Buffer's shared pool
    }
    case '$number': {
      const number = SPECIAL_NUMBERS.get(body);
      if (number === undefined) throw formatError(what, `${path}: '${body.slice(0, 40)}' is not NaN, Infinity, -Infinity or -0`);
      return number;
    }
    default:
      throw formatError(what, `${path} has the unknown tag '${tag.slice(0, 40)}'`);
  }
}

const utf8 = new TextDecoder('utf-8', { fatal: true });

/**
 * The value encodeState() encoded. `what` names the bytes in error messages ("the VcpuState
 * section"). Throws MigrationError('EFORMAT') on anything that is not valid state.
 */
export function decodeState(bytes: Uint8Array, what = 'the state'): unknown {
  if (!(bytes instanceof Uint8Array)) throw argTypeError('bytes must be a Uint8Array');
  let text: string;
  try {
    text = utf8.decode(bytes);
  } catch {
    throw formatError(what, 'not UTF-8');
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (error) {
    throw formatError(what, `not JSON (${error instanceof Error ? error.message : String(error)})`);
  }
  try {
    return fromJson(json, 'state', 0, what);
  } catch (error) {
    if (error instanceof MigrationError) throw error;
    throw formatError(what, error instanceof Error ? error.message : String(error));
  }
}

type StateSectionType = typeof SectionType.Config | typeof SectionType.VcpuState | typeof SectionType.VmState | typeof SectionType.DeviceState | typeof SectionType.DeviceStateAhead;
const STATE_SECTION_TYPES = new Set<number>([SectionType.Config, SectionType.VcpuState, SectionType.VmState, SectionType.DeviceState, SectionType.DeviceStateAhead]);

/** A Config, VcpuState, VmState, DeviceState or DeviceStateAhead section holding encodeState(value). */
export function encodeStateSection(type: StateSectionType, value: unknown): Uint8Array {
  if (!STATE_SECTION_TYPES.has(type)) throw argValueError(`type must be Config, VcpuState, VmState, DeviceState or DeviceStateAhead, got ${String(type)}`);
  return encodeSection(type as SectionTypeNumber, encodeState(value));
}

/** The state in a section from SectionReader.next(). */
export function decodeStateSection(section: Section): unknown {
  if (!STATE_SECTION_TYPES.has(section.type)) throw new MigrationError(Code.Format, `a ${section.name} section does not hold state`);
  return decodeState(section.payload, `the ${section.name} section`);
}
