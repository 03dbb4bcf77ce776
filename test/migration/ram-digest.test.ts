import { test } from 'node:test';
import assert from 'node:assert/strict';
import { RestoreError } from '../../src/core/errors.js';
import { checkRamDigest, ramDigest } from '../../src/migration/ram-digest.js';

test('the RAM digest names the pages that differ, and only those in the ranges', () => {
  const a = new WebAssembly.Memory({ initial: 2, maximum: 4, shared: true });
  const b = new WebAssembly.Memory({ initial: 2, maximum: 4, shared: true });
  Buffer.from(a.buffer).fill(0x5a, 4096 * 3, 4096 * 20);
  Buffer.from(b.buffer).set(Buffer.from(a.buffer));
  const ranges = [[0, 10], [12, 32]] as const; // pages 10 and 11 left out (like the dirty log)
  const digest = ramDigest(a, ranges);
  assert.equal(Buffer.from(digest, 'base64').byteLength, 8 * 30);
  checkRamDigest(b, ranges, digest, 'test');
  Buffer.from(b.buffer)[4096 * 10 + 5] = 1; // outside the ranges: not part of the state
  checkRamDigest(b, ranges, digest, 'test');
  Buffer.from(b.buffer)[4096 * 7 + 4095] ^= 1; // the last byte of page 7
  Buffer.from(b.buffer)[4096 * 31] = 9; // the first byte of page 31
  assert.throws(
    () => checkRamDigest(b, ranges, digest, 'the checkpoint'),
    (err: unknown) => err instanceof RestoreError && err.code === 'RAM_DIGEST' && /^the checkpoint: guest RAM differs from the source's in 2 pages \(4 KiB page numbers 7, 31\)$/.test(err.message),
  );
  assert.throws(() => checkRamDigest(b, [[0, 8]], digest, 'x'), /the source summed 30 pages of RAM, this machine has 8/);
});
