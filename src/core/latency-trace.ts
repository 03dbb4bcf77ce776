/**
 * An opt-in timing trace for latency analysis (`COLO_TRACE_DIR=DIR`): when each client request
 * was read and its reply written (the front end), when each COLO protocol event happened
 * (both drivers), when mirrored input and each guest's output passed (colo/network.ts:
 * `P:mirror`, `S:mirrorIn`, `P:pvmOut`, `P:svmOut`, `P:svmMain`), each reply the compare held
 * more than 1 ms for the SVM's copy (`P:lateCopyFrom` at the PVM's output, then `P:lateCopyTo`
 * at the SVM's, always in a row), when the main thread handed
 * client input to the vCPU (`input:notify`), the main thread's garbage collections (`gc`,
 * `gc-end`), and what the vCPU thread did: `vcpu:wait` for input, `vcpu:woken`, `vcpu:input`
 * taken from the ring, `vcpu:output` handed on, and its collections (`vcpu:gc`, `vcpu:gc-end`;
 * Node reports those only when the vCPU's event loop runs: at a pause, or in a COLO
 * secondary's waits, so a vCPU that never pauses shows none). Times are milliseconds on one
 * clock for every process of a host
 * (`performance.timeOrigin + performance.now()`), so the traces of a primary and a secondary
 * on one host line up. Read by `bench/latency-anatomy.ts`. Off (null) unless the variable is
 * set: the front end and the drivers pay one null check per request.
 */
import { PerformanceObserver } from 'node:perf_hooks';
import { isMainThread } from 'node:worker_threads';
import { limits } from './limits.js';

export interface LatencyTraceData {
  /** Triples: connection, request read at, reply written at. */
  requests: number[];
  /** Pairs: event name, at. */
  events: (string | number)[];
  /** Requests or events left out once the limit was reached. */
  dropped: number;
}

export function traceNow(): number {
  return performance.timeOrigin + performance.now();
}

/** What a vCPU thread traces (machine/vcpu-worker.ts), by code: a SharedTraceLog holds codes. */
export const vcpuTraceEvents = ['vcpu:wait', 'vcpu:woken', 'vcpu:input', 'vcpu:output', 'vcpu:gc', 'vcpu:gc-end'] as const;
export const vcpuTrace = { wait: 0, woken: 1, input: 2, output: 3, gc: 4, gcEnd: 5 } as const;

/**
 * Another thread's trace, kept in shared memory for the main thread to copy into its own when
 * it writes it: a worker thread cannot write a file at the process's exit, and writing one as
 * it goes would stall the very thread being traced. One writer thread, one reader. Layout:
 * two int32 (events written, events dropped), then (code, at) float64 pairs from byte 8.
 */
export class SharedTraceLog {
  private readonly counts: Int32Array;
  private readonly pairs: Float64Array;
  private copied = 0;

  constructor(readonly buffer: SharedArrayBuffer) {
    this.counts = new Int32Array(buffer, 0, 2);
    this.pairs = new Float64Array(buffer, 8);
  }

  static create(events: number): SharedTraceLog {
    return new SharedTraceLog(new SharedArrayBuffer(8 + 16 * events));
  }

  /** The writer's side. Beyond the capacity an event is counted as dropped. */
  record(code: number, at = traceNow()): void {
    const n = this.counts[0]!;
    if (2 * n + 2 > this.pairs.length) {
      Atomics.add(this.counts, 1, 1);
      return;
    }
    this.pairs[2 * n] = code;
    this.pairs[2 * n + 1] = at;
    Atomics.store(this.counts, 0, n + 1);
  }

  /** The reader's side: the events recorded since the last call, into `trace`, named by `names`. */
  copyInto(trace: LatencyTrace, names: readonly string[]): void {
    const n = Atomics.load(this.counts, 0);
    for (let i = this.copied; i < n; i++) trace.event(names[this.pairs[2 * i]!] ?? 'unknown', this.pairs[2 * i + 1]!);
    this.copied = n;
    trace.addDropped(Atomics.exchange(this.counts, 1, 0));
  }
}

export class LatencyTrace {
  // Numbers only in `requests` and `times`: V8 keeps them unboxed (a mixed array would
  // allocate a heap number per timestamp, and the trace would add to the collections it sees).
  private readonly requests: number[] = [];
  private readonly names: string[] = [];
  private readonly times: number[] = [];
  private dropped = 0;
  /** Per connection: when its oldest unanswered request was read. */
  private readonly pending = new Map<number, number>();
  /** Other threads' traces, copied in by data(). */
  private readonly logs: { log: SharedTraceLog; names: readonly string[] }[] = [];

  /**
   * Client input on `conn`: a request starts unless one is unanswered (with one request in
   * flight per connection, as redis-benchmark without pipelining has, that is exact).
   */
  requestRead(conn: number, at = traceNow()): void {
    if (!this.pending.has(conn)) this.pending.set(conn, at);
  }

  /** Output written to `conn`'s client: the reply to its pending request. */
  replyWritten(conn: number, at = traceNow()): void {
    const started = this.pending.get(conn);
    if (started === undefined) return;
    this.pending.delete(conn);
    if (this.requests.length >= 3 * limits.latencyTraceRequestsMax) {
      this.dropped += 1;
      return;
    }
    this.requests.push(conn, started, at);
  }

  event(name: string, at = traceNow()): void {
    if (this.names.length >= limits.latencyTraceEventsMax) {
      this.dropped += 1;
      return;
    }
    this.names.push(name);
    this.times.push(at);
  }

  /** A thread's shared log, whose events data() adds to this trace's (named by `names`). */
  attach(log: SharedTraceLog, names: readonly string[]): void {
    this.logs.push({ log, names });
  }

  addDropped(n: number): void {
    this.dropped += n;
  }

  data(): LatencyTraceData {
    for (const l of this.logs) l.log.copyInto(this, l.names);
    const events: (string | number)[] = [];
    for (let i = 0; i < this.names.length; i++) events.push(this.names[i]!, this.times[i]!);
    return { requests: this.requests, events, dropped: this.dropped };
  }
}

/** Whether COLO_TRACE_DIR asks for traces (every thread of the process sees it). */
const tracing = (process.env.COLO_TRACE_DIR ?? '') !== '';

/**
 * The process's trace (its main thread's), or null when COLO_TRACE_DIR is not set. `colo run`
 * writes it to `COLO_TRACE_DIR/trace-PID.json` when the process exits (cli/run.ts). A worker
 * thread has none: the vCPU traces into a SharedTraceLog the main thread copies.
 */
export const latencyTrace: LatencyTrace | null = tracing && isMainThread ? new LatencyTrace() : null;

/** The garbage collections of the calling thread, as `record(start, end)`. */
export function observeGc(record: (start: number, end: number) => void): void {
  const gc = new PerformanceObserver((list) => {
    for (const e of list.getEntries()) record(performance.timeOrigin + e.startTime, performance.timeOrigin + e.startTime + e.duration);
  });
  gc.observe({ entryTypes: ['gc'] });
}

if (latencyTrace !== null) {
  observeGc((start, end) => {
    latencyTrace.event('gc', start);
    latencyTrace.event('gc-end', end);
  });
}
