/**
 * Where the slow requests of a COLO pair wait: reads the latency traces the nodes wrote
 * (`COLO_TRACE_DIR`, src/core/latency-trace.ts) and prints the server-side latency
 * percentiles, a checkpoint's timeline (median ms after CHECKPOINT_REQUEST of every event), and
 * how many of the slowest 1 % of requests began inside a checkpoint (CHECKPOINT_REQUEST to
 * VMSTATE_LOADED on the primary). For those slowest requests it also says whether they came in
 * bursts (stalls: many slow requests begun within milliseconds of each other, the whole
 * pipeline held up at once), what each one's reply waited for last (the PVM's output, the
 * SVM's, or the release at a checkpoint), and how many overlapped a garbage collection of
 * either node's main thread or vCPU thread. For each node's vCPU it prints how long the vCPU
 * took to run after its main thread handed it input while it waited for some. Of the replies
 * the compare held more than 2 ms for the SVM's copy, it says why the copy was late: the PVM's
 * output came inside a checkpoint (the SVM's copy comes only after the apply), the SVM's vCPU
 * wrote it late, or the primary's main thread read it late (more than 0.5 ms after the SVM's
 * vCPU wrote its last output before it). Last, the requests by how long after a
 * CHECKPOINT_REQUEST they began: how a checkpoint holds up the requests that come right after it.
 *
 *   COLO_TRACE_DIR=/tmp/t colo up ...   (or any run of the nodes; the directory must exist)
 *   ... load, then stop the nodes ...
 *   node dist/bench/latency-anatomy.js /tmp/t
 */
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { vcpuTraceEvents, type LatencyTraceData } from '../src/core/latency-trace.js';
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
  /**
   * The slowest requests in bursts: a burst is a run of them each begun within
   * `stallGapMs` of the one before. `inStalls`: how many are in bursts of `stallMin` or more.
   */
  stalls: { count: number; largest: number; inStalls: number };
  /** What each slowest request's reply came right after (the last of these before it was written). */
  waitedOn: { pvm: number; svm: number; checkpoint: number; unknown: number };
  /** Garbage collections per node and thread (the first trace with requests is the primary's). */
  gc: { node: string; count: number; ms: number; slowOverlapping: number }[];
  /**
   * Per node whose vCPU was traced: of the vCPU's waits for input, those the main thread
   * ended by handing it input (`woken`), and how long from that hand-over until the vCPU ran
   * (ms; the scheduler's delay, mostly).
   */
  vcpuWake: { node: string; waits: number; woken: number; p50: number; p90: number; p99: number; over1ms: number }[];
  /**
   * Replies the compare held more than `lateMs` for the SVM's copy (the chunks of them), in
   * episodes (one per release: the chunks a read of the SVM's output matched), by why the copy
   * was late. `untraced`: the secondary's vCPU was not traced, so its writes are unknown.
   */
  lateCopies: { lateMs: number; chunks: number; episodes: number; by: Record<LateCause, { episodes: number; chunks: number }> };
  /**
   * Requests by when they began after the last CHECKPOINT_REQUEST (ms, bins from `sinceRequestEdges`;
   * those begun before the first checkpoint are left out): how many, their mean latency, and how
   * many of the slowest 1 % are among them. A checkpoint that holds the pipeline up shows as
   * slow bins right after the request.
   */
  sinceRequest: { fromMs: number; toMs: number; requests: number; meanMs: number; slowest: number }[];
  /**
   * The p99 of the requests begun outside every checkpoint window (CHECKPOINT_REQUEST to
   * VMSTATE_LOADED): about what the p99 would be if checkpoints held up nothing.
   */
  p99ClearOfCheckpoints: number;
}

export type LateCause = 'checkpoint' | 'svmWroteLate' | 'primaryReadLate' | 'untraced';
/** A copy that waited on the primary this long after the SVM's vCPU wrote it was read late. */
const readLateMs = 0.5;

