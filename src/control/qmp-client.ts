/**
 * QmpClient: talks to a QmpServer (or to qemu-system's -qmp socket).
 *
 *   const qmp = await QmpClient.connect('unix:/run/vm.qmp', { timeoutMs: 5000 });
 *   const mark = qmp.eventCount;
 *   await qmp.execute('migrate', { uri: 'tcp:10.0.0.2:4444' });
 *   await qmp.waitEvent('MIGRATION', { after: mark, where: (e) => e.data.status === 'completed' });
 *   await qmp.waitEvent('RESUME', { nth: 3 });     // the 3rd RESUME since connect
 *   await qmp.close();
 *
 * Every event received since connect is kept in a log (bounded by the eventLogMax option,
 * default limits.qmpClientEventLogMax) with its index, so a wait can look at the past as well as the
 * future. Every wait has a timeout; a lost connection rejects all waits with
 * ChannelClosedError.
 */
import fs from 'node:fs';
import type * as net from 'node:net';
import { ChannelClosedError, QmpCommandError, TimeoutError, errorMessage } from '../core/errors.js';
import { limits } from '../core/limits.js';
import { connectTo, formatAddress, toAddress, type SocketAddress } from './address.js';
import { parseQmpJson } from './qmp-json.js';
import { LineBuffer, lineTooLong } from './qmp-json.js';

export interface QmpGreeting {
  version: { qemu: { major: number; minor: number; micro: number }; package: string };
  capabilities: string[];
}

export interface QmpEvent {
  /** Position in this client's event log: 0 for the first event received after connecting. */
  index: number;
  event: string;
  /** The event's data; {} when the event carries none. */
  data: Record<string, unknown>;
  timestamp: { seconds: number; microseconds: number };
}

export interface QmpConnectOptions {
  /** For connecting, the greeting and negotiation together (default limits.qmpTimeoutMsDefault). */
  timeoutMs?: number;
  /** For the greeting alone, within timeoutMs (default: timeoutMs). */
  greetingTimeoutMs?: number;
  /** Negotiate out-of-band execution when the server offers it (default true). */
  oob?: boolean;
  /**
   * Events kept in the log for waitEvent (default limits.qmpClientEventLogMax): a client that
   * lives long and waits only for events after a command it just sent keeps a few, one that
   * never waits (a heartbeat) 0. A VM sends a STOP and a RESUME per COLO checkpoint.
   */
  eventLogMax?: number;
  /**
   * Integers beyond 2^53 in replies and events come back as QmpExactInteger, as the server
   * wrote them (QEMU's int64/uint64: addresses, byte counters), instead of as the nearest
   * double (default false: numbers). `colo qmp` prints them so.
   */
  exactIntegers?: boolean;
}

export interface QmpExecuteOptions {
  /** Default limits.qmpTimeoutMsDefault. */
  timeoutMs?: number;
  /** Send as `exec-oob` (overtakes in-band commands; the command must allow it). */
  oob?: boolean;
}

export interface WaitEventOptions {
  /** Only events that satisfy this. */
  where?: (event: QmpEvent) => boolean;
  /** Only events with index >= after: pass `client.eventCount` taken earlier for "after now". */
  after?: number;
  /** Resolve with the nth matching event (1-based, default 1). */
  nth?: number;
  /** Default limits.qmpTimeoutMsDefault. */
  timeoutMs?: number;
}

interface Pending {
  readonly what: string;
  resolve(value: unknown): void;
  reject(err: Error): void;
  readonly timer: NodeJS.Timeout;
}

interface EventWaiter {
  readonly name: string;
  readonly where: ((event: QmpEvent) => boolean) | undefined;
  readonly after: number;
  readonly nth: number;
  readonly what: string;
  seen: number;
  resolve(event: QmpEvent): void;
  reject(err: Error): void;
  readonly timer: NodeJS.Timeout;
}

