/**
 * JSON with byte arrays: device state is plain data (STYLE.md persist pattern) that may hold
 * buffers; this codec writes them as {"$b64": "..."} so a state blob is one JSON text.
 */
export function encodeStateJson(value: unknown): Uint8Array {
  const text = JSON.stringify(value, (_key, v: unknown) => {
    if (v instanceof Uint8Array) return { $b64: Buffer.from(v.buffer, v.byteOffset, v.byteLength).toString('base64') };
    if (typeof v === 'bigint') return { $big: v.toString() };
    return v;
  });
  return new TextEncoder().encode(text);
}

export function decodeStateJson(bytes: Uint8Array): unknown {
  const text = new TextDecoder('utf-8', { fatal: true }).decode(bytes);
  return JSON.parse(text, (_key, v: unknown) => {
    if (v !== null && typeof v === 'object' && !Array.isArray(v)) {
      const o = v as Record<string, unknown>;
      if (typeof o.$b64 === 'string' && Object.keys(o).length === 1) return new Uint8Array(Buffer.from(o.$b64, 'base64'));
      if (typeof o.$big === 'string' && Object.keys(o).length === 1) return BigInt(o.$big);
    }
    return v;
  });
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
