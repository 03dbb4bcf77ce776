/**
 * Argument schemas of QMP commands, in the spirit of QAPI's `'data'` member:
 *
 *   { uri: 'str', '*detach': 'bool',
 *     capabilities: [{ struct: { capability: { enum: ['x-colo', 'multifd'] }, state: 'bool' } }] }
 *
 * A member name starting with `*` is optional (the `*` is not part of the name). Types:
 *   'str' | 'int' | 'uint' | 'number' | 'bool' | 'any' | 'object'  (object: any JSON object)
 *   [T]                     array of T
 *   { enum: ['a', 'b'] }    one of these strings
 *   { struct: { ... } }     nested object with its own members (unknown members refused)
 *
 * Errors use QEMU's wording, with QEMU's full member names ("capabilities[0].state"):
 *   Parameter 'uri' is missing
 *   Invalid parameter type for 'uri', expected: string
 *   Parameter 'x' is unexpected
 *   Parameter 'mode' does not accept value 'foo'
 *   Parameter 'n' expects a non-negative integer
 * The TypeScript type of a handler's arguments is inferred from the schema (QmpArgsOf).
 */
import { ColoError } from '../core/errors.js';

export type QmpScalarType = 'str' | 'int' | 'uint' | 'number' | 'bool' | 'any' | 'object';
export type QmpType =
  | QmpScalarType
  | readonly [QmpType]
  | { readonly enum: readonly string[] }
  | { readonly struct: QmpArgsSchema };
export type QmpArgsSchema = { readonly [member: string]: QmpType };

export type QmpValueOf<T> = T extends 'str'
  ? string
  : T extends 'int' | 'uint' | 'number'
    ? number
    : T extends 'bool'
      ? boolean
      : T extends 'any'
        ? unknown
        : T extends 'object'
          ? Record<string, unknown>
          : T extends readonly [infer E]
            ? QmpValueOf<E>[]
            : T extends { readonly enum: readonly (infer V)[] }
              ? V
              : T extends { readonly struct: infer S }
                ? QmpArgsOf<S>
                : never;

type Simplify<T> = { [K in keyof T]: T[K] } & {};

/** The arguments object a schema admits: `*name` members become optional `name?` members. */
export type QmpArgsOf<S> = Simplify<
  { -readonly [K in keyof S as K extends `*${string}` ? never : K]: QmpValueOf<S[K]> } & {
    -readonly [K in keyof S as K extends `*${infer N}` ? N : never]?: QmpValueOf<S[K]>;
  }
>;

/** A schema definition error: a programming mistake of whoever registers the command. */
export class QmpSchemaError extends ColoError {
  constructor(message: string) {
    super('QMP_SCHEMA', message);
  }
}

const scalarTypes: ReadonlySet<string> = new Set(['str', 'int', 'uint', 'number', 'bool', 'any', 'object']);

/** Checks a schema's own shape (at registration), so validation never meets a malformed one. */
export function checkSchema(schema: unknown, where: string): void {
  if (schema === null || typeof schema !== 'object' || Array.isArray(schema)) {
    throw new QmpSchemaError(`${where}: a schema must be an object of members`);
  }
  const names = new Set<string>();
  for (const [key, type] of Object.entries(schema)) {
    const name = key.startsWith('*') ? key.slice(1) : key;
    if (name === '') throw new QmpSchemaError(`${where}: empty member name`);
    if (names.has(name)) throw new QmpSchemaError(`${where}: member '${name}' defined twice`);
    names.add(name);
    checkType(type, `${where}.${name}`);
  }
}