const loneSurrogate = /[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/;

/**
 * A JSON.stringify replacer: a string with a lone surrogate (not text: no UTF-8 for it) is an
 * error here. A server refuses it (QEMU's and ours) with a parse error that carries no id, and
 * the command would only fail at its timeout.
 */
function refuseLoneSurrogates(key: string, value: unknown): unknown {
  for (const s of [key, value]) {
    if (typeof s === 'string' && loneSurrogate.test(s)) throw new TypeError(`the string ${JSON.stringify(s)} has a lone surrogate`);
  }
  return value;
}

function isObject(v: unknown): v is Record<string, unknown> {
  return v !== null && typeof v === 'object' && !Array.isArray(v);
}

export class QmpClient {
  /** The server's address, as text (used in every error message). */
  readonly address: string;
  private readonly socket: net.Socket;
  private readonly lines = new LineBuffer(limits.qmpOutputBytesMax);
  private greetingValue: QmpGreeting | undefined;
  private oob = false;
  private nextId = 1;
  private readonly pending = new Map<number, Pending>();
  private readonly log: QmpEvent[] = [];
  private received = 0;
  private readonly waiters = new Set<EventWaiter>();
  private readonly eventListeners = new Set<(event: QmpEvent) => void>();
  private readonly closeListeners = new Set<(err: ChannelClosedError) => void>();
  private closeError: ChannelClosedError | undefined;
  private onGreeting: ((greeting: unknown) => void) | undefined;
  /** Whether a byte other than whitespace came: the first says whether this can be QMP at all. */
  private spoken = false;
  private readonly closedPromise: Promise<void>;

  private constructor(
    socket: net.Socket,
    address: string,
    private readonly eventLogMax: number,
    private readonly exactIntegers = false,
  ) {
    this.socket = socket;
    this.address = address;
    this.closedPromise = new Promise<void>((resolve) => socket.once('close', () => resolve()));
    socket.on('data', (chunk: Buffer) => this.receive(chunk));
    socket.on('error', (err) => this.shutdown(new ChannelClosedError(`connection to ${this.address} failed: ${err.message}`, { cause: err })));
    socket.on('close', () => this.shutdown(new ChannelClosedError(`connection to ${this.address} closed`)));
  }

  /**
   * The QMP client of a process that is starting: waits for its unix socket `path` to exist
   * and answer, trying every `everyMs`. `gone()` returns the error to fail with once the
   * process can no longer come up (it exited), else null; after `timeoutMs` it fails with
   * `timedOut()`. Callers keep their own typed errors.
   */
  static async connectWhenUp(
    path: string,
    opts: { timeoutMs: number; gone: () => Error | null; timedOut: () => Error; everyMs?: number; eventLogMax?: number },
  ): Promise<QmpClient> {
    const deadline = Date.now() + opts.timeoutMs;
    for (;;) {
      const err = opts.gone();
      if (err !== null) throw err;
      if (fs.existsSync(path)) {
        try {
          return await QmpClient.connect(`unix:${path}`, { timeoutMs: 2000, ...(opts.eventLogMax === undefined ? {} : { eventLogMax: opts.eventLogMax }) });
        } catch {
          // created but not answering yet
        }
      }
      if (Date.now() > deadline) throw opts.timedOut();
      await new Promise((r) => setTimeout(r, opts.everyMs ?? 25));
    }
  }

  /** Connects, reads the greeting and negotiates capabilities (with oob when offered). */
  static async connect(addressIn: SocketAddress | string, options: QmpConnectOptions = {}): Promise<QmpClient> {
    const address = toAddress(addressIn);
    const text = formatAddress(address);
    const timeoutMs = options.timeoutMs ?? limits.qmpTimeoutMsDefault;
    const deadline = Date.now() + timeoutMs;
    const socket = await connectTo(address, timeoutMs);
    const client = new QmpClient(socket, text, options.eventLogMax ?? limits.qmpClientEventLogMax, options.exactIntegers === true);
    try {
      const greetingMs = Math.min(options.greetingTimeoutMs ?? timeoutMs, timeoutMs);
      const greeting = await client.readGreeting(Math.max(1, Math.min(greetingMs, deadline - Date.now())), greetingMs);
      const enableOob = greeting.capabilities.includes('oob') && options.oob !== false;
      try {
        await client.execute('qmp_capabilities', enableOob ? { enable: ['oob'] } : undefined, {
          timeoutMs: Math.max(1, deadline - Date.now()),
        });
      } catch (err) {
        if (!(err instanceof TimeoutError)) throw err;
        throw new TimeoutError(`timed out after ${timeoutMs} ms waiting for the reply to qmp_capabilities from ${text}`);
      }
      client.oob = enableOob;
      return client;
    } catch (err) {
      socket.destroy();
      throw err;
    }
  }

  private readGreeting(waitMs: number, totalMs: number): Promise<QmpGreeting> {
    return new Promise<QmpGreeting>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.onGreeting = undefined;
        reject(new TimeoutError(`no QMP greeting from ${this.address} within ${totalMs} ms (is it a QMP socket?)`));
      }, waitMs);
      const fail = (err: Error): void => {
        clearTimeout(timer);
        this.onGreeting = undefined;
        reject(err);
      };
      if (this.closeError !== undefined) return fail(this.closeError);
      this.closeListeners.add(fail);
      this.onGreeting = (message) => {
        clearTimeout(timer);
        this.onGreeting = undefined;
        this.closeListeners.delete(fail);
        if (isObject(message) && isObject(message.error)) {
          const e = message.error;
          reject(new QmpCommandError(String(e.class), String(e.desc)));
        } else if (isObject(message) && isObject(message.QMP) && Array.isArray(message.QMP.capabilities)) {
          this.greetingValue = message.QMP as unknown as QmpGreeting;
          resolve(this.greetingValue);
        } else {
          reject(new ChannelClosedError(`${this.address} is not a QMP server: its first line is not a greeting`));
        }
      };
    });
  }

  /** The server's greeting (`{"version": ..., "capabilities": [...]}`). */
  get greeting(): QmpGreeting {
    return this.greetingValue!;
  }

  /** Whether out-of-band execution was negotiated. */
  get oobEnabled(): boolean {
    return this.oob;
  }

  get closed(): boolean {
    return this.closeError !== undefined;
  }

  /**
   * Runs a command: resolves with its `return` value, rejects with QmpCommandError(class,
   * desc) for an error reply, TimeoutError when no reply comes in time, ChannelClosedError
   * when the connection goes away first.
   */
  execute<T = unknown>(name: string, args?: Record<string, unknown>, options: QmpExecuteOptions = {}): Promise<T> {
    if (this.closeError !== undefined) return Promise.reject(this.closeError);
    const id = this.nextId++;
    const request: Record<string, unknown> = { [options.oob === true ? 'exec-oob' : 'execute']: name };
    if (args !== undefined && Object.keys(args).length > 0) request.arguments = args;
    request.id = id;
    let line: string;
    try {
      line = JSON.stringify(request, refuseLoneSurrogates) + '\n';
    } catch (err) {
      return Promise.reject(new TypeError(`cannot encode the arguments of ${name}: ${errorMessage(err)}`));
    }
    const timeoutMs = options.timeoutMs ?? limits.qmpTimeoutMsDefault;
    const what = `reply to ${name} (id ${id})`;
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new TimeoutError(`timed out after ${timeoutMs} ms waiting for ${what} from ${this.address}`));
      }, timeoutMs);
      this.pending.set(id, { what, resolve: resolve as (v: unknown) => void, reject, timer });
      this.socket.write(line);
    });
  }

  /** Events received since connect that are still in the log, oldest first. */
  get events(): readonly QmpEvent[] {
    return this.log;
  }

  /** How many events were received so far: the index the next event will get. */
  get eventCount(): number {
    return this.received;
  }

  /**
   * Resolves with the nth (default 1st) event called `name` with index >= `after`
   * (default 0) that satisfies `where`: at once if it is already in the log, else when it
   * arrives. The second argument may also be just the predicate, the third the timeout.
   */
  waitEvent(
    name: string,
    optionsOrWhere: WaitEventOptions | ((event: QmpEvent) => boolean) = {},
    timeoutMsArg?: number,
  ): Promise<QmpEvent> {
    const options: WaitEventOptions = typeof optionsOrWhere === 'function' ? { where: optionsOrWhere } : optionsOrWhere;
    const timeoutMs = timeoutMsArg ?? options.timeoutMs ?? limits.qmpTimeoutMsDefault;
    const nth = options.nth ?? 1;
    const after = options.after ?? 0;
    const where = options.where;
    let what = `event ${name}`;
    if (options.nth !== undefined) what += ` #${nth}`;
    if (after > 0) what += ` after event index ${after}`;
    if (where !== undefined) what += ' (filtered)';
    if (!Number.isInteger(nth) || nth < 1) return Promise.reject(new RangeError(`waitEvent: nth must be >= 1, got ${nth}`));

    let seen = 0;
    for (const event of this.log) {
      if (event.index < after || event.event !== name) continue;
      if (where !== undefined && !where(event)) continue;
      if (++seen === nth) return Promise.resolve(event);
    }
    if (this.closeError !== undefined) {
      return Promise.reject(new ChannelClosedError(`${this.closeError.message} while waiting for ${what}`));
    }
    return new Promise<QmpEvent>((resolve, reject) => {
      const waiter: EventWaiter = {
        name,
        where,
        after,
        nth,
        what,
        seen,
        resolve,
        reject,
        timer: setTimeout(() => {
          this.waiters.delete(waiter);
          const saw = waiter.seen > 0 ? `; saw ${waiter.seen} matching` : '';
          reject(new TimeoutError(`timed out after ${timeoutMs} ms waiting for ${what} from ${this.address}${saw}`));
        }, timeoutMs),
      };
      this.waiters.add(waiter);
    });
  }

  /** Calls `listener` for every event (after it is logged); returns a function that unsubscribes. */
  on(kind: 'event', listener: (event: QmpEvent) => void): () => void;
  /** Calls `listener` once when the connection goes away, with the reason. */
  on(kind: 'close', listener: (err: ChannelClosedError) => void): () => void;
  on(kind: 'event' | 'close', listener: ((event: QmpEvent) => void) | ((err: ChannelClosedError) => void)): () => void {
    if (kind === 'event') {
      const l = listener as (event: QmpEvent) => void;
      this.eventListeners.add(l);
      return () => this.eventListeners.delete(l);
    }
    const l = listener as (err: ChannelClosedError) => void;
    this.closeListeners.add(l);
    return () => this.closeListeners.delete(l);
  }

  /** Closes the connection; pending executions and waits reject with ChannelClosedError. */
  async close(): Promise<void> {
    this.shutdown(new ChannelClosedError(`connection to ${this.address} closed by the client`));
    if (!this.socket.destroyed) {
      // Flush what was written, then go: do not wait for the server to finish its commands.
      const timer = setTimeout(() => this.socket.destroy(), 1000);
      timer.unref();
      this.socket.end(() => this.socket.destroy());
      await this.closedPromise;
      clearTimeout(timer);
    }
  }

  private receive(chunk: Buffer): void {
    if (this.closeError !== undefined) return;
    if (!this.spoken && this.onGreeting !== undefined && !this.mayBeGreeting(chunk)) return;
    this.lines.push(chunk);
    for (;;) {
      const line = this.lines.shift();
      if (line === undefined) return;
      if (line === lineTooLong) {
        this.fail(`a line from ${this.address} is longer than ${limits.qmpOutputBytesMax} bytes`);
        return;
      }
      const text = line.toString('utf8').trim();
      if (text === '') continue;
      let message: unknown;
      try {
        message = this.exactIntegers ? parseQmpJson(text, limits.qmpJsonDepthMax, { exactIntegers: true }) : JSON.parse(text);
      } catch (err) {
        const what = this.onGreeting !== undefined ? 'is not a QMP server: its first line is not JSON' : 'sent a line that is not JSON';
        this.fail(`${this.address} ${what}: ${errorMessage(err)}`);
        return;
      }
      this.dispatch(message);
      if (this.closeError !== undefined) return;
    }
  }

  /**
   * A greeting is a JSON object: a peer whose first byte (past whitespace) is anything else is
   * not QMP, and says so now, not at the greeting's timeout (it may send no newline ever: a
   * binary protocol, a banner). Fails the connection and returns false then.
   */
  private mayBeGreeting(chunk: Buffer): boolean {
    const i = chunk.findIndex((b) => b !== 0x20 && b !== 0x09 && b !== 0x0a && b !== 0x0d);
    if (i < 0) return true;
    this.spoken = true;
    if (chunk[i] === 0x7b) return true; // '{'
    const preview = JSON.stringify(chunk.subarray(i, i + 32).toString('latin1'));
    this.fail(`${this.address} is not a QMP server: it sent ${preview} instead of a greeting`);
    return false;
  }

  private dispatch(message: unknown): void {
    if (this.onGreeting !== undefined) {
      this.onGreeting(message);
      return;
    }
    if (!isObject(message)) return;
    if (typeof message.event === 'string') {
      this.addEvent(message);
      return;
    }
    const id = message.id;
    if (typeof id !== 'number') return; // not an answer to us (we always send a numeric id)
    const p = this.pending.get(id);
    if (p === undefined) return; // answered after its timeout
    this.pending.delete(id);
    clearTimeout(p.timer);
    if (isObject(message.error)) {
      p.reject(new QmpCommandError(String(message.error.class), String(message.error.desc)));
    } else if (Object.hasOwn(message, 'return')) {
      p.resolve(message.return);
    } else {
      p.reject(new ChannelClosedError(`${this.address} sent a malformed ${p.what}`));
    }
  }

  private addEvent(message: Record<string, unknown>): void {
    const ts = isObject(message.timestamp) ? message.timestamp : {};
    const event: QmpEvent = {
      index: this.received++,
      event: message.event as string,
      data: isObject(message.data) ? message.data : {},
      timestamp: { seconds: Number(ts.seconds ?? 0), microseconds: Number(ts.microseconds ?? 0) },
    };
    this.log.push(event);
    const max = this.eventLogMax;
    if (this.log.length > max + Math.ceil(max / 8)) {
      const drop = this.log.length - max;
      this.log.splice(0, drop);
    }
    for (const waiter of this.waiters) {
      if (waiter.name !== event.event || event.index < waiter.after) continue;
      if (waiter.where !== undefined && !waiter.where(event)) continue;
      if (++waiter.seen < waiter.nth) continue;
      this.waiters.delete(waiter);
      clearTimeout(waiter.timer);
      waiter.resolve(event);
    }
    for (const listener of [...this.eventListeners]) listener(event);
  }

  private fail(message: string): void {
    this.shutdown(new ChannelClosedError(message));
    this.socket.destroy();
  }

  private shutdown(err: ChannelClosedError): void {
    if (this.closeError !== undefined) return;
    this.closeError = err;
    for (const [, p] of this.pending) {
      clearTimeout(p.timer);
      p.reject(new ChannelClosedError(`${err.message} while waiting for ${p.what}`, { cause: err }));
    }
    this.pending.clear();
    for (const waiter of this.waiters) {
      clearTimeout(waiter.timer);
      waiter.reject(new ChannelClosedError(`${err.message} while waiting for ${waiter.what}`, { cause: err }));
    }
    this.waiters.clear();
    for (const listener of [...this.closeListeners]) listener(err);
    this.closeListeners.clear();
  }
}