/** Data-path events: not steps of a checkpoint, left out of its timeline. */
const dataEvents = new Set<string>(['P:mirror', 'P:pvmOut', 'P:svmOut', 'P:svmMain', 'S:mirrorIn', 'P:lateCopyFrom', 'P:lateCopyTo', 'gc', 'gc-end', 'input:notify', ...vcpuTraceEvents]);
const stallGapMs = 2;
const stallMin = 10;
/** Bin edges of `sinceRequest`, ms after CHECKPOINT_REQUEST (the last bin is open). */
export const sinceRequestEdges = [0, 2, 5, 10, 25] as const;

const request = 'P>CHECKPOINT_REQUEST';
const loaded = 'P<VMSTATE_LOADED';

export function anatomy(traces: readonly LatencyTraceData[], lateMs = 2): Anatomy {
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
  // The primary's front end is the one that traces requests.
  const primaryTrace = traces.findIndex((t) => t.requests.length > 0);
  const offsets = new Map<string, number[]>();
  for (const e of events) {
    if (dataEvents.has(e.name)) continue;
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
    stalls: stallsOf(slow.map((r) => r.start)),
    waitedOn: waitedOn(slow, events),
    gc: traces.flatMap((t, i) => {
      const node = i === primaryTrace ? 'primary' : 'secondary';
      const rows = [gcOf(t, node, slow, 'gc', 'gc-end')];
      if (t.events.includes('vcpu:gc')) rows.push(gcOf(t, `${node} vCPU`, slow, 'vcpu:gc', 'vcpu:gc-end'));
      return rows;
    }),
    vcpuWake: traces.flatMap((t, i) => {
      const w = vcpuWakeOf(t);
      return w === null ? [] : [{ node: i === primaryTrace ? 'primary' : 'secondary', ...w }];
    }),
    lateCopies: lateCopiesOf(traces, primaryTrace, within, lateMs),
    ...sinceRequestOf(lat, starts, p99, within),
    timeline: [...offsets]
      .map(([event, xs]) => ({ event, ms: median(xs), n: xs.length }))
      .filter((x) => x.n >= Math.max(1, windows.length / 2))
      .sort((a, b) => a.ms - b.ms),
  };
}

/** The requests by time since the last CHECKPOINT_REQUEST, and the p99 of those begun outside every window. */
function sinceRequestOf(
  lat: readonly { start: number; ms: number }[],
  requests: readonly number[],
  p99: number,
  inWindow: (t: number) => boolean,
): Pick<Anatomy, 'sinceRequest' | 'p99ClearOfCheckpoints'> {
  const bins = sinceRequestEdges.map((fromMs, i) => ({ fromMs, toMs: sinceRequestEdges[i + 1] ?? Infinity, requests: 0, sum: 0, slowest: 0 }));
  const clear: number[] = [];
  for (const r of lat) {
    if (!inWindow(r.start)) clear.push(r.ms);
    const i = lastAtOrBefore(requests, r.start);
    if (i < 0) continue;
    const b = bins[lastAtOrBefore(sinceRequestEdges, r.start - requests[i]!)]!;
    b.requests += 1;
    b.sum += r.ms;
    if (r.ms >= p99) b.slowest += 1;
  }
  clear.sort((a, b) => a - b);
  return {
    sinceRequest: bins.map(({ fromMs, toMs, requests: n, sum, slowest }) => ({ fromMs, toMs, requests: n, meanMs: n === 0 ? 0 : sum / n, slowest })),
    p99ClearOfCheckpoints: clear.length === 0 ? 0 : quantileOfSorted(clear, 0.99),
  };
}

function stallsOf(starts: number[]): Anatomy['stalls'] {
  const xs = [...starts].sort((a, b) => a - b);
  let count = 0;
  let largest = 0;
  let inStalls = 0;
  for (let i = 0; i < xs.length; ) {
    let j = i + 1;
    while (j < xs.length && xs[j]! - xs[j - 1]! <= stallGapMs) j++;
    const n = j - i;
    largest = Math.max(largest, n);
    if (n >= stallMin) {
      count += 1;
      inStalls += n;
    }
    i = j;
  }
  return { count, largest, inStalls };
}