function checkType(type: unknown, where: string): void {
  if (typeof type === 'string') {
    if (!scalarTypes.has(type)) throw new QmpSchemaError(`${where}: unknown type '${type}'`);
    return;
  }
  if (Array.isArray(type)) {
    if (type.length !== 1) throw new QmpSchemaError(`${where}: an array type is written [T] with one element type`);
    checkType(type[0], `${where}[]`);
    return;
  }
  if (type !== null && typeof type === 'object') {
    const keys = Object.keys(type);
    if (keys.length === 1 && keys[0] === 'enum') {
      const values = (type as { enum: unknown }).enum;
      if (!Array.isArray(values) || values.length === 0 || !values.every((v) => typeof v === 'string')) {
        throw new QmpSchemaError(`${where}: enum needs a non-empty list of strings`);
      }
      return;
    }
    if (keys.length === 1 && keys[0] === 'struct') {
      checkSchema((type as { struct: unknown }).struct, where);
      return;
    }
  }
  throw new QmpSchemaError(`${where}: a type is a name, [T], {enum: [...]} or {struct: {...}}`);
}

function isObject(v: unknown): v is Record<string, unknown> {
  return v !== null && typeof v === 'object' && !Array.isArray(v);
}

function memberName(prefix: string, name: string): string {
  return prefix === '' ? name : `${prefix}.${name}`;
}

/**
 * Validates `args` (a JSON object) against `schema`, depth first in schema order like QEMU's
 * input visitor. Returns undefined when valid, else the error description.
 */
export function validateArgs(schema: QmpArgsSchema, args: Record<string, unknown>, prefix = ''): string | undefined {
  const known = new Set<string>();
  for (const [key, type] of Object.entries(schema)) {
    const optional = key.startsWith('*');
    const name = optional ? key.slice(1) : key;
    known.add(name);
    const full = memberName(prefix, name);
    if (!Object.hasOwn(args, name)) {
      if (optional) continue;
      return `Parameter '${full}' is missing`;
    }
    const problem = validateValue(type, args[name], full);
    if (problem !== undefined) return problem;
  }
  for (const key of Object.keys(args)) {
    if (!known.has(key)) return `Parameter '${memberName(prefix, key)}' is unexpected`;
  }
  return undefined;
}

function wrongType(full: string, expected: string): string {
  return `Invalid parameter type for '${full}', expected: ${expected}`;
}

function isArrayType(type: QmpType): type is readonly [QmpType] {
  return Array.isArray(type);
}

function validateValue(type: QmpType, value: unknown, full: string): string | undefined {
  if (typeof type === 'string') {
    switch (type as QmpScalarType) {
      case 'any':
        return undefined;
      case 'str':
        return typeof value === 'string' ? undefined : wrongType(full, 'string');
      case 'bool':
        return typeof value === 'boolean' ? undefined : wrongType(full, 'boolean');
      case 'number':
        return typeof value === 'number' ? undefined : wrongType(full, 'number');
      // QEMU's int64 and uint64: any integer in their range, beyond 2^53 too (libvirt's
      // "unlimited" max-bandwidth is INT64_MAX >> 20 << 20). JSON numbers are doubles here, in
      // which INT64_MAX and UINT64_MAX round up to 2^63 and 2^64: those bounds are admitted.
      case 'int':
        return Number.isInteger(value) && Math.abs(value as number) <= 2 ** 63 ? undefined : wrongType(full, 'integer');
      case 'uint':
        if (!Number.isInteger(value) || Math.abs(value as number) > 2 ** 64) return wrongType(full, 'integer');
        return (value as number) >= 0 ? undefined : `Parameter '${full}' expects a non-negative integer`;
      case 'object':
        return isObject(value) ? undefined : wrongType(full, 'object');
    }
  }
  if (isArrayType(type)) {
    if (!Array.isArray(value)) return wrongType(full, 'array');
    const element = type[0];
    for (let i = 0; i < value.length; i++) {
      const problem = validateValue(element, value[i], `${full}[${i}]`);
      if (problem !== undefined) return problem;
    }
    return undefined;
  }
  if ('enum' in type) {
    if (typeof value !== 'string') return wrongType(full, 'string');
    return type.enum.includes(value) ? undefined : `Parameter '${full}' does not accept value '${value}'`;
  }
  if (!isObject(value)) return wrongType(full, 'object');
  return validateArgs(type.struct, value, full);
}
