import { test } from 'node:test';
import assert from 'node:assert/strict';
import { InputRingReader, InputRingWriter, createInputRing } from '../../src/machine/input-ring.js';
import type { NicInput } from '../../src/net/nic.js';
import { rng } from '../framework/rng.js';

const show = (ev: NicInput): string => `${ev.seq}:${ev.kind}:${ev.conn}${ev.kind === 'data' ? `:${Buffer.from(ev.bytes).toString('hex')}` : ''}`;

test('input ring: events come out in order and whole, across the wrap, and a full ring takes only what fits', () => {
  const buf = createInputRing(256);
  const w = new InputRingWriter(buf);
  const r = new InputRingReader(buf);
  const next = rng(7);
  let seq = 0;
  const sent: string[] = [];
  const got: string[] = [];
  let queue: NicInput[] = [];
  for (let round = 0; round < 2000; round++) {
    const n = Math.floor(next() * 5);
    for (let i = 0; i < n; i++) {
      const k = Math.floor(next() * 3);
      const conn = Math.floor(next() * 9);
      const ev: NicInput = k === 1 ? { seq: ++seq, kind: 'data', conn, bytes: Uint8Array.from({ length: Math.floor(next() * 60) }, () => Math.floor(next() * 256)) } : { seq: ++seq, kind: k === 0 ? 'open' : 'close', conn };
      queue.push(ev);
    }
    const took = w.write(queue);
    for (const ev of queue.slice(0, took)) sent.push(show(ev));
    queue = queue.slice(took);
    if (next() < 0.6) r.read((ev) => got.push(show(ev)));
  }
  w.write(queue);
  for (const ev of queue) sent.push(show(ev));
  r.read((ev) => got.push(show(ev)));
  assert.ok(sent.length > 3000);
  assert.deepEqual(got, sent);
  assert.equal(w.fits({ seq: 1, kind: 'data', conn: 1, bytes: new Uint8Array(300) }), false);
  assert.throws(() => createInputRing(1000), /power of two/);
});
