/**
 * A discrete-event runtime for the COLO simulation: a simulated clock, a priority queue of
 * events ordered by (time, insertion), and coroutines (generators) that stand in for the
 * drivers' async functions, so that `await` becomes `yield` and every wait takes simulated time.
 */

/** Who an event belongs to: the events and coroutines of a crashed node never run again. */
export interface Owner {
  dead: boolean;
}

interface QueuedEvent {
  t: number;
  seq: number;
  fn: () => void;
  owner: Owner | null;
  cancelled: boolean;
}

export interface Handle {
  cancel(): void;
}

/** A binary min-heap on (t, seq). */
class EventHeap {
  private a: QueuedEvent[] = [];
  get size(): number {
    return this.a.length;
  }
  push(e: QueuedEvent): void {
    const a = this.a;
    a.push(e);
    let i = a.length - 1;
    while (i > 0) {
      const p = (i - 1) >> 1;
      if (!less(a[i]!, a[p]!)) break;
      [a[i], a[p]] = [a[p]!, a[i]!];
      i = p;
    }
  }
  pop(): QueuedEvent | undefined {
    const a = this.a;
    if (a.length === 0) return undefined;
    const top = a[0]!;
    const last = a.pop()!;
    if (a.length > 0) {
      a[0] = last;
      let i = 0;
      for (;;) {
        const l = 2 * i + 1;
        const r = l + 1;
        let m = i;
        if (l < a.length && less(a[l]!, a[m]!)) m = l;
        if (r < a.length && less(a[r]!, a[m]!)) m = r;
        if (m === i) break;
        [a[i], a[m]] = [a[m]!, a[i]!];
        i = m;
      }
    }
    return top;
  }
}

function less(x: QueuedEvent, y: QueuedEvent): boolean {
  return x.t < y.t || (x.t === y.t && x.seq < y.seq);
}

export class Sim {
  now = 0;
  steps = 0;
  private seq = 0;
  private readonly q = new EventHeap();

  at(t: number, fn: () => void, owner: Owner | null = null): Handle {
    const e: QueuedEvent = { t: Math.max(t, this.now), seq: this.seq++, fn, owner, cancelled: false };
    this.q.push(e);
    return {
      cancel: () => {
        e.cancelled = true;
      },
    };
  }

  after(ms: number, fn: () => void, owner: Owner | null = null): Handle {
    return this.at(this.now + ms, fn, owner);
  }

  /** Run one event; false when the queue is empty or the next event is after `until`. */
  step(until: number): boolean {
    for (;;) {
      const e = this.q.pop();
      if (e === undefined) return false;
      if (e.cancelled || (e.owner !== null && e.owner.dead)) continue;
      if (e.t > until) {
        this.q.push(e);
        return false;
      }
      this.now = e.t;
      this.steps += 1;
      e.fn();
      return true;
    }
  }
}

// ---------------------------------------------------------------- coroutines

/** A promise in simulated time. */
export class Signal<T = void> {
  done = false;
  value: T | undefined;
  error: unknown = undefined;
  failed = false;
  private waiters: (() => void)[] = [];

  constructor(private readonly sim: Sim) {}

  resolve(v: T): void {
    if (this.done) return;
    this.done = true;
    this.value = v;
    this.wake();
  }
  reject(err: unknown): void {
    if (this.done) return;
    this.done = true;
    this.failed = true;
    this.error = err;
    this.wake();
  }
  /** Called (through the event queue, like a microtask) once the signal settles. */
  onSettled(fn: () => void, owner: Owner | null): void {
    if (this.done) this.sim.after(0, fn, owner);
    else this.waiters.push(() => this.sim.after(0, fn, owner));
  }
  private wake(): void {
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }
}

export type Cmd = { sleep: number } | { wait: Signal<unknown> };
export type Co<T> = Generator<Cmd, T, unknown>;

export function* sleep(ms: number): Co<void> {
  yield { sleep: ms };
}

/** `await signal`: returns its value or throws its error. */
export function* wait<T>(s: Signal<T>): Co<T> {
  yield { wait: s as Signal<unknown> };
  if (s.failed) throw s.error;
  return s.value as T;
}

/** `await signal.catch(() => undefined)` */
export function* settle(s: Signal<unknown>): Co<void> {
  yield { wait: s };
}

/**
 * Start a coroutine: like calling an async function, it runs synchronously up to its first
 * wait. The returned signal settles with its result. A dead owner's coroutine stops for good.
 */
export function spawn<T>(sim: Sim, owner: Owner | null, co: Co<T>): Signal<T> {
  const done = new Signal<T>(sim);
  const advance = (mode: 'next' | 'throw', arg: unknown): void => {
    if (owner !== null && owner.dead) return;
    let r: IteratorResult<Cmd, T>;
    try {
      r = mode === 'next' ? co.next(arg) : co.throw(arg);
    } catch (err) {
      done.reject(err);
      return;
    }
    if (r.done) {
      done.resolve(r.value);
      return;
    }
    const cmd = r.value;
    if ('sleep' in cmd) sim.after(cmd.sleep, () => advance('next', undefined), owner);
    else cmd.wait.onSettled(() => advance('next', undefined), owner);
  };
  advance('next', undefined);
  return done;
}

/** The drivers' VmOps: VM operations run one after the other; a failover waits for the one in flight. */
export class VmOps {
  private tail: Signal<void>;
  constructor(private readonly sim: Sim, private readonly owner: Owner) {
    this.tail = new Signal<void>(sim);
    this.tail.resolve();
  }
  run(fn: () => Co<void>): Signal<void> {
    const prev = this.tail;
    const sim = this.sim;
    const next = spawn(sim, this.owner, (function* () {
      yield* settle(prev);
      yield* fn();
    })());
    // tail = next.catch(() => undefined)
    const tail = new Signal<void>(sim);
    next.onSettled(() => tail.resolve(), this.owner);
    this.tail = tail;
    return next;
  }
  settled(): Signal<void> {
    return this.tail;
  }
}
