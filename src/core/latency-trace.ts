/**
 * An opt-in timing trace for latency analysis (`COLO_TRACE_DIR=DIR`): when each client request
 * was read and its reply written (the front end), when each COLO protocol event happened
 * (both drivers), when mirrored input and each guest's output passed (colo/network.ts:
 * `P:mirror`, `S:mirrorIn`, `P:pvmOut`, `P:svmOut`, `P:svmMain`), and this thread's garbage
 * collections (`gc`, `gc-end`). Times are milliseconds on one clock for every process of a host
 * (`performance.timeOrigin + performance.now()`), so the traces of a primary and a secondary
 * on one host line up. Read by `bench/latency-anatomy.ts`. Off (null) unless the variable is
 * set: the front end and the drivers pay one null check per request.
 */
import { PerformanceObserver } from 'node:perf_hooks';
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

export class LatencyTrace {
  // Numbers only in `requests` and `times`: V8 keeps them unboxed (a mixed array would
  // allocate a heap number per timestamp, and the trace would add to the collections it sees).
  private readonly requests: number[] = [];
  private readonly names: string[] = [];
  private readonly times: number[] = [];
  private dropped = 0;
  /** Per connection: when its oldest unanswered request was read. */
  private readonly pending = new Map<number, number>();

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

  data(): LatencyTraceData {
    const events: (string | number)[] = [];
    for (let i = 0; i < this.names.length; i++) events.push(this.names[i]!, this.times[i]!);
    return { requests: this.requests, events, dropped: this.dropped };
  }
}

/**
 * The process's trace, or null when COLO_TRACE_DIR is not set. `colo run` writes it to
 * `COLO_TRACE_DIR/trace-PID.json` when the process exits (cli/run.ts).
 */
export const latencyTrace: LatencyTrace | null = (process.env.COLO_TRACE_DIR ?? '') === '' ? null : new LatencyTrace();

if (latencyTrace !== null) {
  // Garbage collections of this thread: `gc` at the start, `gc-end` at the end.
  const gc = new PerformanceObserver((list) => {
    for (const e of list.getEntries()) {
      latencyTrace.event('gc', performance.timeOrigin + e.startTime);
      latencyTrace.event('gc-end', performance.timeOrigin + e.startTime + e.duration);
    }
  });
  gc.observe({ entryTypes: ['gc'] });
}
