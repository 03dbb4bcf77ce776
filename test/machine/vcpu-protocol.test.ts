/** The vCPU's output batch (worker to main thread): every event kind round-trips, bytes and all. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { decodeOutputBatch, encodeOutputBatch } from '../../src/machine/vcpu-protocol.js';
import type { NicOutput } from '../../src/net/nic.js';

test('vcpu protocol: an output batch round-trips every event kind in order', () => {
  const outs: NicOutput[] = [
    { kind: 'out', conn: 7, offset: 0, bytes: new TextEncoder().encode('+OK\r\n') },
    { kind: 'out', conn: 0xffffffff, offset: 2 ** 40 + 3, bytes: new Uint8Array(0) },
    { kind: 'shut', conn: 8, offset: 12 },
    { kind: 'out', conn: 9, offset: 5, bytes: Uint8Array.from({ length: 70000 }, (_, i) => i & 0xff) },
    { kind: 'close', conn: 7, offset: 5 },
  ];
  const b = encodeOutputBatch(outs);
  assert.equal(b.byteLength, 5 * 17 + 5 + 70000);
  assert.deepEqual(decodeOutputBatch(b), outs);
  assert.deepEqual(decodeOutputBatch(encodeOutputBatch([])), []);
  // A cut batch is refused, not read past its end.
  assert.throws(() => decodeOutputBatch(b.subarray(0, 17 + 3)), /bad output batch/);
});
