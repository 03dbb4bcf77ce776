import { RestoreError } from './errors.js';

/**
 * Small checkers for restore(): a saved state comes from a file or a peer, so every field is
 * re-validated and a bad one is named in the error.
 */
export function record(value: unknown, what: string): Record<string, unknown> {
  if (value === null || typeof value !== 'object' || Array.isArray(value)) {
    throw new RestoreError('STATE_INVALID', `${what}: expected an object`);
  }
  return value as Record<string, unknown>;
}

export function uint(value: unknown, what: string, max = Number.MAX_SAFE_INTEGER): number {
  if (typeof value !== 'number' || !Number.isInteger(value) || value < 0 || value > max) {
    throw new RestoreError('STATE_INVALID', `${what}: expected an integer in 0..${max}, got ${String(value)}`);
  }
  return value;
}

export function bool(value: unknown, what: string): boolean {
  if (typeof value !== 'boolean') throw new RestoreError('STATE_INVALID', `${what}: expected a boolean`);
  return value;
}

export function str(value: unknown, what: string): string {
  if (typeof value !== 'string') throw new RestoreError('STATE_INVALID', `${what}: expected a string`);
  return value;
}

export function bytes(value: unknown, what: string, maxBytes: number): Uint8Array {
  if (!(value instanceof Uint8Array)) throw new RestoreError('STATE_INVALID', `${what}: expected bytes`);
  if (value.byteLength > maxBytes) {
    throw new RestoreError('STATE_LIMIT', `${what}: ${value.byteLength} bytes exceeds the limit of ${maxBytes}`);
  }
  return value;
}

export function array(value: unknown, what: string, maxItems: number): unknown[] {
  if (!Array.isArray(value)) throw new RestoreError('STATE_INVALID', `${what}: expected an array`);
  if (value.length > maxItems) {
    throw new RestoreError('STATE_LIMIT', `${what}: ${value.length} items exceeds the limit of ${maxItems}`);
  }
  return value;
}

export function bigintValue(value: unknown, what: string): bigint {
  if (typeof value !== 'bigint') throw new RestoreError('STATE_INVALID', `${what}: expected a 64-bit integer`);
  return value;
}
