/**
 * The latency trace (src/core/latency-trace.ts) and its analysis (bench/latency-anatomy.ts) on
 * data made up here, so every figure is known: requests are paired with their replies once,
 * and the slowest requests are attributed to the checkpoint window they began in.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { LatencyTrace, SharedTraceLog, vcpuTrace, vcpuTraceEvents } from '../../src/core/latency-trace.js';
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
  // Nothing but single slow requests, and no data-path events: no stalls, nothing to attribute.
  assert.deepEqual(a.stalls, { count: 0, largest: 3, inStalls: 0 });
  assert.deepEqual(a.waitedOn, { pvm: 0, svm: 0, checkpoint: 0, unknown: 11 });
  assert.deepEqual(a.gc, [
    { node: 'primary', count: 0, ms: 0, slowOverlapping: 0 },
    { node: 'secondary', count: 0, ms: 0, slowOverlapping: 0 },
  ]);
  // By time since the last request: 101 and 201 in the first 2 ms, 102, 103, 202 and 204.5 in
  // the next 3; the rest (the 990 fast ones, 150, 250, 1400, 1500) 25 ms or more after one.
  assert.deepEqual(
    a.sinceRequest.map((b) => [b.fromMs, b.toMs, b.requests, Number(b.meanMs.toFixed(4)), b.slowest]),
    [
      [0, 2, 2, 21.5, 2],
      [2, 5, 4, 23, 4],
      [5, 10, 0, 0, 0],
      [10, 25, 0, 0, 0],
      [25, Infinity, 994, Number(((990 + (989 * 990 * 1e-4) / 2 + 26 + 27 + 28 + 29) / 994).toFixed(4)), 5],
    ],
  );
  // Without the six begun inside a window: 994 requests, the four slow ones (26–29 ms) among
  // them; their p99 (nearest rank, the 985th) is a fast one, begun at 1284.
  assert.ok(Math.abs(a.p99ClearOfCheckpoints - (1 + 984e-4)) < 1e-9, `clear p99 ${a.p99ClearOfCheckpoints}`);
});

test('latency anatomy: the p99 clear of checkpoints leaves out the requests begun inside a window, however long it lasted', () => {
  const primary = new LatencyTrace();
  // One checkpoint whose window lasts 12 ms: [100, 112].
  primary.event('P>CHECKPOINT_REQUEST', 100);
  primary.event('P<VMSTATE_LOADED', 112);
  for (let i = 0; i < 200; i++) {
    primary.requestRead(i, 200 + i);
    primary.replyWritten(i, 201 + i);
  }
  // Slow ones begun 1, 7 and 11 ms into the window, and one begun after it.
  [101, 107, 111, 113].forEach((start, k) => {
    primary.requestRead(1000 + k, start);
    primary.replyWritten(1000 + k, start + 30 + k);
  });
  const a = anatomy([primary.data()]);
  assert.equal(a.requests, 204);
  // 201 requests outside the window, one of them slow (33 ms): the nearest-rank p99 (the 199th) is 1 ms.
  assert.equal(a.p99ClearOfCheckpoints, 1);
  assert.ok(a.p99 > 30, `all requests: the slow ones set the p99 (${a.p99})`);
  assert.deepEqual(
    a.sinceRequest.map((b) => [b.fromMs, b.requests]),
    [
      [0, 1],
      [2, 0],
      [5, 1],
      [10, 2],
      [25, 200],
    ],
  );
});

test('latency anatomy: slow requests in a burst are a stall; each reply is put down to the output that came last before it, and collections to the requests they overlap', () => {
  const primary = new LatencyTrace();
  const secondary = new LatencyTrace();
  primary.event('P>CHECKPOINT_REQUEST', 5000);
  primary.event('P<VMSTATE_RECEIVED', 5004);
  primary.event('P<VMSTATE_LOADED', 5006);
  // 1,980 fast requests (about 0.5 ms), each answered after both guests' output (PVM's last).
  for (let i = 0; i < 1980; i++) {
    const start = 100 + 2 * i;
    primary.requestRead(i, start);
    secondary.event('S:mirrorIn', start + 0.1);
    primary.event('P:svmOut', start + 0.4);
    primary.event('P:pvmOut', start + 0.5 + i * 1e-5);
    primary.replyWritten(i, start + 0.5 + i * 1e-5);
  }
  // A stall of 12 requests begun 1 ms apart at 10,000, answered when the SVM's output came
  // (at 10,030) after the PVM's (10,020); a garbage collection on the primary from 10,001 to 10,003.
  for (let k = 0; k < 12; k++) primary.requestRead(9000 + k, 10000 + k);
  primary.event('gc', 10001);
  primary.event('gc-end', 10003);
  primary.event('P:pvmOut', 10020);
  primary.event('P:svmOut', 10030);
  for (let k = 0; k < 12; k++) primary.replyWritten(9000 + k, 10030);
  // Eight lone slow ones, 50 ms apart, four released at the checkpoint (begun at 5001), four
  // after the PVM's output on a secondary's collection.
  secondary.event('gc', 20000);
  secondary.event('gc-end', 20500);
  for (let k = 0; k < 8; k++) {
    const start = k < 4 ? 5001 - k * 0.001 : 20000 + 50 * k;
    primary.requestRead(9100 + k, start);
    if (k >= 4) primary.event('P:pvmOut', start + 30);
    primary.replyWritten(9100 + k, k < 4 ? 5004 : start + 30);
  }
  const a = anatomy([primary.data(), secondary.data()]);
  assert.equal(a.requests, 2000);
  // The p99 is the slowest fast one: it and the twenty.
  assert.equal(a.slowest, 21, `p99 ${a.p99}`);
  assert.deepEqual(a.stalls, { count: 1, largest: 12, inStalls: 12 });
  assert.deepEqual(a.waitedOn, { pvm: 5, svm: 12, checkpoint: 4, unknown: 0 });
  assert.deepEqual(a.gc, [
    { node: 'primary', count: 1, ms: 2, slowOverlapping: 4 },
    { node: 'secondary', count: 1, ms: 500, slowOverlapping: 4 },
  ]);
  // The data-path events are not steps of the checkpoint.
  assert.deepEqual(a.timeline.map((x) => x.event), ['P>CHECKPOINT_REQUEST', 'P<VMSTATE_RECEIVED', 'P<VMSTATE_LOADED']);
});

test("latency trace: a vCPU's shared log joins the main thread's trace, and the anatomy times each wake-up by input", () => {
  // The codes the vCPU records name the events the anatomy reads.
  assert.deepEqual(
    Object.entries(vcpuTrace).map(([k, code]) => [k, vcpuTraceEvents[code]]),
    [['wait', 'vcpu:wait'], ['woken', 'vcpu:woken'], ['input', 'vcpu:input'], ['output', 'vcpu:output'], ['gc', 'vcpu:gc'], ['gcEnd', 'vcpu:gc-end']],
  );
  const log = SharedTraceLog.create(8);
  // The vCPU's side (in production another thread, over the same SharedArrayBuffer).
  const vcpu = new SharedTraceLog(log.buffer);
  const main = new LatencyTrace();
  main.attach(log, vcpuTraceEvents);
  // Woken by input: handed over at 10.5 (again at 10.7), running at 11.
  vcpu.record(vcpuTrace.wait, 10);
  main.event('input:notify', 10.5);
  main.event('input:notify', 10.7);
  vcpu.record(vcpuTrace.woken, 11);
  // A timeout: no input came.
  vcpu.record(vcpuTrace.wait, 20);
  vcpu.record(vcpuTrace.woken, 20.1);
  // Input handed over while the vCPU ran does not count; the next wait's does (2 ms).
  main.event('input:notify', 29);
  vcpu.record(vcpuTrace.wait, 30);
  main.event('input:notify', 32);
  vcpu.record(vcpuTrace.woken, 34);
  vcpu.record(vcpuTrace.output, 35);
  vcpu.record(vcpuTrace.wait, 40); // still waiting at the end
  vcpu.record(vcpuTrace.input, 41); // the ninth event: beyond the log's eight, dropped
  const d = main.data();
  assert.equal(d.dropped, 1);
  const names: string[] = [];
  for (let i = 0; i < d.events.length; i += 2) names.push(String(d.events[i]));
  assert.deepEqual(names, [
    'input:notify', 'input:notify', 'input:notify', 'input:notify',
    'vcpu:wait', 'vcpu:woken', 'vcpu:wait', 'vcpu:woken', 'vcpu:wait', 'vcpu:woken', 'vcpu:output', 'vcpu:wait',
  ]);
  // A second data() adds nothing twice.
  assert.equal(main.data().events.length, d.events.length);
  // With a request, so that this trace is the primary's.
  const a = anatomy([{ ...d, requests: [1, 9, 12] }]);
  assert.deepEqual(a.vcpuWake, [{ node: 'primary', waits: 4, woken: 2, p50: 0.5, p90: 2, p99: 2, over1ms: 1 }]);
  // None of it is a step of a checkpoint.
  assert.deepEqual(a.timeline, []);
});

test('latency anatomy: replies held for the SVM\'s copy are put down to a checkpoint, the SVM writing late, or the primary reading late', () => {
  const primary = new LatencyTrace();
  const secondary = new LatencyTrace();
  primary.requestRead(1, 0);
  primary.replyWritten(1, 1);
  primary.event('P>CHECKPOINT_REQUEST', 100);
  primary.event('P<VMSTATE_LOADED', 106);
  const held = (from: number, to: number): void => {
    primary.event('P:lateCopyFrom', from);
    primary.event('P:lateCopyTo', to);
  };
  // In the checkpoint: two replies released by one read of the SVM's output.
  held(103, 108);
  held(104, 108);
  // The SVM's vCPU wrote at 204.8, the primary read it at 205: the SVM was late.
  secondary.event('vcpu:wait', 190);
  secondary.event('vcpu:output', 204.8);
  held(201, 205);
  // The SVM wrote at 300.5, the primary read it only at 304: the primary was late (three replies).
  secondary.event('vcpu:output', 300.5);
  held(301, 304);
  held(301.2, 304);
  held(301.4, 304);
  // Not more than 2 ms: not counted.
  held(400, 401.5);
  const a = anatomy([primary.data(), secondary.data()]);
  assert.deepEqual(a.lateCopies, {
    lateMs: 2,
    chunks: 6,
    episodes: 3,
    by: {
      checkpoint: { episodes: 1, chunks: 2 },
      svmWroteLate: { episodes: 1, chunks: 1 },
      primaryReadLate: { episodes: 1, chunks: 3 },
      untraced: { episodes: 0, chunks: 0 },
    },
  });
  // The pairs are data events, not steps of a checkpoint.
  assert.deepEqual(a.timeline.map((x) => x.event), ['P>CHECKPOINT_REQUEST', 'P<VMSTATE_LOADED']);
  // Without the secondary's vCPU events its writes are unknown.
  const b = anatomy([primary.data(), new LatencyTrace().data()], 1);
  assert.deepEqual(b.lateCopies.by, {
    checkpoint: { episodes: 1, chunks: 2 },
    svmWroteLate: { episodes: 0, chunks: 0 },
    primaryReadLate: { episodes: 0, chunks: 0 },
    untraced: { episodes: 3, chunks: 5 },
  });
});
