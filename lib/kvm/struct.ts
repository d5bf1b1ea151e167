// Struct layouts described once, as field offsets from the kernel headers. The same description
// encodes and decodes, and test/kvm/layout.test.ts checks every offset and size against the
// values the addon reads from <linux/kvm.h>, so a layout can never drift silently.
import { argTypeError, argValueError, outOfRangeError } from './errors.js';

/** How one field (or a whole struct) is read from and written to a DataView: its size in bytes, and the two conversions. */
export interface FieldType<T> {
  readonly size: number;
  /** Reads the value at `offset`. */
  read(view: DataView, offset: number): T;
  /** Writes `value` at `offset`, checking it fits; `path` names it in errors (`regs.rax`). */
  write(view: DataView, offset: number, value: T, path: string): void;
}

function checkInteger(value: unknown, bits: number, signed: boolean, path: string): number {
  if (typeof value !== 'number') throw argTypeError(`${path} must be a number`);
  const min = signed ? -(2 ** (bits - 1)) : 0;
  const max = signed ? 2 ** (bits - 1) - 1 : 2 ** bits - 1;
  if (!Number.isInteger(value) || value < min || value > max) {
    throw outOfRangeError(`${path} must be an integer ${min}..${max}, got ${value}`);
  }
  return value;
}

function checkBigInt(value: unknown, signed: boolean, path: string): bigint {
  let v: bigint;
  if (typeof value === 'bigint') v = value;
  else if (typeof value === 'number' && Number.isSafeInteger(value)) v = BigInt(value);
  else throw argTypeError(`${path} must be a bigint`);
  const min = signed ? -(1n << 63n) : 0n;
  const max = signed ? (1n << 63n) - 1n : (1n << 64n) - 1n;
  if (v < min || v > max) throw outOfRangeError(`${path} is out of range for a ${signed ? 's' : 'u'}64`);
  return v;
}

export const u8: FieldType<number> = {
  size: 1,
  read: (v, o) => v.getUint8(o),
  write: (v, o, x, p) => v.setUint8(o, checkInteger(x, 8, false, p)),
};
export const u16: FieldType<number> = {
  size: 2,
  read: (v, o) => v.getUint16(o, true),
  write: (v, o, x, p) => v.setUint16(o, checkInteger(x, 16, false, p), true),
};
export const u32: FieldType<number> = {
  size: 4,
  read: (v, o) => v.getUint32(o, true),
  write: (v, o, x, p) => v.setUint32(o, checkInteger(x, 32, false, p), true),
};
export const i32: FieldType<number> = {
  size: 4,
  read: (v, o) => v.getInt32(o, true),
  write: (v, o, x, p) => v.setInt32(o, checkInteger(x, 32, true, p), true),
};
export const u64: FieldType<bigint> = {
  size: 8,
  read: (v, o) => v.getBigUint64(o, true),
  write: (v, o, x, p) => v.setBigUint64(o, checkBigInt(x, false, p), true),
};
export const i64: FieldType<bigint> = {
  size: 8,
  read: (v, o) => v.getBigInt64(o, true),
  write: (v, o, x, p) => v.setBigInt64(o, checkBigInt(x, true, p), true),
};

/** Raw bytes, copied out on read; on write the value must have exactly `size` bytes. */
export function bytes(size: number): FieldType<Uint8Array> {
  return {
    size,
    read: (v, o) => new Uint8Array(v.buffer.slice(v.byteOffset + o, v.byteOffset + o + size)),
    write: (v, o, x, p) => {
      if (!(x instanceof Uint8Array)) throw argTypeError(`${p} must be a Uint8Array`);
      if (x.length !== size) throw argValueError(`${p} must hold exactly ${size} bytes, got ${x.length}`);
      new Uint8Array(v.buffer, v.byteOffset + o, size).set(x);
    },
  };
}

/** A fixed-length array of `element`. */
export function array<T>(element: FieldType<T>, length: number): FieldType<T[]> {
  return {
    size: element.size * length,
    read: (v, o) => Array.from({ length }, (_, i) => element.read(v, o + i * element.size)),
    write: (v, o, x, p) => {
      if (!Array.isArray(x)) throw argTypeError(`${p} must be an array`);
      if (x.length !== length) throw argValueError(`${p} must have exactly ${length} elements, got ${x.length}`);
      x.forEach((item, i) => element.write(v, o + i * element.size, item, `${p}[${i}]`));
    },
  };
}

/** A struct's fields: each camelCase name with its byte offset and type. */
export type Fields = Record<string, readonly [offset: number, type: FieldType<any>]>;
/** The JavaScript object for a struct with these fields: numbers, bigints (64-bit fields), bytes, arrays and nested structs. */
export type StructValue<F extends Fields> = { -readonly [K in keyof F]: F[K][1] extends FieldType<infer T> ? T : never };

/** A C struct's layout (struct()): its name, size and fields, and its encoding to bytes and back. */
export interface StructType<F extends Fields> extends FieldType<StructValue<F>> {
  /** The kernel's name for the struct (`kvm_regs`). */
  readonly name: string;
  /** Each field's offset and type, by name. */
  readonly fields: F;
  /** Reads the struct from the start of `data`. */
  decode(data: Uint8Array): StructValue<F>;
  /** Encodes `value` into new bytes (or into `into`), validating every field. */
  encode(value: StructValue<F>, into?: Uint8Array): Uint8Array;
}

/**
 * A C struct. `fields` maps each camelCase name to its byte offset and type; bytes between
 * fields (padding, reserved) are zero on encode.
 */
export function struct<F extends Fields>(name: string, size: number, fields: F): StructType<F> {
  const entries = Object.entries(fields);
  const read = (view: DataView, offset: number) => {
    const value: Record<string, unknown> = {};
    for (const [key, [at, type]] of entries) value[key] = type.read(view, offset + at);
    return value as StructValue<F>;
  };
  const write = (view: DataView, offset: number, value: StructValue<F>, path: string) => {
    if (typeof value !== 'object' || value === null) throw argTypeError(`${path} must be an object`);
    const record = value as Record<string, unknown>;
    for (const [key, [at, type]] of entries) {
      if (!(key in record)) throw argTypeError(`${path}.${key} is missing`);
      type.write(view, offset + at, record[key], `${path}.${key}`);
    }
  };
  return {
    name,
    size,
    fields,
    read,
    write,
    decode(data) {
      if (data.byteLength < size) throw argValueError(`${name} needs ${size} bytes, got ${data.byteLength}`);
      return read(new DataView(data.buffer, data.byteOffset, data.byteLength), 0);
    },
    encode(value, into) {
      const out = into ?? new Uint8Array(size);
      if (out.byteLength < size) throw argValueError(`${name} needs ${size} bytes, got ${out.byteLength}`);
      out.fill(0, 0, size);
      write(new DataView(out.buffer, out.byteOffset, out.byteLength), 0, value, camel(name));
      return out;
    },
  };
}

function camel(kernelName: string): string {
  return kernelName.replace(/^kvm_/, '').replace(/_([a-z0-9])/g, (_, c: string) => c.toUpperCase());
}
