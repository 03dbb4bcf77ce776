import { test } from 'node:test';
import assert from 'node:assert/strict';
import binaryen from 'binaryen';
import { Fl64, fl64Module, fl64Reference, fl64Wat } from '../../src/migration/checksum.js';

test('the embedded fl64 module is the WAT source compiled', () => {
  const m = binaryen.parseText(fl64Wat);
  try {
    m.setFeatures(binaryen.Features.MVP | binaryen.Features.SIMD128);
    assert.ok(m.validate());
    binaryen.setOptimizeLevel(3);
    binaryen.setShrinkLevel(0);
    m.optimize();
    const built = new WebAssembly.Module(m.emitBinary());
    // Same code: compare behaviour on inputs that exercise every path (the bytes may differ
    // between binaryen versions).
    const a = new Fl64(1 << 16, built);
    const b = new Fl64(1 << 16, fl64Module());
    const buf = a.buffer();
    for (let i = 0; i < buf.byteLength; i++) buf[i] = (i * 131) ^ (i >> 7);
    b.buffer().set(buf);
    for (const [off, len] of [[0, 0], [1, 15], [3, 16], [5, 4096], [17, 40000]] as const) assert.equal(a.sum(off, len), b.sum(off, len));
  } finally {
    m.dispose();
  }
});

test('fl64 in WebAssembly equals the TypeScript definition', () => {
  const f = new Fl64(1 << 16);
  const buf = f.buffer();
  let seed = 12345;
  for (let i = 0; i < buf.byteLength; i++) {
    seed = (seed * 1103515245 + 12345) >>> 0;
    buf[i] = seed >>> 24;
  }
  for (const [off, len] of [[0, 0], [0, 1], [7, 7], [3, 16], [1, 17], [100, 4096], [9, 4096 * 3 + 5]] as const) {
    assert.equal(f.sum(off, len), fl64Reference(buf.subarray(off, off + len)), `offset ${off} length ${len}`);
  }
});

test('fl64 catches single-word and two-word changes, swaps and length changes', () => {
  const f = new Fl64(1 << 16);
  const buf = f.buffer();
  for (let i = 0; i < 8192; i++) buf[i] = i & 0xff;
  const base = f.sum(0, 8192);
  const flip = (at: number, x: number, y?: [number, number]): bigint => {
    const save = Buffer.from(buf.subarray(0, 8192));
    buf[at] = buf[at]! ^ x;
    if (y !== undefined) buf[y[0]] = buf[y[0]]! ^ y[1];
    const s = f.sum(0, 8192);
    buf.set(save);
    return s;
  };
  for (let at = 0; at < 8192; at += 97) assert.notEqual(flip(at, 1), base, `bit flip at ${at}`);
  assert.notEqual(flip(10, 0xff, [4000, 0xff]), base);
  // Swap two 16-byte blocks.
  const save = Buffer.from(buf.subarray(0, 32));
  buf.copy(buf, 0, 16, 32);
  save.copy(buf, 16, 0, 16);
  assert.notEqual(f.sum(0, 8192), base);
  save.copy(buf, 0);
  assert.notEqual(f.sum(0, 8191), base);
  assert.equal(f.sum(0, 8192), base);
});
