import { test } from 'node:test';
import assert from 'node:assert/strict';
import { StreamError } from '../../src/core/errors.js';
import { limits } from '../../src/core/limits.js';
import { encodePreamble, FrameDecoder, FrameEncoder, FrameType } from '../../src/migration/stream.js';

function sampleStream(): Buffer {
  const enc = new FrameEncoder();
  return Buffer.concat([
    encodePreamble(),
    ...enc.json(FrameType.hello, { kind: 'test' }),
    ...enc.frame(FrameType.ramPages, [Buffer.from([0, 0, 0, 0])]),
    ...enc.json(FrameType.end, { ok: true }),
  ]);
}

function decodeAll(bytes: Buffer, chunk = bytes.byteLength): number[] {
  const d = new FrameDecoder();
  const types: number[] = [];
  for (let i = 0; i < bytes.byteLength; i += chunk) {
    d.push(bytes.subarray(i, i + chunk));
    for (let f = d.next(); f !== null; f = d.next()) types.push(f.type);
  }
  d.finish();
  return types;
}

test('frames decode whole, whatever the chunking', () => {
  const s = sampleStream();
  const want = [FrameType.hello, FrameType.ramPages, FrameType.end];
  assert.deepEqual(decodeAll(s), want);
  assert.deepEqual(decodeAll(s, 1), want);
  assert.deepEqual(decodeAll(s, 7), want);
});

test('every single-byte corruption is refused with a typed error', () => {
  const s = sampleStream();
  for (let i = 0; i < s.byteLength; i++) {
    const bad = Buffer.from(s);
    bad[i] = bad[i]! ^ 0x5a;
    assert.throws(() => decodeAll(bad), (e: unknown) => e instanceof StreamError, `corruption at byte ${i} was accepted`);
  }
});

test('reordered frames are refused', () => {
  const enc = new FrameEncoder();
  const a = enc.json(FrameType.hello, {});
  const b = enc.json(FrameType.setup, {});
  const s = Buffer.concat([encodePreamble(), ...b, ...a]);
  assert.throws(() => decodeAll(s), (e: unknown) => e instanceof StreamError && e.code === 'FRAME_ORDER');
});

test('a length above the limit is refused before allocation', () => {
  const s = Buffer.concat([encodePreamble(), Buffer.alloc(16)]);
  s.writeUInt8(FrameType.ramPages, 12);
  s.writeUInt32BE(limits.frameBytesMax + 1, 12 + 8);
  assert.throws(() => decodeAll(s), (e: unknown) => e instanceof StreamError && e.code === 'FRAME_TOO_LARGE');
});

test('wrong version and wrong magic are named', () => {
  const s = sampleStream();
  const v = Buffer.from(s);
  v.writeUInt32BE(99, 8);
  assert.throws(() => decodeAll(v), /version 99 is not supported/);
  assert.throws(() => decodeAll(Buffer.from('hello world, not a stream')), /bad magic/);
});