function waitedOn(slow: readonly { start: number; ms: number }[], events: readonly { name: string; at: number }[]): Anatomy['waitedOn'] {
  const kinds: [keyof Anatomy['waitedOn'], number[]][] = [
    ['pvm', events.filter((e) => e.name === 'P:pvmOut').map((e) => e.at)],
    ['svm', events.filter((e) => e.name === 'P:svmOut' || e.name === 'P:svmMain').map((e) => e.at)],
    ['checkpoint', events.filter((e) => e.name === 'P<VMSTATE_RECEIVED').map((e) => e.at)],
  ];
  const out = { pvm: 0, svm: 0, checkpoint: 0, unknown: 0 };
  for (const r of slow) {
    const reply = r.start + r.ms;
    let best: keyof Anatomy['waitedOn'] = 'unknown';
    let bestAt = r.start;
    for (const [kind, ats] of kinds) {
      const i = lastAtOrBefore(ats, reply);
      if (i >= 0 && ats[i]! >= bestAt) {
        best = kind;
        bestAt = ats[i]!;
      }
    }
    out[best] += 1;
  }
  return out;
}

function gcOf(t: LatencyTraceData, node: string, slow: readonly { start: number; ms: number }[], begin: string, end: string): Anatomy['gc'][number] {
  const spans: [number, number][] = [];
  for (let i = 0; i + 3 < t.events.length; i += 2) {
    if (t.events[i] === begin && t.events[i + 2] === end) spans.push([Number(t.events[i + 1]), Number(t.events[i + 3])]);
  }
  spans.sort((a, b) => a[0] - b[0]);
  const startsAt = spans.map((x) => x[0]);
  let slowOverlapping = 0;
  for (const r of slow) {
    // The last collection begun before the reply, if it ended after the request was read (one
    // thread's collections do not overlap, so no earlier one ends later).
    const i = lastAtOrBefore(startsAt, r.start + r.ms);
    if (i >= 0 && spans[i]![1] >= r.start) slowOverlapping += 1;
  }
  return { node, count: spans.length, ms: spans.reduce((n, [a, b]) => n + (b - a), 0), slowOverlapping };
}

/**
 * The vCPU's wake-ups by input: from the first `input:notify` of the main thread during a
 * `vcpu:wait` to its `vcpu:woken` (null: the trace has no vCPU events).
 */
function vcpuWakeOf(t: LatencyTraceData): Omit<Anatomy['vcpuWake'][number], 'node'> | null {
  const evs: { name: string; at: number }[] = [];
  for (let i = 0; i + 1 < t.events.length; i += 2) {
    const name = String(t.events[i]);
    if (name === 'vcpu:wait' || name === 'vcpu:woken' || name === 'input:notify') evs.push({ name, at: Number(t.events[i + 1]) });
  }
  // A stable sort: the vCPU's own events keep their order when two times are equal.
  evs.sort((a, b) => a.at - b.at);
  let waits = 0;
  let waiting = false;
  let notifiedAt: number | null = null;
  const delays: number[] = [];
  for (const e of evs) {
    if (e.name === 'vcpu:wait') {
      waits += 1;
      waiting = true;
      notifiedAt = null;
    } else if (e.name === 'input:notify') {
      if (waiting && notifiedAt === null) notifiedAt = e.at;
    } else {
      if (waiting && notifiedAt !== null) delays.push(e.at - notifiedAt);
      waiting = false;
    }
  }
  if (waits === 0) return null;
  delays.sort((a, b) => a - b);
  const q = (x: number): number => (delays.length === 0 ? 0 : quantileOfSorted(delays, x));
  return { waits, woken: delays.length, p50: q(0.5), p90: q(0.9), p99: q(0.99), over1ms: delays.filter((d) => d > 1).length };
}

