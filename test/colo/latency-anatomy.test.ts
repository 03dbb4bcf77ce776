/**
 * The latency trace (src/core/latency-trace.ts) and its analysis (bench/latency-anatomy.ts) on
 * data made up here, so every figure is known: requests are paired with their replies once,
 * and the slowest requests are attributed to the checkpoint window they began in.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { LatencyTrace } from '../../src/core/latency-trace.js';
import { anatomy } from '../../bench/latency-anatomy.js';

test('latency trace: a request is the first input on a connection with no reply pending; the next reply ends it', () => {
  const t = new LatencyTrace();
  t.requestRead(1, 10);
  t.requestRead(1, 11); // more input before the reply: the same request
  t.requestRead(2, 12);
  t.replyWritten(1, 15);
  t.replyWritten(1, 16); // no request pending: not a reply to anything
  t.replyWritten(3, 17); // a connection never read
  t.replyWritten(2, 20);
  t.event('P>CHECKPOINT_REQUEST', 30);
  assert.deepEqual(t.data(), { requests: [1, 10, 15, 2, 12, 20], events: ['P>CHECKPOINT_REQUEST', 30], dropped: 0 });
});

test('latency anatomy: percentiles, the checkpoint timeline, and the slowest requests that began in a checkpoint', () => {
  const primary = new LatencyTrace();
  const secondary = new LatencyTrace();
  // Two checkpoints: [100, 105] and [200, 205].
  for (const at of [100, 200]) {
    primary.event('P>CHECKPOINT_REQUEST', at);
    secondary.event('S<CHECKPOINT_REQUEST', at + 0.2);
    primary.event('P<CHECKPOINT_REPLY', at + 1);
    primary.event('P<VMSTATE_LOADED', at + 5);
  }
  // 990 fast requests (about 1 ms), none in a checkpoint; 10 slow ones (20 ms and more), 6 of
  // them begun inside one.
  for (let i = 0; i < 990; i++) {
    const start = 300 + i;
    primary.requestRead(i, start);
    primary.replyWritten(i, start + 1 + i * 1e-4);
  }
  const slowStarts = [101, 102, 103, 201, 202, 204.5, 150, 250, 1400, 1500];
  slowStarts.forEach((start, k) => {
    primary.requestRead(5000 + k, start);
    primary.replyWritten(5000 + k, start + 20 + k);
  });
  const a = anatomy([primary.data(), secondary.data()]);
  assert.equal(a.requests, 1000);
  assert.equal(a.checkpoints, 2);
  assert.ok(Math.abs(a.p50 - 1.05) < 0.01, `p50 ${a.p50}`);
  // The p99 is the 990th value, the slowest fast one (begun at 1289, outside): it and the ten.
  assert.ok(Math.abs(a.p99 - (1 + 989e-4)) < 1e-9, `p99 ${a.p99}`);
  assert.equal(a.slowest, 11);
  assert.equal(a.slowestInWindow, 6);
  assert.deepEqual(
    a.timeline.map((x) => [x.event, Number(x.ms.toFixed(3)), x.n]),
    [
      ['P>CHECKPOINT_REQUEST', 0, 2],
      ['S<CHECKPOINT_REQUEST', 0.2, 2],
      ['P<CHECKPOINT_REPLY', 1, 2],
      ['P<VMSTATE_LOADED', 5, 2],
    ],
  );
  // 10 ms of checkpoints in the 1,428 ms from the first request (at 101) to the last reply (at 1529).
  assert.ok(Math.abs(a.windowShare - 10 / 1428) < 1e-9, `window share ${a.windowShare}`);
});
