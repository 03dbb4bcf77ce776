/**
 * JSON with byte arrays: device state is plain data (STYLE.md persist pattern) that may hold
 * buffers; this codec writes them as {"$b64": "..."} so a state blob is one JSON text.
 */
export function encodeStateJson(value: unknown): Uint8Array {
  return new TextEncoder().encode(JSON.stringify(toStateJson(value)));
}

/**
 * `value` with every Uint8Array as {$b64} and every bigint as {$big}. A walk, not a
 * JSON.stringify replacer: a replacer is a call per key, and a checkpoint's device state has
 * thousands of keys (this is on the path of every COLO checkpoint, on both nodes).
 */
function toStateJson(v: unknown): unknown {
  if (typeof v === 'bigint') return { $big: v.toString() };
  if (v === null || typeof v !== 'object') return v;
  if (v instanceof Uint8Array) return { $b64: Buffer.from(v.buffer, v.byteOffset, v.byteLength).toString('base64') };
  const json = (v as { toJSON?: unknown }).toJSON;
  if (typeof json === 'function') return toStateJson((json as () => unknown).call(v));
  if (Array.isArray(v)) return v.map(toStateJson);
  const o: Record<string, unknown> = {};
  for (const k of Object.keys(v)) setKey(o, k, toStateJson((v as Record<string, unknown>)[k]));
  return o;
}

/** o[k] = x, also for the key "__proto__" (an own key then, as JSON.parse makes it, not the prototype). */
function setKey(o: Record<string, unknown>, k: string, x: unknown): void {
  if (k === '__proto__') Object.defineProperty(o, k, { value: x, writable: true, enumerable: true, configurable: true });
  else o[k] = x;
}

export function decodeStateJson(bytes: Uint8Array): unknown {
  const text = new TextDecoder('utf-8', { fatal: true }).decode(bytes);
  return fromStateJson(JSON.parse(text));
}

/** The inverse of toStateJson, in place (a JSON.parse reviver, like a replacer, is a call per key). */
function fromStateJson(v: unknown): unknown {
  if (v === null || typeof v !== 'object') return v;
  if (Array.isArray(v)) {
    for (let i = 0; i < v.length; i++) v[i] = fromStateJson(v[i]);
    return v;
  }
  const o = v as Record<string, unknown>;
  const keys = Object.keys(o);
  if (keys.length === 1) {
    if (typeof o.$b64 === 'string') return new Uint8Array(Buffer.from(o.$b64, 'base64'));
    if (typeof o.$big === 'string') return BigInt(o.$big);
  }
  for (const k of keys) {
    const x = o[k];
    const y = fromStateJson(x);
    if (y !== x) setKey(o, k, y);
  }
  return o;
}

export function concatBytes(chunks: readonly Uint8Array[]): Uint8Array {
  let total = 0;
  for (const c of chunks) total += c.byteLength;
  const out = new Uint8Array(total);
  let at = 0;
  for (const c of chunks) {
    out.set(c, at);
    at += c.byteLength;
  }
  return out;
}
