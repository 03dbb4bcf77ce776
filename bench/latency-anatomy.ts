/**
 * Where the slow requests of a COLO pair wait: reads the latency traces the nodes wrote
 * (`COLO_TRACE_DIR`, src/core/latency-trace.ts) and prints the server-side latency
 * percentiles, a checkpoint's timeline (median ms after CHECKPOINT_REQUEST of every event), and
 * how many of the slowest 1 % of requests began inside a checkpoint (CHECKPOINT_REQUEST to
 * VMSTATE_LOADED on the primary).
 *
 *   COLO_TRACE_DIR=/tmp/t colo up ...   (or any run of the nodes; the directory must exist)
 *   ... load, then stop the nodes ...
 *   node dist/bench/latency-anatomy.js /tmp/t
 */
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { LatencyTraceData } from '../src/core/latency-trace.js';
import { median, quantileOfSorted, table } from './lib.js';

export interface Anatomy {
  requests: number;
  /** Server-side latency (request read → reply written), ms. */
  p50: number;
  p90: number;
  p99: number;
  p999: number;
  checkpoints: number;
  /** Share of the traced time inside a checkpoint window. */
  windowShare: number;
  /** Of the requests at or above the p99: how many, and how many began inside a window. */
  slowest: number;
  slowestInWindow: number;
  /** Median ms after CHECKPOINT_REQUEST, per event name, in order. */
  timeline: { event: string; ms: number; n: number }[];
}

const request = 'P>CHECKPOINT_REQUEST';
const loaded = 'P<VMSTATE_LOADED';

export function anatomy(traces: readonly LatencyTraceData[]): Anatomy {
  const lat: { start: number; ms: number }[] = [];
  const events: { name: string; at: number }[] = [];
  for (const t of traces) {
    for (let i = 0; i + 2 < t.requests.length; i += 3) lat.push({ start: t.requests[i + 1]!, ms: t.requests[i + 2]! - t.requests[i + 1]! });
    for (let i = 0; i + 1 < t.events.length; i += 2) events.push({ name: String(t.events[i]), at: Number(t.events[i + 1]) });
  }
  events.sort((a, b) => a.at - b.at);
  const starts = events.filter((e) => e.name === request).map((e) => e.at);
  const ends = events.filter((e) => e.name === loaded).map((e) => e.at);
  // A window: a request, to the first VMSTATE_LOADED after it (an unfinished one: to the last event).
  const last = events.length === 0 ? 0 : events[events.length - 1]!.at;
  const windows = starts.map((s) => {
    const e = ends.find((x) => x >= s);
    return [s, e ?? last] as const;
  });
  const within = (t: number): boolean => {
    const i = lastAtOrBefore(starts, t);
    return i >= 0 && t <= windows[i]![1];
  };
  const ms = lat.map((r) => r.ms).sort((a, b) => a - b);
  const q = (x: number): number => (ms.length === 0 ? 0 : quantileOfSorted(ms, x));
  const p99 = q(0.99);
  const slow = lat.filter((r) => r.ms >= p99);
  const offsets = new Map<string, number[]>();
  for (const e of events) {
    // The checkpoint the event belongs to: the last one requested at or before it.
    const i = lastAtOrBefore(starts, e.at);
    if (i < 0) continue;
    const xs = offsets.get(e.name) ?? [];
    xs.push(e.at - starts[i]!);
    offsets.set(e.name, xs);
  }
  let first = Infinity;
  let end = -Infinity;
  for (const r of lat) {
    first = Math.min(first, r.start);
    end = Math.max(end, r.start + r.ms);
  }
  const span = lat.length === 0 ? 0 : end - first;
  const windowTime = windows.reduce((n, [a, b]) => n + (b - a), 0);
  return {
    requests: lat.length,
    p50: q(0.5),
    p90: q(0.9),
    p99,
    p999: q(0.999),
    checkpoints: windows.length,
    windowShare: span > 0 ? Math.min(1, windowTime / span) : 0,
    slowest: slow.length,
    slowestInWindow: slow.filter((r) => within(r.start)).length,
    timeline: [...offsets]
      .map(([event, xs]) => ({ event, ms: median(xs), n: xs.length }))
      .filter((x) => x.n >= Math.max(1, windows.length / 2))
      .sort((a, b) => a.ms - b.ms),
  };
}

/** Index of the last of the ascending `xs` that is ≤ `t` (-1: none). */
function lastAtOrBefore(xs: readonly number[], t: number): number {
  let found = -1;
  for (let lo = 0, hi = xs.length - 1; lo <= hi; ) {
    const mid = (lo + hi) >> 1;
    if (xs[mid]! <= t) {
      found = mid;
      lo = mid + 1;
    } else hi = mid - 1;
  }
  return found;
}

export function readTraces(dir: string): LatencyTraceData[] {
  return fs
    .readdirSync(dir)
    .filter((f) => /^trace-\d+\.json$/.test(f))
    .map((f) => JSON.parse(fs.readFileSync(path.join(dir, f), 'utf8')) as LatencyTraceData);
}

function main(): void {
  const dir = process.argv[2];
  if (dir === undefined) {
    process.stderr.write('usage: node dist/bench/latency-anatomy.js DIR (the COLO_TRACE_DIR the nodes wrote to)\n');
    process.exitCode = 2;
    return;
  }
  const a = anatomy(readTraces(dir));
  const f = (x: number): string => x.toFixed(2);
  table([
    ['requests', 'p50 ms', 'p90 ms', 'p99 ms', 'p99.9 ms', 'checkpoints', 'time in checkpoints', 'slowest 1 % begun in a checkpoint'],
    [a.requests, f(a.p50), f(a.p90), f(a.p99), f(a.p999), a.checkpoints, `${(100 * a.windowShare).toFixed(1)} %`, `${a.slowestInWindow} of ${a.slowest}`],
  ]);
  table([['event', 'median ms after CHECKPOINT_REQUEST', 'n'], ...a.timeline.map((x) => [x.event, f(x.ms), x.n])]);
}

if (process.argv[1] !== undefined && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) main();