function lateCopiesOf(traces: readonly LatencyTraceData[], primaryTrace: number, inCheckpoint: (t: number) => boolean, lateMs: number): Anatomy['lateCopies'] {
  // The pairs, read in the order they were recorded (P:lateCopyFrom, then P:lateCopyTo).
  const late: { from: number; to: number }[] = [];
  const p = traces[primaryTrace];
  if (p !== undefined) {
    for (let i = 0; i + 3 < p.events.length; i += 2) {
      if (p.events[i] !== 'P:lateCopyFrom' || p.events[i + 2] !== 'P:lateCopyTo') continue;
      const from = Number(p.events[i + 1]);
      const to = Number(p.events[i + 3]);
      if (to - from > lateMs) late.push({ from, to });
    }
  }
  // The secondary's vCPU writes of SVM output (the trace without requests that has vCPU events).
  const writes: number[] = [];
  let svmTraced = false;
  traces.forEach((t, i) => {
    if (i === primaryTrace) return;
    for (let j = 0; j + 1 < t.events.length; j += 2) {
      if (t.events[j] === 'vcpu:wait') svmTraced = true;
      if (t.events[j] === 'vcpu:output') writes.push(Number(t.events[j + 1]));
    }
  });
  writes.sort((a, b) => a - b);
  const by: Anatomy['lateCopies']['by'] = {
    checkpoint: { episodes: 0, chunks: 0 },
    svmWroteLate: { episodes: 0, chunks: 0 },
    primaryReadLate: { episodes: 0, chunks: 0 },
    untraced: { episodes: 0, chunks: 0 },
  };
  // An episode: the chunks one read of the SVM's output released (the same `to`).
  const episodes = new Map<number, number[]>();
  for (const l of late) {
    const e = episodes.get(l.to) ?? [];
    e.push(l.from);
    episodes.set(l.to, e);
  }
  for (const [to, froms] of episodes) {
    const from = Math.min(...froms);
    let cause: LateCause;
    if (inCheckpoint(from)) cause = 'checkpoint';
    else if (!svmTraced) cause = 'untraced';
    else {
      const i = lastAtOrBefore(writes, to);
      cause = i >= 0 && to - writes[i]! > readLateMs ? 'primaryReadLate' : 'svmWroteLate';
    }
    by[cause].episodes += 1;
    by[cause].chunks += froms.length;
  }
  return { lateMs, chunks: late.length, episodes: episodes.size, by };
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
  const w = a.waitedOn;
  table([
    ['slowest 1 %', 'in stalls (≥ 10 begun ≤ 2 ms apart)', 'stalls', 'largest', 'reply after PVM output', 'after SVM output', 'at a checkpoint', 'untraced'],
    [a.slowest, a.stalls.inStalls, a.stalls.count, a.stalls.largest, w.pvm, w.svm, w.checkpoint, w.unknown],
  ]);
  const total = a.sinceRequest.reduce((n, b) => n + b.requests, 0);
  table([
    ['begun after CHECKPOINT_REQUEST, ms', 'requests', 'share', 'mean ms', 'of the slowest 1 %'],
    ...a.sinceRequest.map((b) => [
      b.toMs === Infinity ? `${b.fromMs}+` : `${b.fromMs}–${b.toMs}`,
      b.requests,
      `${total === 0 ? '0.0' : ((100 * b.requests) / total).toFixed(1)} %`,
      f(b.meanMs),
      b.slowest,
    ]),
  ]);
  process.stdout.write(`p99 of the requests begun outside every checkpoint window (CHECKPOINT_REQUEST to VMSTATE_LOADED): ${f(a.p99ClearOfCheckpoints)} ms (all: ${f(a.p99)} ms)\n\n`);
  table([['node', 'collections', 'ms in all', 'slowest 1 % overlapping one'], ...a.gc.map((g) => [g.node, g.count, f(g.ms), g.slowOverlapping])]);
  const l = a.lateCopies;
  const cell = (c: LateCause): string => `${l.by[c].episodes} / ${l.by[c].chunks}`;
  table([
    [`replies held > ${l.lateMs} ms for the SVM's copy`, 'episodes', 'in a checkpoint (episodes / replies)', 'the SVM wrote it late', 'the primary read it late', 'secondary untraced'],
    [l.chunks, l.episodes, cell('checkpoint'), cell('svmWroteLate'), cell('primaryReadLate'), cell('untraced')],
  ]);
  if (a.vcpuWake.length > 0) {
    const ms = (x: number): string => x.toFixed(3);
    table([
      ['node', 'vCPU waits for input', 'ended by input', 'input → vCPU running, p50 ms', 'p90 ms', 'p99 ms', '> 1 ms'],
      ...a.vcpuWake.map((w) => [w.node, w.waits, w.woken, ms(w.p50), ms(w.p90), ms(w.p99), w.over1ms]),
    ]);
  }
}

if (process.argv[1] !== undefined && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) main();
